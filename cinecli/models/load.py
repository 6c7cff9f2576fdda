"""Lean loading of modules from any weight source, shared by every component loader.

The module is built on the ``meta`` device (no memory), then each tensor is read from the memory map, cast
straight to its target dtype and device, and assigned: a 16-bit checkpoint never exists as an fp32 copy, and
peak memory stays near the size of the loaded model.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn as nn

from ..errors import WeightsError


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
        value = tensor.to(device=device, dtype=dtype_for(name, tensor))
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
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        pass


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
