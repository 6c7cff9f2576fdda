"""Quantization benchmark: DiT weight bytes per recipe, load peak memory of a pre-quantized file, step latency.

    .venv/bin/python bench/quant.py                      # 1.3B i2v width, 30 and 27 layers, random weights, CPU
    .venv/bin/python bench/quant.py --config tiny-i2v --layers 2   # smoke run

1. Bytes: each recipe applied to random N(0,1/fan_in) weights of the 1.3B i2v model (30 layers) and of a 27-layer
   student; bytes of every tensor as stored (quantized data, scales, 16/32-bit rest), and the mean/max relative
   RMS error of the quantized layers.
2. Load: a subprocess loads the written hybrid file with load_dit and runs one step; peak RSS over the load (and
   over load + step, which touches every page of the memory-mapped weights) against the file size.
3. Latency: per-step time of each recipe against bf16 at the same inputs, in one process, side by side.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cinecli.core.timing import RssSampler, Timings, current_rss  # noqa: E402
from cinecli.models.dit_loader import cast_dit  # noqa: E402
from cinecli.models.recipes import RECIPES, metadata_for, quantize_dit  # noqa: E402
from cinecli.models.wan_dit import DIT_CONFIGS, WanDiT  # noqa: E402


def random_model(cfg, seed: int = 0, device: str | torch.device = "cpu") -> WanDiT:
    """Random bf16 weights, built one parameter at a time (no fp32 copy of the whole model), on ``device``."""
    with torch.device("meta"):
        model = cast_dit(WanDiT(cfg), torch.bfloat16)  # dtypes first: memory is allocated once, in bf16
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, device=p.device)
            p.copy_(noise / p[0].numel() ** 0.5 if p.ndim >= 2 and "modulation" not in name else 1 + 0.05 * noise if "norm" in name else 0.05 * noise)
    return cast_dit(model, torch.bfloat16).eval()


def stored_bytes(model: WanDiT) -> int:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


def inputs(cfg, frames: int, size: int):
    g = torch.Generator().manual_seed(1)
    lat = (16, 1 + (frames - 1) // 4, size // 8, size // 8)
    return (torch.randn(1, *lat, generator=g), torch.tensor([937.5]), torch.randn(1, 24, cfg.text_dim, generator=g),
            torch.randn(1, 257, cfg.image_dim, generator=g), torch.randn(1, 20, *lat[1:], generator=g))


def child_load(path: str, frames: int, size: int) -> None:
    """Subprocess: load a pre-quantized file, then one step; print peak RSS figures as JSON."""
    from cinecli.models import load_dit

    base = current_rss()
    with RssSampler() as load_peak:
        model = load_dit(path, dtype="bf16")
    x, t, c, clip, y = inputs(model.config, frames, size)
    with RssSampler() as step_peak, torch.no_grad():
        model(x, t, c, clip, y)
    print(json.dumps({"baseline": base, "load_peak": load_peak.peak, "step_peak": step_peak.peak}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="wan2.1-fun-1.3b-inp", choices=sorted(DIT_CONFIGS))
    p.add_argument("--layers", type=int, nargs="+", default=[30, 27], help="depths to size (the first is also timed)")
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=1, help="timed steps per recipe (after one warm-up)")
    p.add_argument("--recipes", nargs="+", default=["none", "hybrid", "compact", "fp8", "int8"])
    p.add_argument("--child-load", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_load:
        child_load(args.child_load, args.frames, args.size)
        return

    base_cfg = DIT_CONFIGS[args.config]
    print(f"quantization bench: {args.config} (dim {base_cfg.dim}, {base_cfg.model_type}), layers {args.layers}, CPU, "
          f"{torch.get_num_threads()} threads", flush=True)
    timed = {}
    tmp = Path(tempfile.mkdtemp(prefix="cine-quant-"))
    for layers in args.layers:
        cfg = replace(base_cfg, num_layers=layers)
        for recipe in args.recipes:
            model = random_model(cfg)
            n_params = sum(t.numel() for t in model.state_dict().values())
            errors = quantize_dit(model, RECIPES[recipe], measure=True) if recipe != "none" else {}
            size = stored_bytes(model)
            errs = [e["rel_rms_error"] for e in errors.values()]
            err = f"rel RMS err mean {sum(errs) / len(errs):.2%} max {max(errs):.2%}" if errs else ""
            print(f"  {layers} layers {recipe:8s} {n_params / 1e9:.3f}B params  {size / 1e9:.3f} GB  {err}", flush=True)
            if layers == args.layers[0]:
                timed[recipe] = model
                if recipe == "hybrid":
                    from safetensors.torch import save_file

                    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "hybrid.safetensors"),
                              metadata=metadata_for(model))
            else:
                del model

    if (tmp / "hybrid.safetensors").exists():
        file_bytes = (tmp / "hybrid.safetensors").stat().st_size
        out = subprocess.run([sys.executable, __file__, "--config", args.config, "--frames", str(args.frames), "--size",
                              str(args.size), "--child-load", str(tmp / "hybrid.safetensors")], capture_output=True, text=True)
        if out.returncode == 0:
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"  load pre-quantized hybrid file ({file_bytes / 1e9:.3f} GB): peak RSS during load "
                  f"{(r['load_peak'] - r['baseline']) / 1e9:.3f} GB above the {r['baseline'] / 1e9:.2f} GB baseline "
                  f"= {(r['load_peak'] - r['baseline']) / file_bytes:.2f}x the file; with one step (all pages touched) "
                  f"{(r['step_peak'] - r['baseline']) / file_bytes:.2f}x", flush=True)
        else:
            print(f"  load child failed: {out.stderr[-2000:]}")

    cfg = replace(base_cfg, num_layers=args.layers[0])
    x, t, c, clip, y = inputs(cfg, args.frames, args.size)
    print(f"  step latency, {args.frames} frames {args.size}x{args.size}:", flush=True)
    base = None
    for recipe, model in timed.items():
        timings = Timings()
        with torch.no_grad():
            ctx = model.prepare_context(c, clip)
            model(x, t, ctx, y=y)  # warm-up
            for i in range(args.steps):
                with timings.stage(f"step {i}"):
                    out = model(x, t, ctx, y=y)
        step = sum(timings.stages.values()) / args.steps
        base = base or step
        print(f"    {recipe:8s} {step * 1e3:9.1f} ms  ({step / base:.2f}x bf16)  finite={bool(torch.isfinite(out).all())}", flush=True)


if __name__ == "__main__":
    main()
