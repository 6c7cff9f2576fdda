"""The one place that chooses the device and the dtype.

``auto`` picks CUDA, then Apple MPS, then the CPU. The compute dtype defaults to bf16 where the hardware
does it well (CUDA with bf16 support, and the CPU, where bf16 matmuls run ~4x faster than fp32 on the
AVX-512/AMX machines we target), fp16 on MPS.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch

from .errors import DeviceError

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


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
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if device.type == "mps":
            return torch.float16
        return torch.bfloat16
    try:
        return DTYPES[name]
    except KeyError:
        raise DeviceError(f"unknown dtype '{name}' (use auto, bf16, fp16 or fp32)") from None


def native_matmul(device: torch.device | str, dtype: torch.dtype) -> bool:
    """Whether ``device`` multiplies ``dtype`` matrices in hardware.

    CPUs without AVX512-BF16 / AMX (most Xeons before Sapphire Rapids, AMD before Zen 4) emulate bf16 and fp16
    GEMMs several times slower than fp32 (measured here: bf16 7x slower than fp32 on an AVX-512 Xeon).
    """
    device = torch.device(device)
    if device.type != "cpu" or dtype == torch.float32:
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


def image_encoder_dtype(device: torch.device | str, dtype: torch.dtype) -> torch.dtype:
    """The CLIP image encoder's compute dtype for a run whose DiT computes in ``dtype``.

    On CUDA fp16, as the official I2V config (Wan2.1 ``wan/configs/wan_i2v_14B.py``: ``clip_dtype =
    torch.float16``) — unless fp32 was asked for. Elsewhere the DiT's activation dtype, which is what works there:
    bf16 or fp32 on CPUs (no fast fp16 GEMM on most), fp16 on MPS.
    """
    device = torch.device(device)
    if device.type == "cuda" and dtype != torch.float32:
        return torch.float16
    return activation_dtype(device, dtype)


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
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free), host
    if device.type == "mps":
        return int(torch.mps.recommended_max_memory() - torch.mps.driver_allocated_memory()), host
    return host, host
