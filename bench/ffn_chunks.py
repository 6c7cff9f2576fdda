"""The FFN of one 1.3B block over token chunks (as wan_dit.Block runs it): bf16 weights vs INT4 weights
dequantized per chunk vs held once per call (layers.weights_held). Interleaved, best of 3; CPU.

    .venv/bin/python bench/ffn_chunks.py              # 9,360 tokens (21 frames 480x832), bf16 activations
    .venv/bin/python bench/ffn_chunks.py --fp32       # the path of CPUs without native bf16 (fp32 activations)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cinecli.models import wan_dit  # noqa: E402
from cinecli.models.layers import Linear, weights_held  # noqa: E402
from cinecli.models.quant import swap_in  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=9360)
    p.add_argument("--fp32", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    torch.manual_seed(0)
    act = torch.float32 if args.fp32 else torch.bfloat16
    dim, ffn_dim = wan_dit.DIT_CONFIGS["wan2.1-fun-1.3b-inp"].dim, wan_dit.DIT_CONFIGS["wan2.1-fun-1.3b-inp"].ffn_dim
    ref = torch.nn.Sequential(torch.nn.Linear(dim, ffn_dim), torch.nn.GELU(approximate="tanh"), torch.nn.Linear(ffn_dim, dim))

    def ffn() -> torch.nn.Sequential:
        m = torch.nn.Sequential(Linear(dim, ffn_dim), torch.nn.GELU(approximate="tanh"), Linear(ffn_dim, dim))
        m.load_state_dict(ref.state_dict())
        return m.to(torch.bfloat16)

    bf16, int4 = ffn(), swap_in(ffn(), {"0": "int4g64", "2": "int4g64"})
    h, x = torch.randn(1, args.tokens, dim).to(act), torch.zeros(1, args.tokens, dim)
    step = max(1, wan_dit.FFN_CHUNK_ELEMENTS // ffn_dim)

    def run(m, held: bool) -> None:
        with torch.no_grad(), weights_held(m, enabled=held):
            for s in range(0, args.tokens, step):
                x[:, s:s + step] += m(h[:, s:s + step]).float()

    cases = {"bf16 per-chunk": (bf16, False), "bf16 held": (bf16, True), "int4 per-chunk": (int4, False), "int4 held": (int4, True)}
    times: dict[str, list[float]] = {k: [] for k in cases}
    for _ in range(args.repeats):
        for name, (m, held) in cases.items():
            t0 = time.perf_counter()
            run(m, held)
            times[name].append(time.perf_counter() - t0)
    print(f"FFN {dim}->{ffn_dim}->{dim}, {args.tokens} tokens in chunks of {step}, activations {str(act)[6:]}, "
          f"{torch.get_num_threads()} threads")
    base = min(times["bf16 held"])
    for name, ts in times.items():
        print(f"  {name:15s} {min(ts):8.3f} s  ({', '.join(f'{t:.2f}' for t in ts)})  {min(ts) / base:.2f}x bf16 held")


if __name__ == "__main__":
    main()
