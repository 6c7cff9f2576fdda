"""Per-step latency and peak memory of cine's DiT against diffusers' WanTransformer3DModel, side by side.

Both load the same random bf16 checkpoint (a diffusers folder, written once and cached) and run the same
inputs. Each implementation runs in its own subprocess so that peak memory is its own.

    .venv/bin/python bench/dit_step.py                          # 1.3B i2v width+depth, 17 frames 256x256, bf16, CPU
    .venv/bin/python bench/dit_step.py --config tiny-i2v --steps 2   # a quick smoke run

cine's step is the sampler's step: per-video work (text/image embedding, cross-attention K/V) is prepared once
(timed separately as "prepare"); diffusers recomputes it every step, as its pipeline does.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cinecli.core.devices import activation_dtype, choose_device, choose_dtype  # noqa: E402
from cinecli.core.timing import RssSampler, Timings, current_rss  # noqa: E402
from cinecli.models.wan_dit import DIT_CONFIGS, DiTConfig  # noqa: E402


def diffusers_kwargs(cfg: DiTConfig) -> dict:
    return dict(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=cfg.eps, image_dim=cfg.image_dim if cfg.has_image_input else None,
        added_kv_proj_dim=cfg.dim if cfg.has_image_input else None,
    )


def make_checkpoint(cfg_name: str, root: Path, cfg: DiTConfig | None = None) -> Path:
    """A diffusers folder with random bf16 weights (N(0, 1/fan_in) projections), written once.

    ``cfg`` (default ``DIT_CONFIGS[cfg_name]``) may change the depth: the folder name then says so.
    """
    cfg = cfg or DIT_CONFIGS[cfg_name]
    depth = "" if cfg.num_layers == DIT_CONFIGS.get(cfg_name, cfg).num_layers else f"-{cfg.num_layers}layers"
    folder = root / f"dit-{cfg_name}{depth}"
    if (folder / "config.json").exists():
        return folder
    from diffusers import WanTransformer3DModel

    with torch.device("meta"):
        model = WanTransformer3DModel(**diffusers_kwargs(cfg))
    model = model.to_empty(device="cpu").to(torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2 and "scale_shift" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            else:
                p.copy_((1.0 if "norm" in name else 0.0) + 0.05 * torch.randn(p.shape, generator=gen))
    model.save_pretrained(folder)
    return folder


def make_inputs(cfg: DiTConfig, frames: int, height: int, width: int, device) -> tuple:
    g = torch.Generator().manual_seed(1)
    lat = (16, 1 + (frames - 1) // 4, height // 8, width // 8)
    x = torch.randn(1, *lat, generator=g).to(device)
    context = torch.randn(1, 24, cfg.text_dim, generator=g).to(device)  # a 24-token prompt
    clip = torch.randn(1, 257, cfg.image_dim, generator=g).to(device) if cfg.has_image_input else None
    y = torch.randn(1, 20, *lat[1:], generator=g).to(device) if cfg.has_image_input else None
    return x, torch.tensor([937.5], device=device), context, clip, y


def run_one(impl: str, folder: Path, args) -> dict:
    device = choose_device(args.device)
    dtype = choose_dtype(args.dtype, device)
    cfg = DIT_CONFIGS[args.config]
    x, t, context, clip, y = make_inputs(cfg, args.frames, args.height, args.width, device)
    timings = Timings(device=device)
    with timings.stage("load"):
        if impl == "cine":
            from cinecli.generate.pipeline import chunking_for
            from cinecli.models import load_dit
            from cinecli.models.recipes import RECIPES, quantize_dit

            model = load_dit(folder, device=device, dtype=dtype)
            if args.quantize != "none":
                quantize_dit(model, RECIPES[args.quantize])
            # what the memory plan gives a card with room (CUDA); the loader's bounded chunks elsewhere
            chunking = args.chunking or ("whole" if device.type == "cuda" else "chunked")
            model.chunking = chunking_for(chunking, model.chunking)
        else:
            from diffusers import WanTransformer3DModel

            model = WanTransformer3DModel.from_pretrained(folder, torch_dtype=dtype).to(device).eval()
    rss_loaded = current_rss()
    if impl == "cine":
        with torch.no_grad(), timings.stage("prepare"):
            ctx = model.prepare_context(context.to(dtype), clip)
        step = lambda: model(x, t, ctx, y=y)  # noqa: E731
    else:
        padded = torch.zeros(1, 512, cfg.text_dim, device=device, dtype=dtype)
        padded[:, : context.shape[1]] = context
        hidden = torch.cat([x, y], 1).to(dtype) if y is not None else x.to(dtype)
        image = clip.to(dtype) if clip is not None else None
        step = lambda: model(hidden, t, padded, encoder_hidden_states_image=image, return_dict=False)[0]  # noqa: E731
    with torch.no_grad():
        for i in range(args.warmup):
            with timings.stage(f"warmup {i + 1}"):
                step()
        with RssSampler() as rss:
            for i in range(args.steps):
                with timings.stage(f"step {i + 1}"):
                    out = step()
    steps = [timings.stages[f"step {i + 1}"] for i in range(args.steps)]
    kernels = count_kernels(step) if args.profile and device.type == "cuda" else None
    torch.save(out.float().cpu(), args.out)
    return {
        "impl": impl, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "activations": str(activation_dtype(device, dtype) if impl == "cine" else dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(), "load_s": timings.stages["load"], "prepare_s": timings.stages.get("prepare", 0.0),
        "step_s": sorted(steps)[len(steps) // 2], "steps_s": steps, "rss_loaded": rss_loaded, "peak_rss_steps": rss.peak,
        "quantize": args.quantize if impl == "cine" else "none", "kernels_per_step": kernels,
        "max_reserved": torch.cuda.max_memory_reserved(device) if device.type == "cuda" else None,
    }


def count_kernels(step) -> int:
    """GPU kernels one step launches (torch.profiler's CUDA kernel events): the launch budget of issue 21."""
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type.name == "CUDA")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="wan2.1-fun-1.3b-inp", choices=sorted(DIT_CONFIGS))
    p.add_argument("--frames", type=int, default=17)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", type=int, default=3, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--layers", type=int, help="fewer blocks than the config (step time scales with them)")
    p.add_argument("--quantize", default="none", help="cine's recipe at load: none, hybrid, fp8, compact")
    p.add_argument("--chunking", choices=["whole", "held", "chunked"], help="default: whole on CUDA, else chunked")
    p.add_argument("--profile", action="store_true", help="CUDA: also count the kernels of one step")
    p.add_argument("--json", type=Path, help="write both rows here")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "cine-bench")
    p.add_argument("--impl", choices=["cine", "diffusers"], help=argparse.SUPPRESS)  # child mode
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()

    cfg = DIT_CONFIGS[args.config]
    if args.layers:
        from dataclasses import replace

        cfg = replace(cfg, num_layers=args.layers)
    folder = make_checkpoint(args.config, args.cache, cfg)
    if args.impl:
        print(json.dumps(run_one(args.impl, folder, args)))
        return

    tokens = (1 + (args.frames - 1) // 4) * (args.height // 16) * (args.width // 16)
    print(f"DiT step: {args.config} (dim {cfg.dim}, {cfg.num_layers} layers, {cfg.model_type}), {args.frames} frames "
          f"{args.height}x{args.width} = {tokens} tokens, {args.dtype}, {args.device}, {torch.get_num_threads()} threads", flush=True)
    results, outputs = {}, {}
    for impl in ("diffusers", "cine"):
        out = args.cache / f"out-{impl}.pt"
        cmd = [sys.executable, __file__, *sys.argv[1:], "--impl", impl, "--out", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"{impl} run failed:\n{proc.stderr[-3000:]}")
        results[impl] = json.loads(proc.stdout.strip().splitlines()[-1])
        outputs[impl] = torch.load(out)
        r = results[impl]
        print(f"  {impl:9s} step {r['step_s'] * 1e3:9.1f} ms (median of {args.steps}: "
              f"{', '.join(f'{s * 1e3:.0f}' for s in r['steps_s'])})  prepare {r['prepare_s'] * 1e3:7.1f} ms  "
              f"peak RSS {r['peak_rss_steps'] / 2**30:6.2f} GiB (after load {r['rss_loaded'] / 2**30:.2f})  "
              f"activations {r['activations']}", flush=True)
    c, d = results["cine"], results["diffusers"]
    diff = (outputs["cine"] - outputs["diffusers"]).abs().max() / outputs["diffusers"].abs().max()
    print(f"ratio cine/diffusers: step time {c['step_s'] / d['step_s']:.3f}x   peak RSS {c['peak_rss_steps'] / d['peak_rss_steps']:.3f}x   "
          f"outputs max|Δ|/max|ref| {diff:.2e}")
    if args.json:
        args.json.write_text(json.dumps({"tokens": tokens, "config": args.config, "layers": cfg.num_layers,
                                         "rows": results, "ratio": c["step_s"] / d["step_s"], "max_rel_diff": float(diff)}))


if __name__ == "__main__":
    main()
