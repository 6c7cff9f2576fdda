"""Exact self-attention on the CPU at video sizes: torch's SDPA against a blocked formulation over bf16 GEMMs.

    .venv/bin/python bench/attention.py                         # 12 heads x 128 (1.3B width), 10,000 and 20,000 tokens
    .venv/bin/python bench/attention.py --tokens 2000 --repeats 1   # quick
    .venv/bin/python bench/attention.py --layouts --tokens 7800 20280   # the layouts SDPA is called on (issue 23)

--layouts times SDPA on the same data in three layouts: strided [B, L, H, D] views in query chunks of 4M/width
tokens (cine before issue 23), contiguous [B, H, L, D] in the same chunks, and contiguous in one call.

Each variant runs on the same random q, k, v (bf16, RMS-normed like the DiT's, logit spread set by --logit-std),
interleaved, best of --repeats; error is max|Δ| / max|ref| against a float32 reference computed in blocks.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F


def sdpa(q, k, v):
    return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


def blocked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block: int = 256) -> torch.Tensor:
    """Exact softmax attention as plain GEMMs, one head and ``block`` queries at a time (tried; slower than SDPA here, so not in cinecli).

    q: [B, Lq, H, D]; k, v: [B, Lk, H, D] → [B, Lq, H, D]. Each tile: S = (q·scale) Kᵀ [block, Lk], softmax over
    the full key row (so no online rescaling is needed), then P V — the bf16 GEMMs run on AMX where present.
    """
    b, lq, h, d = q.shape
    qs = (q.float() * d**-0.5).to(q.dtype).transpose(1, 2)  # [B, H, Lq, D]
    kt, vt = k.transpose(1, 2), v.transpose(1, 2).contiguous()  # [B, H, Lk, D]
    out = q.new_empty(b, h, lq, d)
    for i in range(b):
        for j in range(h):
            k_t = kt[i, j].t().contiguous()  # [D, Lk]
            for s in range(0, lq, block):
                torch.matmul(torch.softmax(qs[i, j, s:s + block] @ k_t, dim=-1), vt[i, j], out=out[i, j, s:s + block])
    return out.transpose(1, 2)


def layout_variants(q, k, v, step: int) -> dict:
    """q, k, v: [B, L, H, D] → the ways cine has called SDPA on them (each returns [B, L, H, D])."""
    qc, kc, vc = (t.transpose(1, 2).contiguous() for t in (q, k, v))  # [B, H, L, D]
    n = q.shape[1]

    def strided_chunks():
        kt, vt = k.transpose(1, 2), v.transpose(1, 2)
        return torch.cat([F.scaled_dot_product_attention(q[:, s:s + step].transpose(1, 2), kt, vt)
                          for s in range(0, n, step)], dim=2).transpose(1, 2)

    def contiguous_chunks():
        return torch.cat([F.scaled_dot_product_attention(qc[:, :, s:s + step], kc, vc)
                          for s in range(0, n, step)], dim=2).transpose(1, 2)

    return {"strided chunks": strided_chunks, "contiguous chunks": contiguous_chunks,
            "contiguous whole": lambda: F.scaled_dot_product_attention(qc, kc, vc).transpose(1, 2)}


def reference(q, k, v, block: int = 1024) -> torch.Tensor:
    """float32 attention, in query blocks (a 20k x 20k fp32 score matrix per head would be 1.6 GB)."""
    q, k, v = (t.float().transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
    out = torch.empty_like(q)
    for s in range(0, q.shape[2], block):
        out[:, :, s:s + block] = torch.softmax(q[:, :, s:s + block] @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, -1) @ v
    return out.transpose(1, 2)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[10000, 20000])
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--blocks", type=int, nargs="+", default=[64, 256], help="query block sizes of the blocked variant")
    p.add_argument("--logit-std", type=float, default=3.0, help="spread of the attention logits (peakier maps > 1)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--layouts", action="store_true", help="compare the layouts SDPA is called on instead")
    args = p.parse_args()
    print(f"attention: {args.heads} heads x {args.head_dim}, bf16, CPU {torch.get_num_threads()} threads, "
          f"native bf16 {torch.cpu._is_amx_tile_supported() or torch.cpu._is_avx512_bf16_supported()}", flush=True)
    for n in args.tokens:
        g = torch.Generator().manual_seed(0)
        shape = (1, n, args.heads, args.head_dim)
        q = torch.randn(shape, generator=g)
        k = torch.randn(shape, generator=g) * args.logit_std
        q, k, v = q.bfloat16(), k.bfloat16(), torch.randn(shape, generator=g).bfloat16()
        ref = reference(q, k, v)
        variants = {"sdpa": lambda: sdpa(q, k, v)}
        if args.layouts:
            variants.update(layout_variants(q, k, v, step=(1 << 22) // (args.heads * args.head_dim)))
        else:
            for b in args.blocks:
                variants[f"blocked q{b}"] = lambda b=b: blocked_attention(q, k, v, block=b)
        best = {name: float("inf") for name in variants}
        errs = {}
        for _ in range(args.repeats):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                out = fn()
                best[name] = min(best[name], time.perf_counter() - t0)
                errs[name] = ((out.float() - ref).abs().max() / ref.abs().max()).item()
        flops = 4 * n * n * args.heads * args.head_dim
        for name in variants:
            print(f"  {n:6d} tokens  {name:18s} {best[name]:7.3f} s {flops / best[name] / 1e9:7.1f} GFLOP/s "
                  f"{best['sdpa'] / best[name]:5.2f}x sdpa  max rel err vs fp32 {errs[name]:.2e}  "
                  f"load {os.getloadavg()[0]:.2f}", flush=True)


if __name__ == "__main__":
    main()
