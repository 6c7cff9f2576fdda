"""Smaller GPUs emulated on a big one: the 14B-shaped hybrid DiT at 480p × 49 frames under 8/12/16/24 GB caps, the
memory plan choosing where the DiT lives (issue 9). Per cap: the plan, CUDA max allocated, s/step, finished or not.

    python bench/gpu_caps.py                       # CUDA: 14B shapes (40 layers, dim 5120), caps 8 12 16 24 + the full card
    python bench/gpu_caps.py --caps 8 --steps 3    # one cap, more timed steps
    python bench/gpu_caps.py --config tiny-i2v --frames 5 --size 64x64 --caps 4 --device cpu --offload blocks  # smoke run

Weights: random N(0, 1/fan_in), built on the device in bf16, quantized with the hybrid recipe there and written once
as cine's self-describing file (``recipes.write_quantized``) under --cache (13.8 GB for the 14B). Each cap then
runs in its own subprocess, so its memory figures are its own:

  1. the card: ``torch.cuda.set_per_process_memory_fraction`` limits the caching allocator to CAP − 0.4 GiB (what a
     driver and display keep of a real card; the plan is told the same, as tests/test_memory_plan.py's gpu());
  2. the plan: ``memory_plan.make_plan`` for a 14B hybrid job with the prompt cached (the text encoder is not
     loaded), the DiT resident or streamed as it chooses;
  3. what the plan keeps on the device next to the DiT during the steps (CLIP ViT-H in bf16 and the fp32 VAE) is
     held as one placeholder allocation of their size;
  4. the DiT loads as the pipeline loads it (``load_dit`` to the device, or to the host then
     ``streaming.stream_blocks``), runs ``--warmup`` then ``--steps`` timed steps (CUDA events), and reports
     ``torch.cuda.max_memory_reserved`` (what the card must hold: the caching allocator's segments, fragmentation
     included; max allocated beside it) and the host → device bytes streamed per step, with the plan's chunking.

The VAE and encoders themselves are not run: their stages are planned (and reported) but the step is what the caps
decide. Targets (issue 9): every cap finishes; a streamed step costs at most 1.5× a resident one (the full card).
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

from bench.dit_step import make_inputs  # noqa: E402
from cinecli.core.devices import choose_device  # noqa: E402
from cinecli.core.timing import RssSampler, time_call  # noqa: E402
from cinecli.plan.memory import GiB, Job, Machine, NoFit, make_plan  # noqa: E402

RESERVED = 0.4 * GiB  # what a real card's driver and display keep: the plan and the allocator both get CAP − this


def write_weights(config: str, device: torch.device, path: Path) -> None:
    """The random hybrid DiT as cine's quantized file (built and quantized on ``device``, written from the host)."""
    from bench.quant import random_model
    from cinecli.models.recipes import RECIPES, quantize_dit, write_quantized
    from cinecli.models.wan_dit import DIT_CONFIGS

    model = random_model(DIT_CONFIGS[config], device=device)
    quantize_dit(model, RECIPES["hybrid"])
    path.parent.mkdir(parents=True, exist_ok=True)
    write_quantized(model.cpu(), path)


def job_for(config: str, frames: int, height: int, width: int, offload: str = "auto") -> Job:
    from cinecli.plan.inputs import dit_sizes, image_encoder_params, text_encoder_params, vae_params

    return Job(dit={"hybrid": dit_sizes(config)["hybrid"]}, frames=frames, width=width, height=height, steps=4,
               text_encoder_bytes=text_encoder_params(None) * 2, image_encoder_bytes=image_encoder_params(None) * 2,
               vae_bytes=vae_params(None) * 4, pinned_recipe="hybrid", quant_cached=frozenset({"hybrid"}),
               prompt_cached=True, offload=offload)


def run_cap(args) -> dict:
    """Child: one cap (GB, 0 = the whole device), one plan, the DiT placed as planned, timed steps."""
    from cinecli.generate.pipeline import chunking_for
    from cinecli.models import load_dit
    from cinecli.models.streaming import stream_blocks
    from cinecli.models.wan_dit import DIT_CONFIGS

    device = choose_device(args.device)
    cuda = device.type == "cuda"
    total = torch.cuda.get_device_properties(device).total_memory if cuda else int(args.host_gb * GiB)
    cap = int(args.cap * GiB - (RESERVED if cuda else 0)) if args.cap else total
    if cuda and args.cap:
        torch.cuda.set_per_process_memory_fraction(cap / total, device)
    job = job_for(args.config, args.frames, args.height, args.width, args.offload)
    machine = Machine(device.type, cap, int(args.host_gb * GiB))
    out = {"cap_gb": args.cap, "usable_bytes": cap, "device": torch.cuda.get_device_name(device) if cuda else "cpu"}
    try:
        plan = make_plan(job, machine)
    except NoFit as err:
        return {**out, "plan": None, "finished": False, "error": f"no plan: {err.stage} needs {err.needed / GiB:.2f} GiB"}
    step_plan = next(s for s in plan.stages if s.stage.startswith("denoise step"))
    out.update(plan=plan.to_json(), planned_step_device_bytes=step_plan.device_peak_bytes)
    cfg = DIT_CONFIGS[args.config]
    try:
        keep = torch.empty(job.image_encoder_bytes + job.vae_bytes, dtype=torch.uint8, device=device) if cuda else None
        streamed = plan.dit == "streamed"
        model = load_dit(args.weights, device="cpu" if streamed else device, dtype=torch.bfloat16)
        if streamed:
            stream_blocks(model, device)
            out["pinned_bytes"] = getattr(model.block_stream, "pinned_bytes", 0)
        model.chunking = chunking_for(plan.chunking, model.chunking)  # as the pipeline applies the plan
        x, t, context, clip, y = make_inputs(cfg, args.frames, args.height, args.width, device)
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        times = []
        with torch.no_grad(), RssSampler() as rss:
            ctx = model.prepare_context(context.to(torch.bfloat16), clip)
            for i in range(args.warmup + args.steps):
                copied = getattr(model.block_stream, "copied_bytes", 0)
                secs, _ = time_call(lambda: model(x, t, ctx, y=y), device)
                if i >= args.warmup:
                    times.append(secs)
                    out["streamed_bytes_per_step"] = getattr(model.block_stream, "copied_bytes", 0) - copied
        out.update(finished=True, step_s=times, median_step_s=sorted(times)[len(times) // 2],
                   max_allocated=torch.cuda.max_memory_allocated(device) if cuda else rss.peak,
                   max_reserved=torch.cuda.max_memory_reserved(device) if cuda else rss.peak)  # what the card must hold
        del keep
    except torch.cuda.OutOfMemoryError as exc:
        out.update(finished=False, error=f"CUDA out of memory: {str(exc).splitlines()[0]}",
                   max_allocated=torch.cuda.max_memory_allocated(device) if cuda else None,
                   max_reserved=torch.cuda.max_memory_reserved(device) if cuda else None)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="wan2.1-i2v-14b", help="a DIT_CONFIGS name (tiny-i2v for a smoke run)")
    p.add_argument("--caps", type=float, nargs="+", default=[24, 16, 12, 8], help="card sizes to emulate, GB (GiB)")
    p.add_argument("--frames", type=int, default=49)
    p.add_argument("--size", default="480x832", help="HxW in pixels")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--device", default="auto")
    p.add_argument("--offload", default="auto", choices=("auto", "none", "blocks"), help="pin the plan's DiT choice")
    p.add_argument("--host-gb", type=float, default=64, help="host RAM the plan may use (pinned blocks live there)")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "cine-gpu-caps")
    p.add_argument("--json", type=Path, help="also write the rows here")
    p.add_argument("--child", type=float, help=argparse.SUPPRESS)
    p.add_argument("--weights", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.height, args.width = (int(v) for v in args.size.split("x"))
    if args.child is not None:
        args.cap = args.child
        print(json.dumps(run_cap(args)), flush=True)
        return
    device = choose_device(args.device)
    weights = args.cache / f"{args.config}-hybrid.safetensors"
    if not weights.is_file():
        print(f"writing random {args.config} hybrid weights to {weights} …", file=sys.stderr, flush=True)
        write_weights(args.config, device, weights)
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the children need the whole card
    rows = []
    for cap in [0.0, *args.caps]:  # 0: the whole device, the resident reference
        cmd = [sys.executable, __file__, "--child", str(cap), "--weights", str(weights), "--config", args.config,
               "--frames", str(args.frames), "--size", args.size, "--warmup", str(args.warmup), "--steps", str(args.steps),
               "--device", args.device, "--host-gb", str(args.host_gb), "--offload", args.offload]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            rows.append({"cap_gb": cap, "finished": False, "error": (res.stderr.strip().splitlines() or ["?"])[-1]})
        else:
            rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    ref = next((r.get("median_step_s") for r in rows if r["cap_gb"] == 0 and r.get("finished")), None)
    tokens = (1 + (args.frames - 1) // 4) * (args.height // 16) * (args.width // 16)
    print(f"{args.config} hybrid, {args.frames} frames {args.width}x{args.height} ({tokens} tokens), "
          f"device {rows[0].get('device', '?')}, prompt cached; GiB")
    print("| card | plan: DiT, VAE | planned step | max allocated | s/step | × resident | streamed/step | finished |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        plan = r.get("plan") or {}
        gib = lambda b: f"{b / GiB:.2f}" if b else "n/a"  # noqa: E731
        s, card = r.get("median_step_s"), f"{r['cap_gb']:g} GB" if r["cap_gb"] else "full"
        print(f"| {card} | {plan.get('dit', '-')}, {plan.get('vae_decode', '-')}"
              f"{' ' + str(plan['vae_tile']) if plan.get('vae_tile') else ''} | {gib(r.get('planned_step_device_bytes'))} | "
              f"{gib(r.get('max_allocated'))} | {f'{s:.2f}' if s else 'n/a'} | {f'{s / ref:.2f}' if s and ref else 'n/a'} | "
              f"{gib(r.get('streamed_bytes_per_step'))} | {'yes' if r.get('finished') else 'no: ' + r.get('error', '?')} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
