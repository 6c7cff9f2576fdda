"""Linear layers whose stored weight format is decoupled from the dtype they compute in.

Weights are *stored* compactly (bf16/fp16 here; fp8/int4 in the quantization layers) and multiplied in the
dtype of the activations that arrive. On CPUs that only emulate 16-bit GEMMs (``devices.native_matmul``) the
models run float32 activations over 16-bit weights: upcasting one weight per call costs a transient copy of
that one matrix and runs several times faster than emulated bf16 (bench/dit_step.py).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters and state-dict keys, peft-compatible) that computes in its input's dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight, self.bias
        if weight.dtype != x.dtype:
            weight = weight.to(x.dtype)
            bias = bias.to(x.dtype) if bias is not None else None
        return F.linear(x, weight, bias)
