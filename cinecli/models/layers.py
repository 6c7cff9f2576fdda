"""Linear layers whose stored weight format is decoupled from the dtype they compute in.

Weights are *stored* compactly (bf16/fp16 here; fp8/int4 in the quantization layers) and multiplied in the
dtype of the activations that arrive. On CPUs that only emulate 16-bit GEMMs (``devices.native_matmul``) the
models run float32 activations over 16-bit weights: upcasting the weight per call runs several times faster
than emulated bf16 (bench/dit_step.py). The upcast goes ``UPCAST_CHUNK_ELEMENTS`` weights at a time (a slice
of output rows), so the transient copy stays small (16 MB) instead of the whole matrix (55 MB for a 1.3B FFN).
"""

from __future__ import annotations

from collections.abc import Callable

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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight.dtype == x.dtype:
            return F.linear(x, self.weight, self.bias)
        return chunked_linear(x, lambda r0, r1: self.weight[r0:r1].to(x.dtype), self.out_features, self.in_features, self.bias)
