"""One denoising step at real sizes: cine bf16 / fp8 / hybrid against diffusers' WanTransformer3DModel, same weights.

    .venv/bin/python bench/speed.py                               # 1.3B width, 30 layers, 49 frames 480x832, CUDA if present
    .venv/bin/python bench/speed.py --model 14b                   # Wan2.1-I2V-14B shapes, 40 layers
    .venv/bin/python bench/speed.py --layers 2 --busy 1           # CPU: time 2 blocks (scaled to the full depth),
                                                                  #      with one busy process competing for the cores
    .venv/bin/python bench/speed.py --model tiny --frames 5 --size 64x64 --steps 1   # smoke run

Random weights (N(0, 1/fan_in)) in a diffusers folder written once under --cache (bench/dit_step.py builds it);
every variant loads that folder in its own subprocess, so peak memory is its own. Per variant: seconds per step
(CUDA events on CUDA after warm-up, wall clock on CPU; the median of --steps), achieved TFLOP/s against the peak
(--peak-tflops, a table for known GPUs, else a measured bf16 GEMM), peak memory (CUDA max allocated, else peak RSS
during the steps), a three-line torch.profiler breakdown (attention / linear / rest) of one more step, and the
output's relative RMS distance to cine bf16. --layers N times N blocks and scales the block part to the full depth
(the embeddings and head, a few per cent, scale with it); ratios between variants are what to compare on a CPU.
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

from bench.dit_step import make_checkpoint, make_inputs  # noqa: E402
from cinecli.core.devices import choose_device  # noqa: E402
from cinecli.core.timing import RssSampler, current_rss, time_call  # noqa: E402
from cinecli.models.wan_dit import DIT_CONFIGS, DiTConfig  # noqa: E402

MODELS = {"1.3b": "wan2.1-fun-1.3b-inp", "14b": "wan2.1-i2v-14b", "tiny": "tiny-i2v"}
VARIANTS = ("bf16", "fp8", "hybrid", "diffusers")
# Dense bf16 tensor-core peaks (TFLOP/s, vendor datasheets, SXM parts); fp8 is twice these on Hopper/Ada.
PEAK_BF16 = {"H200": 989.0, "H100 SXM": 989.0, "H100 PCIe": 756.0, "H100 NVL": 835.0, "H100": 989.0, "GH200": 989.0,
             "B200": 2250.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "RTX 4090": 165.0, "A10": 125.0}


def step_flops(cfg: DiTConfig, tokens: int, text: int = 25, image: int = 257) -> float:
    """Multiply-add FLOPs (2 per MAC) of one DiT step: projections, self-/cross-attention, FFN; the rest is noise."""
    d, f, L = cfg.dim, cfg.ffn_dim, tokens
    per_block = (2 * L * d * d * 4  # self-attention q, k, v, o
                 + 4 * L * L * d  # QKᵀ and PV
                 + 2 * L * d * d * 2 + 4 * L * (text + (image if cfg.has_image_input else 0)) * d  # cross q, o, attention
                 + 2 * L * d * f * 2)  # FFN
    return cfg.num_layers * per_block


def device_peak(device: torch.device, given: float | None) -> tuple[float, str]:
    """(TFLOP/s, where it came from) for bf16 on ``device``."""
    if given:
        return given, "--peak-tflops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, peak in PEAK_BF16.items():
            if key in name:
                return peak, f"datasheet ({name})"
        return 0.0, f"unknown ({name}): pass --peak-tflops"
    a = torch.randn(4096, 4096, dtype=torch.bfloat16, device=device)
    time_call(lambda: a @ a, device)
    secs = min(time_call(lambda: a @ a, device)[0] for _ in range(3))
    return 2 * 4096**3 / secs / 1e12, "measured bf16 4096³ GEMM"


# --- profiler breakdown ------------------------------------------------------------------------------------------
def is_attention(name: str) -> bool:
    n = name.lower()
    return "scaled_dot_product" in n or "flash_attn" in n or "cine.attention" in n or "sageattn" in n


def breakdown(step, model: torch.nn.Module, device: torch.device) -> dict[str, float]:
    """Seconds of attention / linear / rest in one profiled step. Linear layers (any nn.Linear, quantized or
    not, cine's or diffusers') are marked with record_function ranges by hooks; attention is the SDPA / flash /
    cine.attention ranges; the top-most marked range wins, so nothing is counted twice."""
    from torch.autograd.profiler import record_function
    from torch.profiler import ProfilerActivity, profile

    ranges, hooks = {}, []
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            hooks.append(m.register_forward_pre_hook(lambda mod, a: ranges.setdefault(id(mod), []).append(
                record_function("cine.linear").__enter__())))
            hooks.append(m.register_forward_hook(lambda mod, a, o: ranges[id(mod)].pop().__exit__(None, None, None)))
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    try:
        with torch.no_grad(), profile(activities=activities) as prof:
            seconds, _ = time_call(step, device)
    finally:
        for h in hooks:
            h.remove()
    cuda = device.type == "cuda"
    sums = {"attention": 0.0, "linear": 0.0}
    for ev in prof.events():
        kind = "linear" if ev.name == "cine.linear" else "attention" if is_attention(ev.name) else None
        if kind is None:
            continue
        parent, nested = ev.cpu_parent, False
        while parent is not None:
            nested |= parent.name == "cine.linear" or is_attention(parent.name)
            parent = parent.cpu_parent
        if not nested:
            sums[kind] += (ev.device_time_total if cuda else ev.cpu_time_total) / 1e6
    total = seconds if not cuda else max(seconds, sums["attention"] + sums["linear"])
    return {"step_s": seconds, **sums, "rest": max(0.0, total - sums["attention"] - sums["linear"])}


# --- one variant, in its own process --------------------------------------------------------------------------------
def load_variant(variant: str, folder: Path, device: torch.device, args):
    if variant == "diffusers":
        from diffusers import WanTransformer3DModel

        return WanTransformer3DModel.from_pretrained(folder, torch_dtype=torch.bfloat16).to(device).eval()
    from cinecli.models import load_dit
    from cinecli.models.recipes import RECIPES, quantize_dit

    model = load_dit(folder, device=device, dtype="bf16")
    if args.activations == "fp32":
        model.compute_dtype = torch.float32  # the path CPUs without native bf16 take (devices.activation_dtype)
    if variant != "bf16":
        quantize_dit(model, RECIPES[variant])
    if args.chunking:  # what the memory plan would choose (wan_dit.Chunking): chunked, held or whole
        from cinecli.generate.pipeline import chunking_for

        model.chunking = chunking_for(args.chunking, model.chunking)
    if args.compile:
        from cinecli.models.compiled import compile_blocks

        compile_blocks(model)
    return model


def step_for(variant: str, model, cfg: DiTConfig, inputs: tuple):
    """One denoising step of ``model`` as a callable: diffusers takes the padded prompt and the concatenated latent
    every step, as its pipeline passes them; cine prepares its per-video context once (timed apart, not here)."""
    x, t, context, clip, y = inputs
    if variant == "diffusers":
        padded = torch.zeros(1, 512, cfg.text_dim, device=x.device, dtype=torch.bfloat16)
        padded[:, : context.shape[1]] = context
        hidden = torch.cat([x, y], 1).to(torch.bfloat16) if y is not None else x.to(torch.bfloat16)
        image = clip.to(torch.bfloat16) if clip is not None else None
        return lambda: model(hidden, t, padded, encoder_hidden_states_image=image, return_dict=False)[0]
    ctx = model.prepare_context(context.to(torch.bfloat16), clip)
    return lambda: model(x, t, ctx, y=y)


def run_variant(variant: str, folder: Path, cfg: DiTConfig, args) -> dict:
    device = choose_device(args.device)
    inputs = make_inputs(cfg, args.frames, args.height, args.width, device)
    model = load_variant(variant, folder, device, args)
    rss_loaded = current_rss()
    with torch.no_grad():
        step = step_for(variant, model, cfg, inputs)
        for _ in range(args.warmup):
            time_call(step, device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with RssSampler() as rss:
            times = []
            for _ in range(args.steps):
                secs, out = time_call(step, device)
                times.append(secs)
        peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else rss.peak
        parts = breakdown(step, model, device) if args.profile else None
    from cinecli.models.attention import used_backends

    torch.save(out.float().cpu(), args.out)
    return {"variant": variant, "step_s": sorted(times)[len(times) // 2], "steps_s": times, "peak_bytes": peak,
            "rss_loaded": rss_loaded, "breakdown": parts, "threads": torch.get_num_threads(),
            "attention": used_backends() if variant != "diffusers" else ["diffusers (sdpa)"]}


def run_interleaved(folder: Path, cfg: DiTConfig, args) -> None:
    """All variants (diffusers too) in one process on the same weights and inputs, their steps alternated
    (A B C A B C …): on a shared CPU whose load drifts, the ratio of medians is far steadier than separate runs.
    No memory figures (one process holds every model)."""
    import os

    device = choose_device(args.device)
    inputs = make_inputs(cfg, args.frames, args.height, args.width, device)
    names = list(args.variants)
    times: dict[str, list[float]] = {v: [] for v in names}
    with torch.no_grad():
        steps = {v: step_for(v, load_variant(v, folder, device, args), cfg, inputs) for v in names}
        for i in range(args.warmup + args.steps):
            for v, step in steps.items():
                secs, _ = time_call(step, device)
                if i >= args.warmup:
                    times[v].append(secs)
    med = {v: sorted(ts)[len(ts) // 2] for v, ts in times.items()}
    for v in names:
        print(f"  {v:9s} median step {med[v]:9.3f} s ({', '.join(f'{s:.2f}' for s in times[v])})  "
              + "  ".join(f"{med[v] / med[o]:.3f}x {o}" for o in names if o != v), flush=True)
    print(f"  load average {os.getloadavg()[0]:.2f} (1 min) at the end", flush=True)


# --- the parent: one subprocess per variant, then the table -------------------------------------------------------
def busy_processes(n: int) -> list[subprocess.Popen]:
    """``n`` pure-Python spinning processes: the CPU contention a shared machine or a desktop app causes."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="1.3b", choices=sorted(MODELS), help="1.3b (Fun-1.3B-InP width), 14b, tiny")
    p.add_argument("--layers", type=int, help="time this many blocks and scale to the model's depth (default: all)")
    p.add_argument("--frames", type=int, default=49)
    p.add_argument("--size", default="480x832", help="HxW in pixels")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    p.add_argument("--device", default="auto")
    p.add_argument("--activations", choices=["auto", "fp32"], default="auto",
                   help="fp32: the activation path of CPUs without native bf16, forced (cine variants)")
    p.add_argument("--compile", action="store_true", help="regional torch.compile of cine's blocks")
    p.add_argument("--chunking", choices=["chunked", "held", "whole"], help="cine's block chunking (default: the loader's)")
    p.add_argument("--fp8-matmul", action="store_true", help="FP8 GEMMs for fp8 layers (CUDA sm90+; CINE_FP8_MATMUL=1)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--no-profile", dest="profile", action="store_false", help="skip the profiler breakdown")
    p.add_argument("--peak-tflops", type=float, help="the device's bf16 peak (default: datasheet table / measured)")
    p.add_argument("--busy", type=int, default=0, help="spinning processes competing for the CPU during the run")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "cine-bench")
    p.add_argument("--interleave", action="store_true",
                   help="cine variants in one process, steps alternated (steadier ratios on a shared CPU; no memory)")
    p.add_argument("--variant", help=argparse.SUPPRESS)  # child mode
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.height, args.width = (int(v) for v in args.size.lower().split("x"))
    if args.fp8_matmul:
        import os

        os.environ["CINE_FP8_MATMUL"] = "1"  # read at import by cinecli.models.quant, in the child processes

    full = DIT_CONFIGS[MODELS[args.model]]
    cfg = replace(full, num_layers=args.layers or full.num_layers)
    if args.variant:
        folder = make_checkpoint(MODELS[args.model], args.cache, cfg)
        print(json.dumps(run_variant(args.variant, folder, cfg, args)))
        return

    device = choose_device(args.device)
    tokens = (1 + (args.frames - 1) // 4) * (args.height // 16) * (args.width // 16)
    peak, peak_src = device_peak(device, args.peak_tflops)
    print(f"speed: {args.model} (dim {cfg.dim}, {cfg.num_layers} of {full.num_layers} layers timed), {args.frames} frames "
          f"{args.height}x{args.width} = {tokens} tokens, {device}"
          f"{' ' + torch.cuda.get_device_name(device) if device.type == 'cuda' else ''}, {torch.get_num_threads()} threads, "
          f"activations {args.activations}{', compiled blocks' if args.compile else ''}"
          f"{', FP8 GEMMs' if args.fp8_matmul else ''}, busy processes {args.busy}; "
          f"bf16 peak {peak:.3g} TFLOP/s ({peak_src})", flush=True)
    make_checkpoint(MODELS[args.model], args.cache, cfg)
    if args.interleave:
        busy = busy_processes(args.busy)
        try:
            run_interleaved(make_checkpoint(MODELS[args.model], args.cache, cfg), cfg, args)
        finally:
            for proc in busy:
                proc.kill()
                proc.wait()
        return
    scale = full.num_layers / cfg.num_layers
    flops = step_flops(full, tokens)
    results, outputs = {}, {}
    busy = busy_processes(args.busy)
    try:
        for variant in args.variants:
            out = args.cache / f"speed-out-{variant}.pt"
            cmd = [sys.executable, __file__, *sys.argv[1:], "--variant", variant, "--out", str(out)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"  {variant}: failed\n{proc.stderr[-3000:]}", flush=True)
                continue
            r = results[variant] = json.loads(proc.stdout.strip().splitlines()[-1])
            outputs[variant] = torch.load(out)
            # scale the block part to the full depth: the profiler's split says how much of the step is outside blocks
            step = r["step_s"] * scale
            tflops = flops / step / 1e12
            line = (f"  {variant:9s} {step:9.3f} s/step{' (scaled)' if scale != 1 else ''}  {tflops:7.2f} TFLOP/s"
                    f" = {tflops / peak:6.1%} of peak  peak mem {r['peak_bytes'] / 2**30:6.2f} GiB"
                    f" (after load {r['rss_loaded'] / 2**30:.2f})  attention {','.join(r['attention'])}")
            if "bf16" in outputs and variant != "bf16":
                ref = outputs["bf16"]
                line += f"  rel RMS vs cine bf16 {((outputs[variant] - ref).pow(2).mean() / ref.pow(2).mean()).sqrt():.2%}"
            print(line, flush=True)
            if r["breakdown"]:
                b = r["breakdown"]
                for part in ("attention", "linear", "rest"):
                    print(f"      {part:9s} {b[part]:8.3f} s  {b[part] / b['step_s']:6.1%}", flush=True)
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    names = [v for v in args.variants if v in results]
    if "bf16" in results:
        base = results["bf16"]["step_s"]
        print("  step time vs cine bf16: " + "  ".join(f"{v} {results[v]['step_s'] / base:.3f}x" for v in names))
    if "diffusers" in results:
        base = results["diffusers"]["step_s"]
        print("  speed-up over diffusers bf16: " + "  ".join(f"{v} {base / results[v]['step_s']:.2f}x" for v in names if v != "diffusers"))


if __name__ == "__main__":
    main()
