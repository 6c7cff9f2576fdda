"""GGUF: dequantize per call (GGUFLinear) or convert at load? Memory and matmul time on one real-size 14B layer.

    .venv/bin/python bench/gguf_layer.py                    # 5120→13824 (14B FFN up-projection), 4096 tokens, bf16
    .venv/bin/python bench/gguf_layer.py --tokens 512 --reps 2   # quick

For each layout of the same layer: bytes held in memory, and the median time of y = x Wᵀ over --reps calls, all
in one process side by side: bf16 (what a convert-to-bf16 loader holds), cine's INT4-g64 QuantLinear (what a
convert-to-cine's-nearest loader would hold: a second rounding on top of GGUF's), and GGUFLinear per GGML type.
Weights are random valid blocks (the numbers are irrelevant to speed). Activations: bf16 where the CPU multiplies
bf16 natively, else fp32 (as devices.activation_dtype chooses).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from gguf_fixtures import encode  # noqa: E402

from cinecli.core.devices import activation_dtype  # noqa: E402
from cinecli.models.gguf_linear import GGUFLinear  # noqa: E402
from cinecli.models.layers import Linear  # noqa: E402
from cinecli.models.quant import QuantLinear  # noqa: E402


def timed(layer: torch.nn.Module, x: torch.Tensor, reps: int) -> float:
    with torch.no_grad():
        layer(x)  # warm-up
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            layer(x)
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--in-features", type=int, default=5120)
    ap.add_argument("--out-features", type=int, default=13824)
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--types", default="Q8_0,Q6_K,Q5_K,Q4_K,Q4_0,Q3_K")
    args = ap.parse_args()
    fin, fout = args.in_features, args.out_features
    act = activation_dtype(torch.device("cpu"), torch.bfloat16)
    x = torch.randn(args.tokens, fin, dtype=act)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(fout, fin, generator=gen) / fin**0.5

    bf16 = Linear(fin, fout, bias=False)
    bf16.weight = torch.nn.Parameter(w.to(torch.bfloat16), requires_grad=False)
    layers = {"bf16 (convert at load)": bf16, "cine int4-g64 (convert at load)": QuantLinear.from_linear(bf16, "int4")}
    rng = np.random.default_rng(0)
    for kind in args.types.split(","):
        layer = GGUFLinear(fin, fout, kind, bias=False)
        data = encode(w.numpy(), kind, rng)
        layer.weight = torch.nn.Parameter(torch.from_numpy(np.ascontiguousarray(data)).view(torch.uint8), requires_grad=False)
        layers[f"GGUF {kind} per call"] = layer
    del w

    print(f"layer {fin}->{fout}, {args.tokens} tokens, activations {act}, {torch.get_num_threads()} threads, "
          f"median of {args.reps}", file=sys.stderr)
    base = None
    for name, layer in layers.items():
        nbytes = sum(p.numel() * p.element_size() for p in layer.parameters())
        t = timed(layer, x, args.reps)
        base = base or t
        print(f"{name:34s} {nbytes / 2**20:8.1f} MiB  {t * 1000:8.1f} ms  {t / base:5.2f}x bf16")


if __name__ == "__main__":
    main()
