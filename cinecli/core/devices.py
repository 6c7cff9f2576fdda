"""The one place that chooses the device and the dtype, and the one table of what each kind of device can do.

``auto`` picks CUDA, then Apple MPS, then the CPU. The compute dtype defaults to bf16 where the hardware does it
well (CUDA with bf16 support, the CPU, where bf16 matmuls run ~4x faster than fp32 on AVX-512-BF16/AMX machines,
and MPS on macOS 14+), else fp32 on MPS and fp16 on old CUDA cards.

Every device-specific rule reads ``LIMITS`` through ``limits(device)``: nothing else special-cases a device name.
``CINE_EMULATE_DEVICE=mps|cuda`` makes ``--device mps|cuda`` (and ``auto``) run on the CPU under that device's
limits (``core/emulate.py``), which is how the MPS and CUDA paths are tested on a machine that has neither.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping

import torch

from .errors import DeviceError
from .limits import LIMITS, DeviceLimits

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
def emulated_kind() -> str | None:
    """``CINE_EMULATE_DEVICE`` (mps or cuda), else None."""
    value = os.environ.get("CINE_EMULATE_DEVICE", "").strip().lower()
    if value and value not in ("mps", "cuda"):
        raise DeviceError(f"CINE_EMULATE_DEVICE={value!r}: must be mps or cuda")
    return value or None


# The emulated device is the CPU under another name: torch.device("cpu", 0) (real CPU work uses plain "cpu").
EMULATED = torch.device("cpu", 0)


def kind(device: torch.device | str) -> str:
    """'cuda', 'mps' or 'cpu': the kind whose rules apply to ``device`` (the emulated kind for ``EMULATED``)."""
    device = torch.device(device)
    if device == EMULATED and (emulated := emulated_kind()):
        return emulated
    return device.type


def limits(device: torch.device | str) -> DeviceLimits:
    return LIMITS[kind(device)]


def is_emulated(device: torch.device | str) -> bool:
    return kind(device) != torch.device(device).type


def has_op(device: torch.device | str, op: str) -> bool:
    """Whether this torch runs ``op`` (an aten name, e.g. 'upsample_bicubic2d') on ``device`` (LIMITS' ops_since)."""
    from .emulate import torch_version

    return all(torch_version() >= since for name, since in limits(device).ops_since if name == op)


def storage_dtype(dtype: torch.dtype, device: torch.device | str) -> torch.dtype:
    """The dtype a tensor of ``dtype`` is stored in on ``device``: float8 → its uint8 bits where unsupported."""
    if dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and not limits(device).float8:
        return torch.uint8
    return dtype


def to_device(tensor: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None, *,
              copy: bool = False, non_blocking: bool = False) -> torch.Tensor:
    """Move (and cast) one tensor to ``device`` under that device's rules: float8 travels as its uint8 bits where
    the device has no float8 (a bit-view: the same bytes, decoded by quant.dequantize); on an emulated device the
    tensor is checked against the device's limits. Every host → device move of weights goes through here."""
    dtype = dtype or tensor.dtype
    stored = storage_dtype(dtype, device)
    if stored != dtype:
        tensor = tensor.to(dtype).view(stored) if tensor.dtype != dtype else tensor.view(stored)
        dtype = stored
    out = tensor.to(device=device, dtype=dtype, copy=copy, non_blocking=non_blocking)
    if is_emulated(device):
        from .emulate import place

        place(out, limits(device))
    return out


def module_to_device(module: torch.nn.Module, device: torch.device | str) -> torch.nn.Module:
    """``module.to(device)`` through ``to_device`` (float8 parameters become bit-views where needed)."""
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            t.data = to_device(t.data, device)
    return module


def release_cached(device: torch.device | str | None = None) -> None:
    """Collect garbage and give the allocator's cached blocks back (after an out-of-memory error, between items)."""
    import gc

    gc.collect()
    k = kind(device) if device is not None else None
    if torch.cuda.is_available() and k in (None, "cuda"):
        torch.cuda.empty_cache()
    if torch.backends.mps.is_available() and k in (None, "mps"):
        torch.mps.empty_cache()


def on_host():
    """A region of deliberate host (CPU) work inside device code (float64 tables, file reads): an emulated device's
    rules do not apply inside. A no-op otherwise."""
    from . import emulate

    return emulate.suspended() if emulate.active() else contextlib.nullcontext()


def device_rules(device: torch.device | str):
    """A context that enforces an emulated device's limits on every tensor made inside it (a no-op on real devices)."""
    if not is_emulated(device):
        return contextlib.nullcontext()
    from .emulate import DeviceRules

    return DeviceRules(limits(device))


def local_rank_index(env: Mapping[str, str] | None = None) -> int | None:
    """The GPU index of this process under a launcher (torchrun, accelerate, deepspeed set LOCAL_RANK), else None."""
    env = os.environ if env is None else env
    value = env.get("LOCAL_RANK", "").strip()
    if not value:
        return None
    if not value.isdigit():
        raise DeviceError(f"LOCAL_RANK={value!r} is not a GPU index")
    return int(value)


def _cuda_for_rank(env: Mapping[str, str] | None) -> torch.device:
    """Plain ``cuda`` (or ``auto`` on a CUDA machine) → cuda:LOCAL_RANK under a launcher, so ranks do not share GPU 0.

    With one visible device per process (CUDA_VISIBLE_DEVICES set per rank) every rank uses its cuda:0.
    """
    rank = local_rank_index(env)
    if rank is None:
        return torch.device("cuda")
    count = torch.cuda.device_count()
    if rank >= count and count != 1:
        raise DeviceError(f"LOCAL_RANK={rank} but only {count} CUDA device(s) are visible: start at most {count} "
                          "processes per machine (torchrun --nproc-per-node)")
    index = rank if rank < count else 0
    torch.cuda.set_device(index)  # memory stats and empty_cache follow the current device
    return torch.device("cuda", index)


def choose_device(name: str | torch.device = "auto", env: Mapping[str, str] | None = None) -> torch.device:
    """``auto|cpu|cuda|cuda:N|mps`` → a usable ``torch.device`` or a clear error.

    ``auto`` and ``cuda`` follow ``LOCAL_RANK`` (``env``, default os.environ) when a launcher set it.
    """
    name = str(name)
    emulated = emulated_kind()
    if emulated and name in ("auto", emulated, f"{emulated}:0"):
        return EMULATED
    if name == "auto":
        if torch.cuda.is_available():
            return _cuda_for_rank(env)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise DeviceError(f"unknown device '{name}' (use auto, cpu, cuda, cuda:N or mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("CUDA was asked for but no CUDA device is available (try --device cpu)")
        if device.index is None:
            return _cuda_for_rank(env)
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise DeviceError(f"{name} does not exist: {torch.cuda.device_count()} CUDA device(s) present")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("MPS was asked for but is not available on this machine (try --device cpu)")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise DeviceError(f"unsupported device '{name}' (use auto, cpu, cuda, cuda:N or mps)")
    return device


def choose_dtype(name: str | torch.dtype | None = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    """``auto|bf16|fp16|fp32`` (or a torch dtype) → the compute dtype for ``device``."""
    if isinstance(name, torch.dtype):
        return name
    device = torch.device(device)
    if name in (None, "auto"):
        return default_dtype(device)
    try:
        return DTYPES[name]
    except KeyError:
        raise DeviceError(f"unknown dtype '{name}' (use auto, bf16, fp16 or fp32)") from None


def default_dtype(device: torch.device | str) -> torch.dtype:
    """``--dtype auto``. bf16 wherever it runs: Wan was trained and is released in bf16, and its FFN and attention
    outputs overflow fp16's range (diffusers#12896: wrong Wan I2V output on MPS in fp16). CUDA cards without bf16
    (pre-Ampere) get fp16, with the FFN clamped to fp16's range (wan_dit.Block); MPS gets bf16 on macOS 14+ (where
    Metal has bf16) and fp32 on older systems, never fp16."""
    k = kind(device)
    if k == "cuda":
        real = torch.device(device).type == "cuda"
        return torch.bfloat16 if not real or torch.cuda.is_bf16_supported() else torch.float16
    if k == "mps":
        real = torch.device(device).type == "mps"
        return torch.bfloat16 if not real or torch.backends.mps.is_macos_or_newer(14, 0) else torch.float32
    return torch.bfloat16


def native_matmul(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether ``device`` multiplies ``dtype`` matrices in hardware.

    CPUs without AVX512-BF16 / AMX (most Xeons before Sapphire Rapids, AMD before Zen 4) emulate bf16 and fp16
    GEMMs several times slower than fp32 (measured here: bf16 7x slower than fp32 on an AVX-512 Xeon).
    """
    if kind(device) != "cpu" or dtype == torch.float32:
        return True
    if dtype == torch.bfloat16:
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    if dtype == torch.float16:
        return torch.cpu._is_amx_fp16_supported()
    return False


def activation_dtype(device: torch.device | str, dtype: torch.dtype) -> torch.dtype:
    """The dtype activations flow in for 16-bit weights of ``dtype``: the same where the hardware multiplies it
    natively, else float32 (the weights stay 16-bit in memory; each layer upcasts its own weight per call)."""
    return dtype if native_matmul(device, dtype) else torch.float32


def vae_dtype(device: torch.device | str) -> torch.dtype:
    """The Wan VAE's weights and compute: bf16 where the device multiplies bf16 in hardware (CUDA with bf16, CPUs
    with AVX512-BF16/AMX: its conv3d runs ~1.9x faster than fp32 there), fp32 elsewhere (the reference's; CPUs that
    emulate bf16, MPS until measured). Latents leave encode in fp32 and decoded frames in the caller's dtype."""
    k = kind(device)
    if k == "mps":
        return torch.float32
    if k == "cuda":
        return default_dtype(device) if default_dtype(device) == torch.bfloat16 else torch.float32
    return torch.bfloat16 if native_matmul(device, torch.bfloat16) else torch.float32


def image_encoder_dtype(device: torch.device | str, dtype: torch.dtype) -> torch.dtype:
    """The CLIP image encoder's compute dtype for a run whose DiT computes in ``dtype``.

    On CUDA fp16, as the official I2V config (Wan2.1 ``wan/configs/wan_i2v_14B.py``: ``clip_dtype =
    torch.float16``) — unless fp32 was asked for. Elsewhere the DiT's activation dtype, which is what works there:
    bf16 or fp32 on CPUs (no fast fp16 GEMM on most), fp16 on MPS.
    """
    if kind(device) == "cuda" and dtype != torch.float32:
        return torch.float16
    return activation_dtype(device, dtype)


def text_encoder_dtype(where: torch.device | str, device: torch.device | str, dtype: torch.dtype) -> torch.dtype:
    """The umT5 weights' dtype when it runs on ``where`` for a run on ``device`` in ``dtype``: the run's dtype, except
    on the CPU fallback of a GPU or Mac run, where fp16 has no fast GEMM and would hold 16-bit weights upcast per
    call: there it takes the CPU's own choice (fp32 stays fp32)."""
    if torch.device(where) == torch.device(device) or dtype == torch.float32:
        return dtype
    return default_dtype(where)


# --- what the machine has (for the memory plan) ------------------------------------------------------------------
def host_available_bytes() -> int:
    """RAM a new allocation can get without swapping: Linux MemAvailable (free + reclaimable cache), else 3/4 of
    physical RAM (macOS has no cheap equivalent; the OS and other apps hold the rest)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") * 3 // 4
    except (ValueError, OSError, AttributeError):
        return 16 << 30


def device_memory(device: torch.device | str) -> tuple[int, int]:
    """(bytes the device can still give us, bytes of host RAM available) for ``device``.

    CUDA: ``mem_get_info`` free bytes (other processes on a shared GPU already subtracted). MPS: the recommended
    working set of Metal minus what this process already holds; memory is unified, so the host figure is the
    same pool. CPU: the device is host RAM.
    """
    device = torch.device(device)
    host = host_available_bytes()
    if is_emulated(device):
        from .emulate import free_bytes

        return free_bytes(limits(device)), host
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free), host
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()), host
    return host, host
