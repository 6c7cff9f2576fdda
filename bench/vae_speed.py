"""The Wan VAE at real size: cine in bf16 and fp32 against diffusers' fp32 AutoencoderKLWan, same weights, one run.

    .venv/bin/python bench/vae_speed.py                     # 1 frame 480x832: encode, and decode of 1 latent
    .venv/bin/python bench/vae_speed.py --size 64x64        # smoke run

Random weights (diffusers' init, real config: base_dim 96, ~127 M parameters) loaded by cine from diffusers' own
state dict. Each variant is timed on the same inputs, whole frames (no tiles), after one warm-up call at the same
size (--warmup), wall clock, interleaved (diffusers, cine fp32, cine bf16 per round), median of --rounds. Prints the CPU kind
(native bf16 or emulated: devices.native_matmul) and the load average beside the figures, and what bf16 changes:
conditioning latents (relative error against fp32) and decoded 8-bit frames (mean and max level difference).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cinecli.core.devices import native_matmul, vae_dtype  # noqa: E402
from cinecli.models.vae_loader import load_vae  # noqa: E402
from cinecli.output.video import frames_to_uint8  # noqa: E402


def timed(fn) -> tuple[float, object]:
    t0 = time.perf_counter()
    with torch.no_grad():
        out = fn()
    return time.perf_counter() - t0, out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="480x832", help="HxW of the frame")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1, help="untimed calls of each variant first (0 at real size: minutes)")
    args = p.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    ref = AutoencoderKLWan().eval()  # the real Wan2.1 VAE config
    sd = ref.state_dict()
    cine = {"fp32": load_vae(sd, dtype="fp32"), "bf16": load_vae(sd, dtype="bf16")}
    g = torch.Generator().manual_seed(1)
    video = torch.rand(1, 3, 1, h, w, generator=g) * 2 - 1
    latents = torch.randn(1, 16, 1, h // 8, w // 8, generator=g)
    mean = torch.tensor(ref.config.latents_mean).view(1, 16, 1, 1, 1)
    std = torch.tensor(ref.config.latents_std).view(1, 16, 1, 1, 1)
    native = native_matmul("cpu", torch.bfloat16)
    print(f"Wan VAE {h}x{w}, 1 frame / 1 latent, CPU with {'native' if native else 'emulated'} bf16 "
          f"(vae_dtype: {str(vae_dtype('cpu')).removeprefix('torch.')}), {torch.get_num_threads()} threads, "
          f"load {os.getloadavg()[0]:.2f}", flush=True)
    runs = {
        "encode diffusers fp32": lambda: ref.encode(video).latent_dist.mode(),
        "encode cine fp32": lambda: cine["fp32"].encode(video),
        "encode cine bf16": lambda: cine["bf16"].encode(video),
        "decode diffusers fp32": lambda: ref.decode(latents * std + mean).sample,  # diffusers takes raw latents
        "decode cine fp32": lambda: cine["fp32"].decode(latents),
        "decode cine bf16": lambda: cine["bf16"].decode(latents),
    }
    for _ in range(args.warmup):  # warm-up at the same size
        for fn in runs.values():
            timed(fn)
    times = {k: [] for k in runs}
    outs = {}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            s, outs[name] = timed(fn)
            times[name].append(s)
            print(f"  {name:24s} {s:8.2f} s   (load {os.getloadavg()[0]:.2f})", flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    for what in ("encode", "decode"):
        d = med[f"{what} diffusers fp32"]
        print(f"{what}: cine bf16 / diffusers fp32 = {med[f'{what} cine bf16'] / d:.2f}x, "
              f"cine fp32 / diffusers fp32 = {med[f'{what} cine fp32'] / d:.2f}x")
    z32, z16 = outs["encode cine fp32"], outs["encode cine bf16"]
    print(f"conditioning latents bf16 vs fp32: relative error {((z16 - z32).norm() / z32.norm()).item():.3e}")
    f32 = frames_to_uint8(outs["decode cine fp32"][0]).astype(int)
    f16 = frames_to_uint8(outs["decode cine bf16"][0]).astype(int)
    diff = abs(f16 - f32)
    print(f"decoded 8-bit frames bf16 vs fp32: mean {diff.mean():.3f} levels, max {diff.max()} levels, "
          f"{(diff > 0).mean() * 100:.1f}% of values differ")


if __name__ == "__main__":
    main()
