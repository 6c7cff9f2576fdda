"""The one attention function every model calls, with backends chosen at runtime.

All callers pass ``[B, heads, L, head_dim]`` tensors, contiguous: the layout PyTorch's SDPA kernels read without
a copy (on the CPU, strided [B, L, H, D] views took 1.12-1.15x the time: bench/attention.py --layouts). flash-attn
takes transposed views of them, sageattention its "HND" layout, so switching backends never changes model code.

Backends:
  - ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` — always available; picks flash /
    memory-efficient / math kernels itself on CUDA and a fused kernel on CPU.
  - ``flash``: the ``flash_attn`` package (FA2/FA3) — used automatically on CUDA in fp16/bf16 when installed.
  - ``sage``: the ``sageattention`` package (INT8 QKᵀ, so not exact; ~2x FA2 by its authors' figures) — used
    automatically on CUDA in fp16/bf16 when installed and flash_attn is not. Neither package is required.
Set ``CINE_ATTENTION=sdpa|flash|sage`` to force one (``choose_backend`` checks it before a run loads anything), or
call ``set_backend``. Timing reports name the backends that
ran (``used_backends``). On the CPU SDPA stays: a blocked formulation over bf16 GEMMs (bench/attention.py) ran at
0.41x SDPA's speed at 10k tokens (0.03-0.23x at 4k) and missed the 1e-2 error bound (bf16 logits), on a shared CPU.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..core.devices import kind
from ..core.errors import UsageError

BACKENDS = ("sdpa", "flash", "sage")
_PACKAGES = {"flash": "flash_attn", "sage": "sageattention"}
_BACKEND: str | None = None  # forced by set_backend / CINE_ATTENTION (choose_backend), else automatic
_IMPORTABLE: dict[str, bool] = {}
_USED: set[str] = set()  # backends that ran in this process, for the timing report


def importable(name: str) -> bool:
    """Whether backend ``name``'s package really imports (once). Being findable is not enough: flash-attn builds for
    another torch ABI or a pre-Ampere card fail at import (Dao-AILab/flash-attention#723, #1832)."""
    if name == "sdpa":
        return True
    if name not in _IMPORTABLE:
        try:
            importlib.import_module(_PACKAGES[name])
            _IMPORTABLE[name] = True
        except Exception:  # noqa: BLE001 - ImportError, OSError (a missing .so), RuntimeError (CUDA arch)
            _IMPORTABLE[name] = False
    return _IMPORTABLE[name]


def set_backend(name: str | None) -> None:
    """``'sdpa'``, ``'flash'``, ``'sage'`` or ``None`` (automatic)."""
    global _BACKEND
    if name not in (None, *BACKENDS):
        raise ValueError(f"unknown attention backend {name!r}")
    if name not in (None, "sdpa") and not importable(name):
        raise ValueError(f"attention backend {name!r} needs the {_PACKAGES[name]} package (it does not import)")
    _BACKEND = name


def choose_backend(device: torch.device | str, env: Mapping[str, str] | None = None) -> list[str]:
    """Settle the backend for a run on ``device`` before anything loads; returns notices for the user.

    ``CINE_ATTENTION`` other than sdpa/flash/sage is a usage error (exit 2). A forced or automatic flash/sage that
    does not import (or a device other than CUDA) falls back to SDPA with one notice, now rather than at the first
    attention call after minutes of loading.
    """
    global _BACKEND
    value = ((os.environ if env is None else env).get("CINE_ATTENTION") or "").strip().lower() or None
    if value not in (None, *BACKENDS):
        raise UsageError(f"CINE_ATTENTION={value!r}: must be one of {', '.join(BACKENDS)}")
    if value in (None, "sdpa"):
        _BACKEND = value
        return []
    if kind(device) != "cuda":
        _BACKEND = "sdpa"
        return [f"notice: CINE_ATTENTION={value} runs on CUDA only; using PyTorch SDPA on {device}"]
    if not importable(value):
        _BACKEND = "sdpa"
        return [f"notice: CINE_ATTENTION={value} but {_PACKAGES[value]} does not import here; using PyTorch SDPA"]
    _BACKEND = value
    return []


def used_backends() -> list[str]:
    """The attention backends that actually ran in this process (named in timing reports)."""
    return sorted(_USED)


def backend_for(q: torch.Tensor) -> str:
    if _BACKEND is not None:
        return _BACKEND
    if q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        for name in ("flash", "sage"):
            if importable(name):
                return name
    return "sdpa"


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention, scale 1/sqrt(head_dim), with an optional additive logit bias over keys.

    q: [B, H, Lq, D]; k, v: [B, H, Lk, D]; bias: broadcastable to [B, H, Lq, Lk] → [B, H, Lq, D]
    """
    backend = backend_for(q) if bias is None else "sdpa"
    _USED.add(backend)
    if backend == "flash":
        from flash_attn import flash_attn_func  # imported lazily: optional, CUDA only

        # flash-attn wants [B, L, H, D] with a unit-stride last dim: transposed views are that, no copy
        return flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)
    if backend == "sage":
        from sageattention import sageattn  # optional, CUDA only

        return sageattn(q, k, v, tensor_layout="HND")  # [B, H, L, D] in and out
    mask = bias.to(q.dtype) if bias is not None else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, Lq, D]

