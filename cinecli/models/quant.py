"""Weight-only quantized linear layers: FP8 e4m3 and INT8 per output channel, INT4 group-wise, packed two per byte.

Activations stay 16-bit (or fp32 on CPUs without native bf16); each forward dequantizes the one weight it needs
into the activation dtype and frees it after the matmul, so no full-precision copy of the model ever exists
(a layer called over many token chunks holds its one dequantized weight for the chunks: layers.weights_held).

``QuantLinear`` subclasses ``layers.Linear`` (so ``nn.Linear``): peft wraps it like any linear layer and calls
its forward for the base output, which is why effect LoRAs work on quantized backbones unchanged — the adapter
adds its low-rank term in the activation dtype; nothing is ever merged into quantized weights.

Storage (state-dict keys, same names as lightx2v / ComfyUI use for per-channel formats):
  fp8   weight float8_e4m3fn [out, in],      weight_scale float32 [out, 1]      W ≈ q · s,  s = amax/448
  int8  weight int8 [out, in],               weight_scale float32 [out, 1]      W ≈ q · s,  s = amax/127
  int4  weight uint8 [out, in/2] (lo nibble = even column), weight_scale float16 [out, in/g]   q ∈ [-8, 7], s = amax/7
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from .layers import Linear

FORMATS = ("fp8", "int8", "int4")
FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
# FP8 GEMMs (torch._scaled_mm) for fp8 layers on CUDA GPUs with FP8 tensor cores and row-wise scaling (Hopper, sm90+).
# Opt-in (CINE_FP8_MATMUL=1) until bench/speed.py has measured it faster than dequantize + bf16 GEMM on a GPU:
# no GPU was available when it was written, so it has only been checked for numerics (through the CPU kernel).
FP8_MATMUL = os.environ.get("CINE_FP8_MATMUL") == "1"


def parse_format(fmt: str) -> tuple[str, int]:
    """'int4' / 'int4g64' / 'int4g128' → ('int4', group); 'fp8' → ('fp8', 0)."""
    if fmt.startswith("int4"):
        return "int4", int(fmt[len("int4g"):]) if fmt.startswith("int4g") else 64
    if fmt not in FORMATS:
        raise ValueError(f"unknown weight format {fmt!r} (fp8, int8, int4, int4gN)")
    return fmt, 0


# --- quantize / dequantize (pure functions on tensors) ---------------------------------------------------------------
def quantize(weight: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [out, in] (any float dtype) → (stored weight, scale) in the layout above. Math in float32."""
    kind, group = parse_format(fmt)
    w = weight.float()
    if kind in ("fp8", "int8"):
        qmax = FP8_MAX if kind == "fp8" else 127.0
        scale = w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / qmax  # [out, 1]
        q = w / scale
        q = q.to(FP8) if kind == "fp8" else q.round().clamp(-128, 127).to(torch.int8)
        return q, scale
    out, inp = w.shape
    if inp % group or group % 2:
        raise ValueError(f"INT4 group {group} must divide the input width {inp}")
    g = w.view(out, inp // group, group)
    scale = (g.abs().amax(dim=2, keepdim=True).clamp(min=1e-12) / 7.0).half()  # [out, in/g, 1]
    q = (g / scale.float()).round().clamp(-8, 7).to(torch.int8).view(out, inp)  # [out, in]
    u = (q + 8).to(torch.uint8)  # 0..15
    packed = u[:, 0::2] | (u[:, 1::2] << 4)  # [out, in/2]
    return packed, scale.squeeze(2)


def fp8_bits_to_half(q: torch.Tensor) -> torch.Tensor:
    """float8 e4m3fn → float16 holding value·2⁻⁸, by moving bits (exact for every finite code, subnormals too).

    e4m3 (bias 7) placed into fp16's low exponent bits (bias 15) is the same number times 2⁻⁸. Integer ops run
    on every device — MPS has no float8 — and 2.6x faster than torch's float8 cast on the CPU.
    """
    b = q.view(torch.uint8).to(torch.int16)
    return (((b & 0x80) << 8) | ((b & 0x7F) << 7)).view(torch.float16)


def dequantize(q: torch.Tensor, scale: torch.Tensor, fmt: str, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of ``quantize`` → [out, in] in ``dtype``."""
    kind, group = parse_format(fmt)
    if kind == "fp8":
        return fp8_bits_to_half(q).to(dtype) * (scale.to(dtype) * 256)
    if kind == "int8":
        return q.to(dtype) * scale.to(dtype)
    out = q.shape[0]
    lo = (q & 0x0F).to(torch.int8) - 8
    hi = (q >> 4).to(torch.int8) - 8
    w = torch.stack([lo, hi], dim=-1).view(out, -1, group)  # [out, in/g, g], columns back in order
    return (w.to(dtype) * scale.to(dtype).unsqueeze(-1)).view(out, -1)


def fp8_linear(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """y = x Wᵀ + b computed in FP8: x quantized to e4m3 per row (per token, LightX2V's scheme), W as stored.

    x: [..., in] bf16; q: [out, in] float8_e4m3fn; scale: [out, 1] float32 → [..., out] in x.dtype
    """
    x2 = x.reshape(-1, x.shape[-1])  # [M, in]
    xs = x2.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX  # [M, 1]
    xq = (x2.float() / xs).to(FP8)
    y = torch._scaled_mm(xq, q.t(), scale_a=xs, scale_b=scale.float().t().contiguous(),
                         bias=bias.to(x.dtype) if bias is not None else None, out_dtype=x.dtype)  # [M, out]
    return y.reshape(*x.shape[:-1], q.shape[0])


def fp8_matmul_supported(x: torch.Tensor) -> bool:
    """Row-wise-scaled FP8 GEMMs: CUDA compute capability 9.0+ (H100/H200), bf16 activations, sizes multiple of 16."""
    return (FP8_MATMUL and x.is_cuda and x.dtype == torch.bfloat16 and x.shape[-1] % 16 == 0
            and torch.cuda.get_device_capability(x.device) >= (9, 0))


# --- the layer -------------------------------------------------------------------------------------------------------
class QuantLinear(Linear):
    """A linear layer whose ``weight`` is stored quantized (see module doc); bias stays 16/32-bit."""

    def __init__(self, in_features: int, out_features: int, fmt: str, bias: bool = True, device=None):
        nn.Module.__init__(self)  # skip nn.Linear's float weight allocation
        self.in_features, self.out_features, self.fmt = in_features, out_features, fmt
        kind, group = parse_format(fmt)
        if kind == "int4":
            wshape, sshape, wdtype, sdtype = (out_features, in_features // 2), (out_features, in_features // group), torch.uint8, torch.float16
        else:
            wshape, sshape, wdtype, sdtype = (out_features, in_features), (out_features, 1), FP8 if kind == "fp8" else torch.int8, torch.float32
        self.weight = nn.Parameter(torch.empty(wshape, dtype=wdtype, device=device), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(sshape, dtype=sdtype, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_linear(cls, layer: nn.Linear, fmt: str) -> QuantLinear:
        q, scale = quantize(layer.weight.data, fmt)
        new = cls(layer.in_features, layer.out_features, fmt, bias=layer.bias is not None, device="meta")
        new.weight = nn.Parameter(q, requires_grad=False)
        new.weight_scale = nn.Parameter(scale, requires_grad=False)
        if layer.bias is not None:
            new.bias = nn.Parameter(layer.bias.data, requires_grad=False)
        return new

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.weight, self.weight_scale, self.fmt, dtype)

    def rows(self, r0: int, r1: int, dtype: torch.dtype) -> torch.Tensor:
        # Linear.forward asks for a slice of output rows at a time (never a whole full-precision weight in
        # memory), or for all rows once inside layers.weights_held
        return dequantize(self.weight[r0:r1], self.weight_scale[r0:r1], self.fmt, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fmt == "fp8" and self.out_features % 16 == 0 and fp8_matmul_supported(x):
            return fp8_linear(x, self.weight, self.weight_scale, self.bias)
        return super().forward(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}"


def swap_in(model: nn.Module, formats: dict[str, str], meta: bool = False) -> nn.Module:
    """Replace the named linear modules by QuantLinear: quantizing their weights, or (``meta``) empty for loading."""
    for name, fmt in formats.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child)
        if meta:
            new = QuantLinear(layer.in_features, layer.out_features, fmt, bias=layer.bias is not None, device="meta")
        else:
            new = QuantLinear.from_linear(layer, fmt)
        setattr(parent, child, new)
    return model
