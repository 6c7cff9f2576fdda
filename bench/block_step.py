"""One DiT block at a real shape, alone: its time (best of --repeats after a warm-up) and optionally a profile.

    .venv/bin/python bench/block_step.py --tokens 20280               # 1.3B width, 49 frames 480p, the CPU's "held"
    .venv/bin/python bench/block_step.py --tokens 7800 --profile      # where the block's time goes
    REPO=/path/to/other/checkout .venv/bin/python bench/block_step.py # the same block from another commit (A/B)

Random bf16 weights (norms and modulation in fp32, as loaded), random inputs, the CPU plan's chunking. Small enough to
alternate two checkouts run by run on a shared machine, where whole-step figures drift between runs.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.environ.get("REPO") or str(Path(__file__).resolve().parents[1]))

from cinecli.models.wan_dit import DIT_CONFIGS, Block, Chunking, rope_tables  # noqa: E402

GRIDS = {7800: (5, 30, 52), 10920: (7, 30, 52), 20280: (13, 30, 52)}  # latent (frames, rows, cols) at 480x832


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="wan2.1-fun-1.3b-inp", choices=sorted(DIT_CONFIGS))
    p.add_argument("--tokens", type=int, default=20280, choices=sorted(GRIDS))
    p.add_argument("--chunking", choices=["held", "chunked", "whole"], default="held")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()
    torch.manual_seed(0)
    cfg = DIT_CONFIGS[args.config]
    block = Block(cfg).to(torch.bfloat16)
    for name, param in block.named_parameters():
        if "norm" in name or "modulation" in name:
            param.data = param.data.float()
    x = torch.randn(1, args.tokens, cfg.dim)  # [B, L, dim] fp32 residual stream
    e0 = torch.randn(1, 6, cfg.dim) * 0.1
    text = torch.randn(1, 25, cfg.dim, dtype=torch.bfloat16)
    image = torch.randn(1, 257, cfg.dim, dtype=torch.bfloat16) if cfg.has_image_input else None
    chunking = {"held": Chunking(hold_weights=True), "chunked": Chunking(), "whole": Chunking.whole()}[args.chunking]
    with torch.no_grad():
        kv = block.cross_attn.key_values(text, image, torch.bfloat16)
        rope = rope_tables(cfg.head_dim, GRIDS[args.tokens], torch.device("cpu"))
        run = lambda: block(x.clone(), e0, kv, rope, torch.bfloat16, None, chunking)  # noqa: E731
        run()
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        print(f"{args.config} block, {args.tokens} tokens, {args.chunking}: best {min(times):.2f} s "
              f"({', '.join(f'{t:.2f}' for t in times)})  code {sys.path[0]}  load {os.getloadavg()[0]:.2f}", flush=True)
        if args.profile:
            from torch.profiler import profile

            with profile() as prof:
                run()
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12))


if __name__ == "__main__":
    main()
