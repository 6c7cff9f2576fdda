"""One ``cine EFFECT PHOTO`` run: preset → weights → generator → MP4 → report, with every stage timed."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from .core.errors import CineError, UsageError
from .core.sizes import human_bytes
from .core.timing import Timings
from .effects.preset import Catalog, Preset
from .effects.rules import check_options, unused_option_warnings
from .generate.image import check_pair, read_image
from .generate.pipeline import Generator, Plan, Request, metadata, plan, sampler_settings
from .output.progress import StageProgress
from .output.slowdown import parse_slowdown
from .output.video import STDOUT, check_output_paths, check_report_path, check_writable, frames_to_uint8, write_mp4
from .plan.memory import CHUNKING_SAYS, TILED_COST, VAE_TILES


@dataclass
class RunOptions:
    image: str
    output: str | None = None
    effect: str | None = None
    preset_file: Path | None = None
    backbone: str | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    frames: int | None = None
    fps: int | None = None
    steps: int | None = None
    fit: str = "crop"
    last_frame: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    crf: int = 18
    overwrite: bool = False
    report_file: Path | None = None
    as_json: bool = False
    quiet: bool = False
    dry_run: bool = False
    metadata: bool = True
    quantize: str | None = None
    strength: float | None = None
    fast_decode: bool = False
    sampler: str | None = None  # --sampler distill|euler|unipc
    distill_step: str | None = None  # --distill-step renoise|euler
    slowdown: str | None = None  # --slowdown as given: 2 to 8 or off (checks.RULES); None: the preset's
    offload: str = "auto"  # DiT blocks: auto (the memory plan decides; resident until it does), none, blocks
    memory_budget: str | None = None  # caps the memory plan (else CINE_MEMORY_BUDGET)
    interpolator: str | None = None  # --interpolator rife|minterpolate; None: rife (minterpolate offline without it)
    fast_frames: bool = False  # --fast-frames: generate (F−1)/2+1 frames, interpolate ×2 back to F


def pull_hint(preset: Preset, backbone: str | None = None, preset_file: Path | None = None, fast_decode: bool = False) -> str:
    """The `cine models pull` command that fetches exactly what this run needs (the same effect, backbone, file)."""
    import shlex

    args = ["cine", "models", "pull", *(["--preset", str(preset_file)] if preset_file is not None else [preset.name])]
    args += ["--backbone", backbone] if backbone else []
    args += ["--fast-decode"] if fast_decode else []
    return shlex.join(args)


def weights_needed(preset: Preset, fast_decode: bool = False, refs: dict | None = None) -> dict[str, dict]:
    """Each component's reference, whether it is present locally, and its size: on disk, else as declared by the
    backbone or LoRA card (the download size; None when nobody declared it). No network, no loading.
    ``refs``: the run's references when it already has them (scan.local_refs), so the models dirs are read once."""
    from .models.scan import local_refs
    from .weights.hub import locate

    out = {}
    asked = preset.weights(fast_decode)
    if refs is None:
        refs = local_refs(preset, fast_decode, hash_files=False)  # models-dir files in place of missing hub ones
    for name, ref in refs.items():
        found = locate(ref)
        size = sum(f.stat().st_size for f in found.files if f.is_file()) if found.path else ref.bytes
        source = "models dir" if ref != asked.get(name) else "local path" if ref.path else "hub cache" if found.path else "hub"
        out[name] = {"ref": str(ref), "present": found.path is not None, "bytes": size,
                     "path": str(found.path) if found.path else None, "source": source}
    return out


def memory_plan(opts: RunOptions, preset: Preset, p: Plan, weights: dict[str, dict], device):
    """The memory plan for this run on this machine (memory_plan.py); exit 7 with one line of advice when nothing fits.
    ``opts``: a RunOptions, or cine batch's BatchOptions (which has no --fast-decode, --offload or budget option)."""
    from .core.devices import choose_dtype
    from .core.errors import DeviceError
    from .plan.inputs import job, machine
    from .plan.memory import NoFit, advice, make_plan

    the_job = job(preset, p, weights, device=device, dtype=choose_dtype(opts.dtype, device), quantize=opts.quantize,
                  fast_decode=getattr(opts, "fast_decode", False), offload=getattr(opts, "offload", "auto"))
    the_machine = machine(device, getattr(opts, "memory_budget", None))
    try:
        return make_plan(the_job, the_machine)
    except NoFit as exc:
        raise DeviceError(advice(the_job, the_machine, exc)) from None


def apply_plan(gen: Generator, mp) -> None:
    """Put the plan's choices into the generator (the one place a plan becomes settings)."""
    import torch

    if mp.quantize != "prequantized":
        gen.quantize = mp.quantize
    gen.text_device = torch.device("cpu") if mp.text_encoder == "cpu" else None
    gen.vae_tile = mp.vae_tile
    gen.vae_retry_tiles = tuple(t for t in VAE_TILES if mp.vae_tile is None or t < mp.vae_tile)
    gen.chunking = mp.chunking
    gen.stream_blocks = mp.dit == "streamed"  # --offload blocks|none pins it; auto: the plan's choice


def default_output(image: str, effect: str, output: str | None) -> str:
    """``-o`` rules: none → ./<stem>.<effect>.mp4; DIR/ or an existing folder → DIR/<stem>.<effect>.mp4."""
    name = f"{'stdin' if image == '-' else Path(image).stem}.{effect}.mp4"
    if output is None:
        return name
    if output == "-":
        return output
    if output.endswith(("/", os.sep)) or Path(output).is_dir():
        return str(Path(output) / name)
    return output


def _hint(opts: RunOptions, preset: Preset) -> str:
    return pull_hint(preset, opts.backbone, opts.preset_file, opts.fast_decode)


def run_one(opts: RunOptions, console) -> dict | None:
    check_options(opts)  # every value against checks.RULES, before anything is read or loaded
    timings = Timings()
    with timings.stage("resolve"):
        catalog = Catalog(extra_preset=opts.preset_file)
        preset = catalog.resolve(opts.effect if opts.preset_file is None else None, backbone=opts.backbone)
        output = default_output(opts.image, preset.name, opts.output)
        inputs = {"PHOTO": opts.image, "--last-frame": opts.last_frame, "--preset": opts.preset_file}
        check_output_paths(output, inputs)  # an MP4 name, never one of the inputs (exit 2)
        check_writable(output, opts.overwrite)  # before any expensive work
        if opts.report_file is not None:
            if Path(opts.report_file).resolve() in [Path(p).resolve() for p in (*inputs.values(), output)
                                                     if p is not None and str(p) != STDOUT]:
                raise UsageError(f"--report {opts.report_file} is also an input or the video; name another file")
            check_report_path(opts.report_file, opts.overwrite)
        image = read_image(opts.image)
        request = Request(image=opts.image, preset=preset, output=output, seed=opts.seed, frames=opts.frames, fps=opts.fps,
                          fit=opts.fit, last_frame=opts.last_frame, prompt=opts.prompt, negative_prompt=opts.negative_prompt,
                          steps=opts.steps, effect_strength=opts.strength, sampler=opts.sampler,
                          distill_step=opts.distill_step, slowdown=parse_slowdown(opts.slowdown),
                          fast_frames=opts.fast_frames)
        the_plan = plan(request, image.size)
        if opts.interpolator is not None and the_plan.interp_factor == 1:
            the_plan.notices.append(f"warning: --interpolator {opts.interpolator} does nothing here: no --slowdown "
                                    "or --fast-frames interpolates this clip")
        rife = None  # RIFE's weights as they are now, when this run would interpolate with RIFE
        if the_plan.interp_factor > 1:
            from .models.rife_weights import locate_rife

            rife = locate_rife(record=False) if opts.interpolator != "minterpolate" else None
            the_plan.interpolator = planned_interpolator(opts.interpolator, rife is not None and rife.path is not None)
            if opts.dry_run and opts.interpolator is None and the_plan.interpolator == "minterpolate":
                the_plan.notices.append("RIFE weights are not here and downloads are off (--offline): minterpolate "
                                        "would interpolate (fetch RIFE with: cine models pull rife)")
        the_plan.notices += unused_option_warnings(vars(opts), preset, the_plan.sampler)
        if opts.quantize:
            from .models.recipes import get_recipe

            get_recipe(opts.quantize)  # a typo fails now, not after loading the backbone
        if opts.last_frame is not None:
            if not preset.backbone.supports_last_frame:
                raise UsageError(f"backbone {preset.backbone.name} does not support --last-frame "
                                 "(try --backbone wan2.1-fun-1.3b-inp)")
            check_pair(image.size, read_image(opts.last_frame).size, opts.last_frame)  # validate now, not after loading

    with timings.stage("plan memory"):  # before any download or load: a job that cannot fit stops here (exit 7)
        from .core.devices import choose_device, choose_dtype
        from .models.attention import choose_backend
        from .models.scan import local_refs

        device = choose_device(opts.device)
        the_plan.notices += choose_backend(device)  # CINE_ATTENTION checked (exit 2) and imported now, not at step 1
        refs = local_refs(preset, opts.fast_decode, hash_files=False)  # one read of the models dirs per run
        weights = weights_needed(preset, opts.fast_decode, refs)
        if rife is not None and the_plan.interpolator == "rife":
            weights["rife"] = rife.as_json()
        try:
            mp = memory_plan(opts, preset, the_plan, weights, device)
        except CineError as exc:
            if opts.dry_run and opts.as_json:  # "would this fit?" from a script: the document still comes (plan null)
                doc = _dry_run_doc(opts, preset, the_plan, image.size, output, weights, None)
                print(json.dumps({**doc, "error": str(exc), "exit_code": exc.exit_code}, indent=2))
            raise
    if opts.dry_run:
        _print_notices(console, the_plan)
        return _dry_run(opts, preset, the_plan, image.size, output, weights, mp)

    with timings.stage("resolve weights"):
        from .models.scan import record_used
        from .output.report import build_report, summary_table, write_report
        from .weights.hub import resolve_all

        record_used(refs, preset.weights(opts.fast_decode))  # models-dir files this run uses: hashed into the lock
        paths = resolve_all(refs, _hint(opts, preset))
        timings.device = device
        gen = Generator(preset.backbone, paths, device, choose_dtype(opts.dtype, device), timings=timings, quantize=opts.quantize,
                        fast_decode=opts.fast_decode)
        apply_plan(gen, mp)
        interp = None
        if the_plan.interp_factor > 1:
            from .output.interpolate import choose

            interp = choose(opts.interpolator, device=device).load()  # downloads RIFE when missing and allowed
            the_plan.interpolator = interp.kind
    _print_notices(console, the_plan)  # after the checks that fail in one line (bad values, input, missing weights)
    label = f"{preset.name}: {the_plan.frames} frames {the_plan.width}x{the_plan.height} on {device}"
    progress = contextlib.nullcontext() if opts.quiet else StageProgress(console, timings, label, the_plan.sampler.num_steps)
    if not console.is_terminal and not opts.quiet:  # logs: the stages so far (after the one-line checks), then live
        for name, seconds in timings.stages.items():
            console.print(f"cine: [{timings.total():7.1f} s] {name}: {seconds:.2f} s", markup=False, highlight=False)
    with progress:
        video = gen.generate(request, the_plan, image)
        frames = frames_to_uint8(video)
        del video
        if interp is not None:
            frames = interp.run(frames, the_plan.interp_factor, timings)
        settings = metadata(request, the_plan, gen, opts.crf)  # every setting that shapes the pixels: MP4 and report
        if interp is not None:
            settings.update(interp.settings())
        with timings.stage("mp4 encode"):
            written = write_mp4(frames, output, the_plan.fps, settings if opts.metadata else None,
                                crf=opts.crf, overwrite=opts.overwrite)
    sizes = {"width": the_plan.width, "height": the_plan.height, "frames": the_plan.frames, "fps": the_plan.fps,
             "slowdown": the_plan.slowdown, "output_frames": the_plan.output_frames,
             "fast_frames": the_plan.fast_frames, "delivered_frames": the_plan.delivered_frames,
             "latent": list(the_plan.latent_shape), "tokens": the_plan.tokens, "input": list(image.size)}
    job = {"effect": preset.name, "input": str(opts.image), "seed": the_plan.seed, "prompt": the_plan.prompt,
           "backbone": preset.backbone.name, "steps": the_plan.sampler.num_steps, "sampler": the_plan.sampler.kind,
           **sampler_settings(the_plan.sampler), "negative_prompt": the_plan.negative_prompt}
    report = build_report(timings, job=job, sizes=sizes, device=device, dtype=gen.dtype,
                          quantization=gen.quant_recipe, output=written)
    report["plan"] = mp.to_json()
    report["settings"] = settings
    if opts.report_file:
        write_report(report, opts.report_file)
    if console.is_terminal and not opts.quiet:
        console.print(summary_table(report))
    if opts.as_json:
        print(json.dumps(report))
    elif written != STDOUT:
        print(written)
    return report


def planned_interpolator(requested: str | None, rife_present: bool) -> str:
    """Which interpolator a run will use, decided without loading or downloading (for the plan and --dry-run):
    minterpolate when asked for, or when RIFE's weights are missing and downloads are off; else rife."""
    from .weights.hub import offline

    if requested == "minterpolate" or (requested is None and offline() and not rife_present):
        return "minterpolate"
    return "rife"


def _print_notices(console, the_plan: Plan) -> None:
    for notice in the_plan.notices:
        console.print(f"[yellow]{notice}[/]" if notice.startswith("warning") else notice, markup=True, highlight=False)


def _dry_run_doc(opts: RunOptions, preset: Preset, p: Plan, image_size, output: str, weights: dict, mp) -> dict:
    """What --dry-run --json prints; ``mp`` None when nothing fits (the run exits 7)."""
    return {
        "dry_run": True, "effect": preset.name, "input": str(opts.image), "input_size": list(image_size), "output": output,
        "width": p.width, "height": p.height, "frames": p.frames, "fps": p.fps, "seed": p.seed, "prompt": p.prompt,
        "slowdown": p.slowdown, "output_frames": p.output_frames, "last_frame": opts.last_frame,
        "fast_frames": p.fast_frames, "delivered_frames": p.delivered_frames,
        "interpolator": p.interpolator if p.interp_factor > 1 else None,
        "sampler": {"kind": p.sampler.kind, "steps": p.sampler.num_steps, **sampler_settings(p.sampler)},
        "negative_prompt": p.negative_prompt,
        "backbone": preset.backbone.name, "weights": weights, "plan": mp.to_json() if mp else None,
        "dit_bytes": mp.dit_bytes if mp else None,
        "download_bytes": sum(w["bytes"] or 0 for w in weights.values() if not w["present"]),
        "missing": [w["ref"] for w in weights.values() if not w["present"]],
        **({"experts": _expert_steps(p)} if preset.backbone.dit_low_noise is not None else {}),
    }


def _expert_steps(p: Plan) -> dict[str, list[int]]:
    """A two-expert backbone: expert → the (1-based) steps it runs."""
    from .generate.sampler import expert_schedule

    order = expert_schedule(p.sampler)
    return {e: [i + 1 for i, x in enumerate(order) if x == e] for e in ("high_noise", "low_noise")}


def _dry_run(opts: RunOptions, preset: Preset, p: Plan, image_size, output: str, weights: dict, mp) -> dict:
    doc = _dry_run_doc(opts, preset, p, image_size, output, weights, mp)
    if opts.as_json:
        print(json.dumps(doc, indent=2))
        return doc
    count = (f"{p.frames} frames generated, interpolated x2 ({p.interpolator}) to {p.delivered_frames}" if p.fast_frames
             else f"{p.frames} frames")
    lines = [f"[dry-run] {doc['input']} → {output}", f"  effect {preset.name} on {preset.backbone.name}",
             f"  {p.width}x{p.height} (photo {image_size[0]}x{image_size[1]}, --fit {opts.fit}), {count} @ {p.fps} fps, "
             + (f"slowed {p.slowdown}x ({p.interpolator}) to {p.output_frames} frames, " if p.slowdown > 1 else "") + f"seed {p.seed}, {p.sampler.kind} sampler {p.sampler.num_steps} steps", f"  prompt: {p.prompt}", "  weights:"]
    experts = {"dit": "dit (high noise)", "dit_low_noise": "dit (low noise)"} if preset.backbone.dit_low_noise else {}
    for name, w in weights.items():
        lines.append(f"    {experts.get(name, name):24s} {'present' if w['present'] else 'MISSING':8s} "
                     f"{human_bytes(w['bytes']):>9s}  {w['ref']}")
    if doc["missing"]:
        pulls = [_hint(opts, preset)] if any(k != "rife" and not w["present"] for k, w in weights.items()) else []
        pulls += ["cine models pull rife"] if "rife" in weights and not weights["rife"]["present"] else []
        lines.append(f"  missing weights ({human_bytes(doc['download_bytes'])}) download on first run, or now with: "
                     + " and ".join(pulls))
    tiles = f" ({mp.vae_tile}-px tiles: memory needs them; ~{TILED_COST:g}x the time of whole frames)" if mp.vae_tile else ""
    dit = f"DiT {mp.quantize} ({human_bytes(mp.dit_bytes)}) {mp.dit}"
    if mp.experts > 1:  # Wan2.2 A14B: one expert in use at a time, so the peaks hold one of them
        from .generate.sampler import expert_schedule

        order = expert_schedule(p.sampler)
        high = order.count("high_noise")
        dit = (f"2 DiT experts, one at a time: high noise steps 1-{high}, low noise steps {high + 1}-{len(order)}; "
               f"each {mp.quantize} ({human_bytes(mp.dit_bytes)}) {mp.dit}")
    clip = "CLIP and VAE" if preset.backbone.image_encoder is not None else "no CLIP (the photo enters as VAE latents); VAE"
    lines.append(f"  memory plan on {mp.device}: {dit}, text encoder {mp.text_encoder}, VAE {mp.vae_decode}{tiles}, "
                 f"chunking {mp.chunking} ({CHUNKING_SAYS[mp.chunking]}); {clip} on the {mp.device}")
    for st in mp.stages:
        lines.append(f"    {st.stage:22s} device {human_bytes(st.device_peak_bytes):>9s}   host {human_bytes(st.host_peak_bytes):>9s}")
    sys.stderr.write("\n".join(lines) + "\n")
    return doc
