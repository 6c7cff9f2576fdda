"""The VAE decode's clip buffer, float32 against float16, side by side at real size on the CPU.

    .venv/bin/python bench/vae_clip.py                 # 49 frames 832x464 in 192-px tiles, 620 s per dtype
    .venv/bin/python bench/vae_clip.py --seconds 300   # shorter: the first tile ends after ~270 s on 2 cores

Each dtype decodes the same random latents with the real-size Wan VAE (bench/memory.py writes its weights under
$CINE_BENCH_DIR) in its own process, tiled as the pipeline tiles (VAE_TILE_OVERLAP seams), while the parent samples
its RSS every 50 ms. The clip-sized buffer the tiles blend into appears when the first tile ends, so the time
limit must pass that point; a whole 49-frame decode takes over an hour here, and its peak is reached early.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.memory import GB, ROOT, _status, write_weights  # noqa: E402


def decode_child(dtype: str, frames: int, tile: int) -> None:
    from cinecli.generate.pipeline import VAE_TILE_OVERLAP
    from cinecli.models.vae_loader import load_vae

    vae = load_vae(str(ROOT / "Wan2.1_VAE.pth"), device="cpu")
    z = torch.randn(1, 16, 1 + (frames - 1) // 4, 464 // 8, 832 // 8, generator=torch.Generator().manual_seed(0))
    print("decoding", flush=True)
    vae.decode(z, tile_size=tile, tile_overlap=VAE_TILE_OVERLAP, dtype=getattr(torch, dtype))


def peak_rss(dtype: str, args: argparse.Namespace) -> tuple[int, int]:
    """(RSS once the VAE is loaded, peak RSS) of a child decoding for ``args.seconds``."""
    child = subprocess.Popen([sys.executable, __file__, "--child", dtype, "--frames", str(args.frames),
                              "--tile", str(args.tile)], stdout=subprocess.PIPE, text=True)
    child.stdout.readline()  # "decoding": the weights are loaded
    loaded = peak = _status(child.pid)[0]
    t0 = time.time()
    while child.poll() is None and time.time() - t0 < args.seconds:
        peak = max(peak, (_status(child.pid) or (0,))[0])
        time.sleep(0.05)
    child.kill()
    child.wait()
    return loaded, peak


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=620)
    ap.add_argument("--frames", type=int, default=49)
    ap.add_argument("--tile", type=int, default=192)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return decode_child(args.child, args.frames, args.tile)
    write_weights()
    print(f"{args.frames} frames 832x464, {args.tile}-px tiles, {args.seconds:.0f} s per dtype, {torch.get_num_threads()} threads")
    for dtype in ("float32", "float16"):
        loaded, peak = peak_rss(dtype, args)
        print(f"{dtype}: RSS {loaded / GB:.3f} GB with the VAE loaded, peak {peak / GB:.3f} GB", flush=True)


if __name__ == "__main__":
    main()
