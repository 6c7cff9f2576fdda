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
