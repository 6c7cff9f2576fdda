"""RIFE v4.26 interpolation speed at real size: a x2 and a x4 pass over a short clip, on the CPU (or --device).

    .venv/bin/python bench/rife_speed.py                          # 5 frames 832x480, x2 and x4
    .venv/bin/python bench/rife_speed.py --frames 2 --size 64x96  # smoke run

Random weights of the real size and layout (models/rife.random_state, saved as flownet.pkl and loaded by cine's own
strict loader: the published file cannot be downloaded here), a moving synthetic clip, the same frame loop as
`cine interpolate` (output/interpolate.rife_frames: each frame's features once, a pair's timesteps in one batch).
Prints seconds per pass and per synthesized frame, the peak RSS (compare plan/memory.py's RIFE_PER_PIXEL estimate),
the torch thread count and the load average before and after (a busy machine slows every figure).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cinecli.core.sizes import human_bytes  # noqa: E402
from cinecli.core.timing import peak_rss  # noqa: E402
from cinecli.models.rife import load_rife, random_state  # noqa: E402
from cinecli.output.interpolate import rife_frames  # noqa: E402


def clip(frames: int, h: int, w: int) -> np.ndarray:
    """A textured square moving 12 px per frame over a gradient: [T, H, W, 3] uint8."""
    yy, xx = np.mgrid[:h, :w]
    out = np.empty((frames, h, w, 3), np.uint8)
    for t in range(frames):
        img = np.stack([xx % 256, yy % 256, (xx + yy) % 256], -1).astype(np.uint8)
        s = min(h, w) // 4
        x0 = (w // 8 + 12 * t) % max(1, w - s)
        img[h // 3: h // 3 + s, x0: x0 + s] = (250, 230, 40)
        out[t] = img
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="480x832", help="HxW of the frames")
    p.add_argument("--frames", type=int, default=5, help="input frames (pairs = frames - 1)")
    p.add_argument("--factors", default="2,4")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    print(f"load average before: {load}; torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "flownet.pkl"
        torch.save(random_state(), path)
        t0 = time.perf_counter()
        net = load_rife(path, args.device)
        print(f"load: {time.perf_counter() - t0:.2f} s ({human_bytes(path.stat().st_size)} file)")
    frames = clip(args.frames, h, w)
    rife_frames(net, frames[:2], 2)  # warm-up: oneDNN picks its kernels on the first call at a size
    for factor in (int(f) for f in args.factors.split(",")):
        t0 = time.perf_counter()
        out = rife_frames(net, frames, factor)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        made = out.shape[0] - frames.shape[0]
        print(f"x{factor}: {frames.shape[0]} → {out.shape[0]} frames {w}x{h}: {dt:.2f} s, {dt / made:.3f} s per "
              f"synthesized frame")
    print(f"peak RSS: {human_bytes(peak_rss())}")
    print(f"load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()
