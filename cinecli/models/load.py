"""Lean loading of modules from any weight source, shared by every component loader.

The module is built on the ``meta`` device (no memory), then each tensor is read from the memory map, cast
straight to its target dtype and device, and assigned: a 16-bit checkpoint never exists as an fp32 copy, and
peak memory stays near the size of the loaded model.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn

from ..core.devices import to_device
from ..core.errors import WeightsError


def build_empty(factory: Callable[[], nn.Module]) -> nn.Module:
    """Instantiate a module without allocating its parameters."""
    with torch.device("meta"):
        return factory()


def _few(names: list[str], n: int = 4) -> str:
    shown = ", ".join(names[:n])
    return f"{shown} (+{len(names) - n} more)" if len(names) > n else shown


def assign_tensors(
    module: nn.Module,
    tensors: Iterable[tuple[str, torch.Tensor]],
    *,
    device: torch.device | str,
    dtype_for: Callable[[str, torch.Tensor], torch.dtype],
    what: str,
    copy: bool = False,
) -> nn.Module:
    """Fill a meta-device ``module`` from canonical ``(name, tensor)`` pairs; every parameter must be covered.

    ``dtype_for(name, tensor)`` chooses each parameter's dtype. ``copy`` makes sure no parameter aliases a given
    tensor (for in-memory state dicts: LoRA merges change weights in place). Raises ``WeightsError`` naming
    missing, unexpected and mis-shaped keys.
    """
    expected = dict(module.state_dict(keep_vars=True))
    loaded: dict[str, torch.Tensor] = {}
    unexpected: list[str] = []
    bad_shape: list[str] = []
    bad_names: set[str] = set()
    for name, tensor in tensors:
        target = expected.get(name)
        if target is None:
            unexpected.append(name)
            continue
        if tuple(tensor.shape) != tuple(target.shape):
            bad_shape.append(f"{name} {tuple(tensor.shape)}≠{tuple(target.shape)}")
            bad_names.add(name)
            continue
        value = to_device(tensor, device, dtype_for(name, tensor))  # fp8 as bits where the device has no float8
        loaded[name] = value.clone() if copy and value.data_ptr() == tensor.data_ptr() else value
    missing = [k for k in expected if k not in loaded and k not in bad_names]
    problems = []
    if bad_shape:
        problems.append(f"wrong shape: {_few(bad_shape, 2)}")
    if missing:
        problems.append(f"{len(missing)} missing: {_few(missing)}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected: {_few(unexpected)}")
    if bad_shape or missing:  # unexpected alone is only fatal when something is also missing
        raise WeightsError(f"{what} does not match the model: " + "; ".join(problems))
    if unexpected:
        raise WeightsError(f"{what} has keys the model does not know: " + "; ".join(problems))
    module.load_state_dict(loaded, assign=True, strict=True)
    return module.eval().requires_grad_(False)


def trim_heap() -> None:
    """Give the heap glibc keeps after large frees back to the system (``malloc_trim``); a no-op elsewhere.

    Quantizing a model or freeing an encoder frees gigabytes in pieces glibc keeps for reuse: RSS would stay up.
    """
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass


@functools.cache
def _libc():
    """The C library's symbols (looked up once: trim_heap runs after every VAE chunk and streamed block)."""
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def release_source(module: nn.Module) -> nn.Module:
    """Detach a loaded module from its checkpoint file, after quantizing at load.

    Parameters stored in the file's dtype are zero-copy views of the memory-mapped file. Once the large weights are
    quantized (new memory), only small ones (norms, biases, embeddings, the head) still point into the file, yet
    they keep the whole mapping alive — and every page quantizing read stays resident (3 GB for the 1.3B DiT).
    Copying those into their own memory lets the file be unmapped; ``trim_heap`` returns quantization's scratch.
    """
    from .quant import QuantLinear

    fresh = {id(t) for m in module.modules() if isinstance(m, QuantLinear) for t in (m.weight, m.weight_scale)}
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if id(t) not in fresh:
                t.data = t.data.clone()
    import gc

    gc.collect()
    trim_heap()
    return module


# --- resident pages of memory-mapped weights ------------------------------------------------------------------------
_PAGE = 4096
_MADV_DONTNEED = 4
_FILE_PAGE = 1 << 61  # /proc/self/pagemap: the page is a file page (not a private copy made by a write)
_PRESENT = 1 << 63


def _storage_ranges(objs) -> list[tuple[int, int]]:
    """Merged, sorted [start, end) address ranges of the CPU storages behind modules' parameters and buffers."""
    seen: dict[int, int] = {}
    for obj in objs:
        tensors = [*obj.parameters(), *obj.buffers()] if isinstance(obj, nn.Module) else [obj]
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and not t.is_meta:
                s = t.untyped_storage()
                if s.nbytes():
                    seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
    merged: list[list[int]] = []
    for start, size in sorted(seen.items()):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], start + size)
        else:
            merged.append([start, start + size])
    return [(a, b) for a, b in merged]


def _file_mappings() -> list[tuple[int, int]]:
    """[start, end) of this process's file-backed mappings (/proc/self/maps rows with an inode)."""
    out = []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):
                a, b = (int(v, 16) for v in fields[0].split("-"))
                out.append((a, b))
    return out


def release_pages(*objs) -> int:
    """Drop this process's resident pages of memory-mapped weights (modules or tensors); returns bytes released.

    Weights loaded zero-copy from a checkpoint (safetensors, ``torch.load(mmap=True)``, cine's quantized DiT) are
    file pages: once a stage is done with a component (CLIP after the image encode, the DiT before the VAE
    decode, each DiT block when streamed on the CPU) they can leave the process. ``madvise(MADV_DONTNEED)`` unmaps
    them; they stay in the page cache while RAM allows, so the next use refaults them at memory speed, and a
    machine short of RAM re-reads them from disk instead of swapping. Only unmodified file pages are dropped
    (``/proc/self/pagemap`` says which): a page a LoRA merge wrote is a private copy and stays. Linux only; a
    no-op elsewhere and for memory that is not file-backed (the GPU, pinned or heap tensors).
    """
    if sys.platform != "linux":
        return 0
    import ctypes
    import struct

    try:
        maps = _file_mappings()
        libc = _libc()
        pagemap = open("/proc/self/pagemap", "rb")
    except OSError:
        return 0
    released = 0
    with pagemap:
        for start, end in _storage_ranges(objs):
            for m0, m1 in maps:
                a, b = max(start, m0), min(end, m1)
                a, b = -(-a // _PAGE) * _PAGE, b // _PAGE * _PAGE  # whole pages inside the weights only
                if a >= b:
                    continue
                pagemap.seek(a // _PAGE * 8)
                flags = struct.unpack(f"<{(b - a) // _PAGE}Q", pagemap.read((b - a) // _PAGE * 8))
                run = None  # first page of the current run of droppable pages
                for i, bits in enumerate((*flags, _PRESENT)):  # a sentinel written page closes the last run
                    keep = bits & _PRESENT and not bits & _FILE_PAGE
                    if not keep and run is None:
                        run = i
                    elif keep and run is not None:
                        n = (i - run) * _PAGE
                        if libc.madvise(ctypes.c_void_p(a + run * _PAGE), ctypes.c_size_t(n), _MADV_DONTNEED) == 0:
                            released += sum(_PAGE for f in flags[run:i] if f & _PRESENT)
                        run = None
    return released
