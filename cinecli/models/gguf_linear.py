"""GGUF block-quantized linear layers: the GGML bytes stay in memory, each call dequantizes a slice of rows.

Per call, not converted at load, chosen by measurement (bench/gguf_layer.py: one 5120→13824 14B FFN layer, 4096
bf16 tokens, 2 threads of a CPU with native bf16 shared with other jobs, all side by side in one run):

  layout held in memory              MiB   matmul time
  bf16 (convert at load)             135   1.00x
  cine int4-g64 (convert at load)     36   2.29x   (a second rounding on top of GGUF's: Q4_K's 6-bit
  GGUF Q8_0 per call                  72   2.94x    sub-block scales and mins have no INT4-g64 equivalent)
  GGUF Q4_K per call                  38   4.51x
  GGUF Q3_K per call                  29   4.81x

Memory decides: a 14B DiT is ~8 GB as Q4_K (4.5 bits/weight) and 28 GB as bf16, and Q3/Q4 files exist to fit
8-12 GB cards, so converting to bf16 defeats them; converting to cine's INT4 keeps the memory and saves decode time, but changes
the weights the user chose (not exact). The decode cost is per call and per weight, so it shrinks relative to
the matmul as tokens grow (a 480p 49-frame clip is ~20,000 tokens) and on GPUs, where decoding is memory-bound.

Block layouts are GGML's (ggml-common.h), decoded with integer ops in PyTorch on any device; every decoder
matches ``gguf.quants.dequantize`` bit for bit in float32 (tests/test_gguf.py), doing the same float32 products
in the same order: (d·scale)·q − (dmin·min).

  Q8_0  32/block: d f16, q int8[32]                                     w = q·d
  Q4_0  32/block: d f16, nibbles[16] (low = 0..15, high = 16..31)      w = d·(q − 8)
  Q4_1  32/block: d f16, m f16, nibbles[16]                              w = d·q + m
  Q5_0  32/block: d f16, qh u32 (bit j = 5th bit of element j), nibbles  w = d·(q − 16)
  Q5_1  32/block: d f16, m f16, qh u32, nibbles                          w = d·q + m
  Q4_K  256/block: d, dmin f16, 12 bytes of 6-bit scales/mins (8 × 32), nibbles[128]
  Q5_K  256/block: as Q4_K plus qh[32] (bit s of qh[l] = 5th bit of element l of sub-block s)
  Q6_K  256/block: ql[128] low nibbles, qh[64] 2-bit highs, int8 scales[16] (per 16), d f16      w = d·s·(q − 32)
  Q3_K  256/block: hmask[32], qs[64] 2-bit, 12 bytes of 6-bit scales (16 × 16, minus 32), d f16  w = d·s·(q − 4·!h)
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .layers import Linear, chunked_linear

# type → (weights per block, bytes per block)
BLOCKS = {"Q8_0": (32, 34), "Q4_0": (32, 18), "Q4_1": (32, 20), "Q5_0": (32, 22), "Q5_1": (32, 24),
          "Q4_K": (256, 144), "Q5_K": (256, 176), "Q6_K": (256, 210), "Q3_K": (256, 110)}


def _f16(b: torch.Tensor, at: int) -> torch.Tensor:
    """Bytes at..at+1 of each block [N, size] as float16 → float32 [N, 1]."""
    return b[:, at:at + 2].contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:
    """[N, k] bytes → [N, 2k]: the low nibbles, then the high nibbles (GGML's order within a 32-block)."""
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1)


def _bits(word: torch.Tensor, n: int) -> torch.Tensor:
    """[N, 4] little-endian bytes of a u32 → its n low bits [N, n] (0/1, uint8)."""
    shifts = torch.arange(8, device=word.device, dtype=torch.uint8)
    return ((word[:, :, None] >> shifts) & 1).reshape(word.shape[0], 32)[:, :n]


def _k_scales_mins(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K: 12 bytes [N, 12] → 8 six-bit scales and 8 six-bit mins [N, 8] (float32).

    Bytes 0-3: scales 0-3 (low 6 bits); 4-7: mins 0-3; 8-11: low nibble = scale 4-7, high nibble = min 4-7, whose
    top 2 bits sit in the top bits of bytes 0-3 (scales) and 4-7 (mins).
    """
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    scales = torch.cat([d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)], dim=1)
    mins = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=1)
    return scales.float(), mins.float()


def _q4_k_low(qs: torch.Tensor) -> torch.Tensor:
    """128 bytes → 8 sub-blocks × 32 nibbles: 4 chunks of 32 bytes, low nibbles first, then high."""
    q = qs.reshape(-1, 4, 1, 32)
    return torch.cat([q & 0x0F, q >> 4], dim=2).reshape(-1, 8, 32)


def dequantize_blocks(b: torch.Tensor, kind: str) -> torch.Tensor:
    """Blocks [N, bytes per block] uint8 → weights [N, weights per block] float32."""
    n = b.shape[0]
    if kind == "Q8_0":
        return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b, 0)
    if kind == "Q4_0":
        return _f16(b, 0) * (_nibbles(b[:, 2:]).to(torch.int8) - 8).float()
    if kind == "Q4_1":
        return _f16(b, 0) * _nibbles(b[:, 4:]).float() + _f16(b, 2)
    if kind in ("Q5_0", "Q5_1"):
        at = 2 if kind == "Q5_0" else 4
        q = _nibbles(b[:, at + 4:]) | (_bits(b[:, at:at + 4], 32) << 4)  # [N, 32] in 0..31
        if kind == "Q5_0":
            return _f16(b, 0) * (q.to(torch.int8) - 16).float()
        return _f16(b, 0) * q.float() + _f16(b, 2)
    if kind in ("Q4_K", "Q5_K"):
        scales, mins = _k_scales_mins(b[:, 4:16])
        d = (_f16(b, 0) * scales)[:, :, None]  # [N, 8, 1]
        dm = (_f16(b, 2) * mins)[:, :, None]
        if kind == "Q4_K":
            q = _q4_k_low(b[:, 16:144])
        else:
            qh = b[:, 16:48]  # bit s of qh[l]: 5th bit of element l of sub-block s
            high = (qh[:, None, :] >> torch.arange(8, device=b.device, dtype=torch.uint8)[None, :, None]) & 1
            q = _q4_k_low(b[:, 48:176]) | (high << 4)
        return (d * q.float() - dm).reshape(n, 256)
    if kind == "Q6_K":
        ql = b[:, 0:128].reshape(n, 2, 2, 32)  # [half, first|second 32 bytes, l]
        qh = b[:, 128:192].reshape(n, 2, 1, 32)
        low = torch.cat([ql & 0x0F, ql >> 4], dim=2)  # [N, 2, 4, 32]: groups 0..3 of each half of 128
        shifts = torch.tensor([0, 2, 4, 6], device=b.device, dtype=torch.uint8).view(1, 1, 4, 1)
        q = (low | (((qh >> shifts) & 3) << 4)).to(torch.int8) - 32  # [N, 2, 4, 32]
        d = (_f16(b, 208) * b[:, 192:208].contiguous().view(torch.int8).float())[:, :, None]  # [N, 16, 1]
        return (d * q.reshape(n, 16, 16).float()).reshape(n, 256)
    if kind == "Q3_K":
        hmask, qs, s = b[:, 0:32], b[:, 32:96].reshape(n, 2, 1, 32), b[:, 96:108]
        low4 = torch.cat([s[:, 0:8] & 0x0F, s[:, 0:8] >> 4], dim=1)  # [N, 16]
        shifts4 = torch.tensor([0, 2, 4, 6], device=b.device, dtype=torch.uint8)
        high2 = (s[:, None, 8:12] >> shifts4[None, :, None]) & 3  # [N, 4, 4]: scale i's top bits at [i // 4, i % 4]
        scales = ((low4 | (high2.reshape(n, 16) << 4)).to(torch.int8) - 32).float()
        q = (qs >> shifts4.view(1, 1, 4, 1)) & 3  # [N, 2, 4, 32]: half, shift group, l
        h = (hmask[:, None, None, :] >> torch.arange(8, device=b.device, dtype=torch.uint8).view(1, 2, 4, 1)) & 1
        q = q.to(torch.int8) - ((1 - h).to(torch.int8) << 2)  # minus 4 where the high bit is clear
        d = (_f16(b, 108) * scales)[:, :, None]  # [N, 16, 1]
        return (d * q.reshape(n, 16, 16).float()).reshape(n, 256)
    raise ValueError(f"unknown GGUF block type {kind}")


def dequantize_rows(raw: torch.Tensor, kind: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """raw [rows, row_bytes] uint8 → [rows, row_bytes / bytes per block · weights per block] in ``dtype``."""
    per_block, size = BLOCKS[kind]
    rows = raw.shape[0]
    return dequantize_blocks(raw.reshape(-1, size), kind).reshape(rows, -1).to(dtype)


class GGUFLinear(Linear):
    """A linear layer whose ``weight`` is GGML blocks (uint8 [out, in / block · bytes]); bias stays 16/32-bit.

    Subclasses ``layers.Linear`` (an ``nn.Linear``) like ``QuantLinear``, so peft wraps it for effect LoRAs.
    """

    def __init__(self, in_features: int, out_features: int, kind: str, bias: bool = True, device=None):
        nn.Module.__init__(self)  # no float weight allocation
        per_block, size = BLOCKS[kind]
        if in_features % per_block:
            raise ValueError(f"{kind} needs the input width to be a multiple of {per_block}, got {in_features}")
        self.in_features, self.out_features, self.fmt = in_features, out_features, kind
        self.weight = nn.Parameter(torch.empty(out_features, in_features // per_block * size, dtype=torch.uint8, device=device),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, device=device), requires_grad=False) if bias else None
        # Merged LoRAs (the backbone's distill LoRA) stay factored: GGML blocks cannot be re-quantized here, and a
        # dense delta per layer would cost what bf16 weights cost. Each: (down [r, in], scale·up [out, r]).
        self.low_rank: list[tuple[torch.Tensor, torch.Tensor]] = []

    def merge_low_rank(self, down: torch.Tensor, up: torch.Tensor, scale: float) -> None:
        device = self.weight.device
        self.low_rank.append((down.to(device), (up.float() * scale).to(up.dtype).to(device)))

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_rows(self.weight, self.fmt, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = lambda r0, r1: dequantize_rows(self.weight[r0:r1], self.fmt, x.dtype)  # noqa: E731
        y = chunked_linear(x, rows, self.out_features, self.in_features, self.bias)
        for down, up in self.low_rank:
            y = y + F.linear(F.linear(x, down.to(x.dtype)), up.to(x.dtype))
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fmt={self.fmt}"


def swap_in_gguf(model: nn.Module, kinds: dict[str, str]) -> nn.Module:
    """Replace the named linear modules by empty (meta) GGUFLinear layers of the given GGML types, for loading."""
    for name, kind in kinds.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = getattr(parent, child)
        setattr(parent, child, GGUFLinear(layer.in_features, layer.out_features, kind, bias=layer.bias is not None, device="meta"))
    return model
