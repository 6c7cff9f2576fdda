"""The one table of what each kind of device can hold and compute (``devices.limits(device)`` reads it).

Every device-specific rule in cine reads a row of ``LIMITS`` rather than testing a device name, so a device's
quirks live here, with their sources, and the emulation (emulate.py) enforces the same rows on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

GiB = 1 << 30


@dataclass(frozen=True)
class DeviceLimits:
    """What one kind of device can hold and compute. Sources in the comments of ``LIMITS``."""

    kind: str
    float8: bool  # holds float8 tensors; else fp8 weights live there as their uint8 bits (quant.fp8_bits_to_half)
    float64: bool  # computes in float64; else float64 tables are built on the host, then cast and moved
    max_tensor_bytes: int | None  # the largest single tensor; past it the process dies (not an exception)
    fp32_scores: bool  # SDPA materialises the [Lq, Lk] scores, in fp32, for 16-bit inputs too
    oom_texts: tuple[str, ...]  # RuntimeError texts that mean "out of memory" (besides torch.OutOfMemoryError)
    headroom: float  # share of the free memory the plan leaves unused: workspaces, libraries loaded later, fragmentation
    pins_host: bool  # streamed blocks wait in page-locked host memory (asynchronous copies)
    emulated_memory: int  # CINE_EMULATE_DEVICE_MEMORY default: the common size of this kind among cine's users
    ops_since: tuple[tuple[str, tuple[int, int]], ...] = ()  # (aten op, first torch release that has it there)


LIMITS: dict[str, DeviceLimits] = {
    "cpu": DeviceLimits("cpu", float8=True, float64=True, max_tensor_bytes=None, fp32_scores=False,
                        oom_texts=("DefaultCPUAllocator: can't allocate memory",), headroom=0.0, pins_host=False,
                        emulated_memory=24 * GiB),
    # CUDA: fused attention kernels never materialise scores; cuDNN's conv3d workspaces, kernels and libraries that
    # load after mem_get_info and allocator fragmentation take ~10% (the plan used 93-98% of free memory before).
    # A failed pinned-host allocation is a plain RuntimeError "CUDA error: out of memory".
    "cuda": DeviceLimits("cuda", float8=True, float64=True, max_tensor_bytes=None, fp32_scores=False,
                         oom_texts=("CUDA out of memory", "CUDA error: out of memory"), headroom=0.10, pins_host=True,
                         emulated_memory=12 * GiB),
    # MPS: no float8 (pytorch#148420; PR #194074 adds it, Sept 2026), no float64 (pytorch#122602), any tensor over
    # 4 GiB aborts the process (pytorch#149261), SDPA returns its score matrix in fp32 (PR #178545), and out of
    # memory is a RuntimeError from MPSAllocator ("MPS backend out of memory"). Memory is unified: 16 GB Macs are
    # the common floor, of which Metal's recommended working set is about 2/3.
    "mps": DeviceLimits("mps", float8=False, float64=False, max_tensor_bytes=4 * GiB, fp32_scores=True,
                        oom_texts=("MPS backend out of memory",), headroom=0.10, pins_host=False,
                        emulated_memory=int(10.7 * GiB),
                        ops_since=(("upsample_bicubic2d", (2, 6)),)),  # bicubic resize (CLIP's squash): PR #136123
}


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is any device's out-of-memory error (each kind raises its own; see ``LIMITS``)."""
    if isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError":
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(m in text for lim in LIMITS.values() for m in lim.oom_texts)
