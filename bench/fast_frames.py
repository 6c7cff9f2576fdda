"""--fast-frames at real size on the CPU: 49 frames generated vs 25 generated + RIFE x2 back to 49, side by side.

    .venv/bin/python bench/fast_frames.py                     # 480x832, 49 vs 25+RIFE x2, 1.3B width, ~6 min
    .venv/bin/python bench/fast_frames.py --size 64x96 --frames 9 --model tiny   # smoke run

A whole 30-layer, 4-step run at 20,280 tokens is ~45 minutes on 2 cores, so each stage that changes with the number
of generated frames is timed at its real size in one process, in turns, and scaled by what it is built of:
  DiT     --layers blocks of the 1.3B-width stack (Fun-1.3B-InP dims, random bf16 weights, the CPU plan's "held"
          chunking) at the clip's token count; one step × 30 layers / --layers × 4 steps
  VAE     cine's Wan VAE (the real config, random weights, the device's VAE dtype): encoding the conditioning video
          and decoding the latents are causal over latent frames (the first latent is 1 frame, each later one 4), so
          the time is t(1) + (L − 1)·(t(2) − t(1)), measured at 1 and 2 latent frames
  RIFE    x2 with random v4.26 weights (the published layout): two pairs timed, scaled to the clip's pairs
Text encode, CLIP and loading are the same in both modes and left out (they only dilute the ratio): the figure is
the ratio of the frame-dependent work. RSS is sampled around each DiT step and the RIFE pass: how far it rises
above where the call started (the VAE's peak is per chunk, the same in both modes).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.dit_step import make_checkpoint, make_inputs  # noqa: E402
from bench.rife_speed import clip  # noqa: E402
from bench.speed import MODELS  # noqa: E402
from cinecli.core.sizes import human_bytes  # noqa: E402
from cinecli.core.timing import RssSampler, current_rss, time_call  # noqa: E402
from cinecli.models.wan_dit import DIT_CONFIGS  # noqa: E402

STEPS = 4  # the distilled backbones' steps


def dit_step_s(folder: Path, cfg, frames: int, h: int, w: int) -> tuple[float, int]:
    """One step of the --layers stack at ``frames`` (after a warm-up): seconds, and how far RSS rose during the step
    above where it started (its activations: the process's own peak mixes in the other mode's freed memory)."""
    from cinecli.generate.pipeline import chunking_for
    from cinecli.models import load_dit

    model = load_dit(folder, device="cpu", dtype="bf16")
    model.chunking = chunking_for("held", model.chunking)
    x, t, context, clip_fea, y = make_inputs(cfg, frames, h, w, torch.device("cpu"))
    with torch.no_grad():
        ctx = model.prepare_context(context.to(torch.bfloat16), clip_fea)
        time_call(lambda: model(x, t, ctx, y=y), torch.device("cpu"))
        start = current_rss()
        with RssSampler() as rss:
            secs, _ = time_call(lambda: model(x, t, ctx, y=y), torch.device("cpu"))
    return secs, rss.peak - start


def vae_per_latent(h: int, w: int) -> tuple[float, float]:
    """(t(1), t(2) − t(1)): encoding the conditioning video and decoding the latents at 1 latent frame, and what each
    further latent frame adds (after a warm-up call: oneDNN picks its kernels on the first call at a size)."""
    from diffusers import AutoencoderKLWan

    from cinecli.models.vae_loader import load_vae

    torch.manual_seed(0)
    vae = load_vae(AutoencoderKLWan().state_dict())  # the real config; the device's dtype (devices.vae_dtype)
    g = torch.Generator().manual_seed(1)
    times = {}
    with torch.no_grad():
        vae.decode(vae.encode(torch.zeros(1, 3, 1, h, w)))  # warm-up
        for n in (1, 2):
            video = torch.rand(1, 3, 1 + 4 * (n - 1), h, w, generator=g) * 2 - 1
            enc, _ = time_call(lambda: vae.encode(video), torch.device("cpu"))  # noqa: B023
            dec, _ = time_call(lambda: vae.decode(torch.randn(1, 16, n, h // 8, w // 8, generator=g)),  # noqa: B023
                               torch.device("cpu"))
            times[n] = enc + dec
            print(f"  VAE encode+decode at {n} latent frame(s): {times[n]:.2f} s  (load {os.getloadavg()[0]:.2f})",
                  flush=True)
    return times[1], times[2] - times[1]


def rife_s(h: int, w: int, pairs: int) -> tuple[float, int]:
    from cinecli.models.rife import load_rife, random_state
    from cinecli.output.interpolate import rife_frames

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "flownet.pkl"
        torch.save(random_state(), path)
        net = load_rife(path, "cpu")
    frames = clip(3, h, w)
    rife_frames(net, frames[:2], 2)  # warm-up
    start = current_rss()
    with RssSampler() as rss:
        secs, _ = time_call(lambda: rife_frames(net, frames, 2), torch.device("cpu"))
    return secs / 2 * pairs, rss.peak - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="1.3b", choices=sorted(MODELS))
    p.add_argument("--layers", type=int, default=1, help="blocks timed (scaled to the model's depth)")
    p.add_argument("--frames", type=int, default=49, help="frames delivered (fast mode generates (F-1)/2+1)")
    p.add_argument("--size", default="480x832", help="HxW in pixels")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "cine-bench")
    args = p.parse_args()
    h, w = (int(v) for v in args.size.split("x"))
    full = DIT_CONFIGS[MODELS[args.model]]
    cfg = replace(full, num_layers=args.layers)
    folder = make_checkpoint(MODELS[args.model], args.cache, cfg)
    fast = (args.frames - 1) // 2 + 1
    print(f"fast frames: {args.frames} generated vs {fast} generated + RIFE x2 → {args.frames}, {h}x{w}, "
          f"{args.model} width ({args.layers} of {full.num_layers} layers timed, {STEPS} steps), CPU "
          f"{torch.get_num_threads()} threads, load {os.getloadavg()[0]:.2f}", flush=True)
    vae_first, vae_more = vae_per_latent(h, w)
    rows = {}
    for mode, frames in (("full", args.frames), ("fast", fast)):
        step, peak = dit_step_s(folder, cfg, frames, h, w)
        latents = 1 + (frames - 1) // 4
        tokens = latents * (h // 16) * (w // 16)
        dit = step * full.num_layers / args.layers * STEPS
        print(f"  {mode}: {frames} frames = {tokens} tokens: one step of {args.layers} layer(s) {step:.2f} s, "
              f"RSS rise {human_bytes(peak)}; DiT {dit:.1f} s  (load {os.getloadavg()[0]:.2f})", flush=True)
        rows[mode] = {"dit": dit, "vae": vae_first + (latents - 1) * vae_more, "dit_peak": peak}
    rows["fast"]["rife"], rife_peak = rife_s(h, w, pairs=args.frames - fast)
    rows["full"]["rife"] = 0.0
    print(f"  RIFE x2 over {fast} frames ({args.frames - fast} synthesized): {rows['fast']['rife']:.1f} s, "
          f"RSS rise {human_bytes(rife_peak)}", flush=True)
    total = {m: r["dit"] + r["vae"] + r["rife"] for m, r in rows.items()}
    for m, r in rows.items():
        print(f"  {m:4s}  DiT {r['dit']:8.1f} s   VAE {r['vae']:7.1f} s   RIFE {r['rife']:6.1f} s   total {total[m]:8.1f} s")
    print(f"fast / full: {total['fast'] / total['full']:.3f}x the time (DiT alone {rows['fast']['dit'] / rows['full']['dit']:.3f}x); "
          f"DiT step RSS rise {rows['fast']['dit_peak'] / rows['full']['dit_peak']:.2f}x  (load {os.getloadavg()[0]:.2f})")


if __name__ == "__main__":
    main()
