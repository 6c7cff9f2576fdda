"""Linear layers whose stored weight format is decoupled from the dtype they compute in.

Weights are *stored* compactly (bf16/fp16 here; fp8/int4 in the quantization layers) and multiplied in the
dtype of the activations that arrive. On CPUs that only emulate 16-bit GEMMs (``devices.native_matmul``) the
models run float32 activations over 16-bit weights: upcasting the weight per call runs several times faster
than emulated bf16 (bench/dit_step.py). The upcast goes ``UPCAST_CHUNK_ELEMENTS`` weights at a time (a slice
of output rows), so the transient copy stays small (16 MB) instead of the whole matrix (55 MB for a 1.3B FFN).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

UPCAST_CHUNK_ELEMENTS = 1 << 22


def chunked_linear(x: torch.Tensor, rows: Callable[[int, int], torch.Tensor], out_features: int, in_features: int,
                   bias: torch.Tensor | None) -> torch.Tensor:
    """y = x Wᵀ + b where ``rows(r0, r1)`` gives W[r0:r1] in ``x.dtype``, ``UPCAST_CHUNK_ELEMENTS`` weights at a time.

    Used by every layer whose stored weight is not in the activation dtype (16-bit on an fp32-activation CPU,
    fp8/int8/int4 in quant.py): only one slice of the converted weight ever exists.
    """
    step = max(1, UPCAST_CHUNK_ELEMENTS // in_features)
    if step >= out_features:
        return F.linear(x, rows(0, out_features), bias.to(x.dtype) if bias is not None else None)
    out = x.new_empty(*x.shape[:-1], out_features)
    for r in range(0, out_features, step):
        b = bias[r:r + step].to(x.dtype) if bias is not None else None
        out[..., r:r + step] = F.linear(x, rows(r, r + step), b)
    return out


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys, peft-compatible) that computes in its input's dtype."""

    _held: torch.Tensor | None = None  # the whole weight in the activation dtype, inside ``weights_held`` only
    _hold: bool = False

    def rows(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        """W[r0:r1] in ``dtype`` (quantized layers override this with their dequantization)."""
        return self.weight[r0:r1].to(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == x.dtype:
            return F.linear(x, self.weight, self.bias)
        if self._hold:
            if self._held is None or self._held.dtype != x.dtype:
                self._held = self.rows(0, self.out_features, x.dtype)
            return F.linear(x, self._held, self.bias.to(x.dtype) if self.bias is not None else None)
        return chunked_linear(x, lambda r0, r1: self.rows(r0, r1, x.dtype), self.out_features, self.in_features, self.bias)


@contextlib.contextmanager
def weights_held(module: nn.Module, enabled: bool = True) -> Iterator[None]:
    """Weight-stationary calls: inside, each ``Linear`` under ``module`` converts (upcasts or dequantizes) its weight
    once, on first use, and reuses it for every later call; the copies are freed on exit.

    For a layer called many times in one pass — the FFN over token chunks (wan_dit.Block) — this replaces one
    conversion per chunk (43 per FFN layer at 20k tokens) by one. Why a held copy rather than chunking over output
    rows or the FFN's hidden width: it keeps the token chunking (and so the bounded hidden activation) and
    gives bit-identical results to the per-chunk path, for the memory of one layer's weight in the activation
    dtype (1.3B FFN: 2 × 27.5 MB in bf16; 14B: 2 × 142 MB), only while the block runs. Measured in
    bench/speed.py; see the issue-10 note in the commit log.
    """
    layers = [m for m in module.modules() if isinstance(m, Linear)] if enabled else []
    for m in layers:
        m._hold = True
    try:
        yield
    finally:
        for m in layers:
            m._hold, m._held = False, None
