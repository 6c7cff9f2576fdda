"""The one attention function every model calls, with backends chosen at runtime.

All callers pass ``[B, L, heads, head_dim]`` tensors (the layout the projections produce, and the one
flash-attn wants), so switching backends never changes model code.

Backends:
  - ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` — always available; picks flash /
    memory-efficient / math kernels itself on CUDA and a fused kernel on CPU.
  - ``flash``: the ``flash_attn`` package (FA2/FA3) — used automatically on CUDA in fp16/bf16 when installed.
  - ``sage``: the ``sageattention`` package (INT8 QKᵀ, so not exact; ~2x FA2 by its authors' figures) — used
    automatically on CUDA in fp16/bf16 when installed and flash_attn is not. Neither package is required.
Set ``CINE_ATTENTION=sdpa`` to force the default, or call ``set_backend``. Timing reports name the backends that
ran (``used_backends``). On the CPU SDPA stays: a blocked formulation over bf16 GEMMs was several times slower
and less exact at 4k-10k tokens (bench/attention.py).
"""

from __future__ import annotations

import importlib.util
import os

import torch
import torch.nn.functional as F

_BACKEND: str | None = os.environ.get("CINE_ATTENTION") or None
_HAS_FLASH = importlib.util.find_spec("flash_attn") is not None
_HAS_SAGE = importlib.util.find_spec("sageattention") is not None
_USED: set[str] = set()  # backends that ran in this process, for the timing report


def set_backend(name: str | None) -> None:
    """``'sdpa'``, ``'flash'``, ``'sage'`` or ``None`` (automatic)."""
    global _BACKEND
    if name not in (None, "sdpa", "flash", "sage"):
        raise ValueError(f"unknown attention backend {name!r}")
    if name == "flash" and not _HAS_FLASH:
        raise ValueError("attention backend 'flash' needs the flash_attn package")
    if name == "sage" and not _HAS_SAGE:
        raise ValueError("attention backend 'sage' needs the sageattention package")
    _BACKEND = name


def used_backends() -> list[str]:
    """The attention backends that actually ran in this process (named in timing reports)."""
    return sorted(_USED)


def backend_for(q: torch.Tensor) -> str:
    if _BACKEND is not None:
        return _BACKEND
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        if _HAS_FLASH:
            return "flash"
        if _HAS_SAGE:
            return "sage"
    return "sdpa"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention, scale 1/sqrt(head_dim), with an optional additive logit bias over keys.

    q: [B, Lq, H, D]; k, v: [B, Lk, H, D]; bias: broadcastable to [B, H, Lq, Lk] → [B, Lq, H, D]
    """
    backend = backend_for(q) if bias is None else "sdpa"
    _USED.add(backend)
    if backend == "flash":
        from flash_attn import flash_attn_func  # imported lazily: optional, CUDA only

        return flash_attn_func(q, k, v)
    if backend == "sage":
        from sageattention import sageattn  # optional, CUDA only

        return sageattn(q, k, v, tensor_layout="NHD")  # [B, L, H, D] in and out
    mask = bias.to(q.dtype) if bias is not None else None
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return out.transpose(1, 2)  # [B, Lq, H, D]

