"""Linear layers whose stored weight format is decoupled from the dtype they compute in.

Weights are *stored* compactly (bf16/fp16 here; fp8/int4 in the quantization layers) and multiplied in the
dtype of the activations that arrive. On CPUs that only emulate 16-bit GEMMs (``devices.native_matmul``) the
models run float32 activations over 16-bit weights: upcasting the weight per call runs several times faster
than emulated bf16 (bench/dit_step.py). The upcast goes ``UPCAST_CHUNK_ELEMENTS`` weights at a time (a slice
of output rows), so the transient copy stays small (16 MB) instead of the whole matrix (55 MB for a 1.3B FFN).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

UPCAST_CHUNK_ELEMENTS = 1 << 22


def upcast_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear with ``weight``/``bias`` converted to ``x.dtype`` a slice of output rows at a time."""
    out_features, in_features = weight.shape
    rows = max(1, UPCAST_CHUNK_ELEMENTS // in_features)
    if rows >= out_features:
        return F.linear(x, weight.to(x.dtype), bias.to(x.dtype) if bias is not None else None)
    out = x.new_empty(*x.shape[:-1], out_features)
    for r in range(0, out_features, rows):
        b = bias[r:r + rows].to(x.dtype) if bias is not None else None
        out[..., r:r + rows] = F.linear(x, weight[r:r + rows].to(x.dtype), b)
    return out


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys, peft-compatible) that computes in its input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == x.dtype:
            return F.linear(x, self.weight, self.bias)
        return upcast_linear(x, self.weight, self.bias)
