"""``cine batch INPUT... -e EFFECT[,EFFECT…] -o OUTDIR``: folders of photos in, videos and a manifest out."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional

import typer

from ..batch.items import LAST_FRAME_PATTERN
from ..core.errors import OutputError, UsageError
from .common import (
    MODELS_DIR_HELP,
    complete_device,
    complete_effect,
    handle_errors,
    set_models_dir,
    set_offline,
    stderr_console,
)


@handle_errors
def batch(
    inputs: list[str] = typer.Argument(..., help="Folders, files, globs, or - for newline-separated paths on stdin."),
    effects: Optional[str] = typer.Option(None, "-e", "--effect", help="Effect(s), comma-separated: bullet-time,slowmo.",
                                          autocompletion=complete_effect),
    outdir: Path = typer.Option(..., "-o", "--output", help="Output folder (input subfolders are mirrored)."),
    recursive: bool = typer.Option(False, "-r", "--recursive", help="Descend into subfolders of input folders."),
    name: str = typer.Option("{stem}.{effect}.mp4", "--name", help="Output file name pattern: {stem}, {effect}, {ext}."),
    seed: int = typer.Option(0, "--seed", help="Base seed; each item's seed derives from it and the photo's relative path."),
    frames: Optional[int] = typer.Option(None, "--frames", "-f"),
    fps: Optional[int] = typer.Option(None, "--fps"),
    steps: Optional[int] = typer.Option(None, "--steps"),
    fit: str = typer.Option("crop", "--fit", help="crop, pad or stretch."),
    device: str = typer.Option("auto", "--device", autocompletion=complete_device),
    dtype: str = typer.Option("auto", "--dtype"),
    quantize_recipe: Optional[str] = typer.Option(None, "--quantize", help="Quantize the DiT at load (hybrid, compact, fp8, int8)."),
    backbone: Optional[str] = typer.Option(None, "--backbone"),
    preset_file: Optional[Path] = typer.Option(None, "--preset", help="A preset TOML file instead of named effects."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Redo items that are already done."),
    shard: Optional[str] = typer.Option(None, "--shard", help="i/N: this process's share (default: from RANK/WORLD_SIZE or a Slurm array)."),
    ray: Optional[str] = typer.Option(None, "--ray", help="Run on Ray: --ray alone (a local instance) or --ray ADDRESS (a cluster)."),
    ray_actors: int = typer.Option(1, "--ray-actors", help="CPU actors when the Ray cluster has no GPUs (one per GPU otherwise)."),
    crf: int = typer.Option(18, "--crf"),
    slowdown: Optional[str] = typer.Option(None, "--slowdown", help="2 to 8x longer by frame interpolation (RIFE, or minterpolate offline without it), or off (default: each preset's)."),
    interpolator: Optional[str] = typer.Option(None, "--interpolator", help="Frame interpolation for --slowdown/--fast-frames: rife (default) or minterpolate."),
    fast_frames: bool = typer.Option(False, "--fast-frames", help="Generate (F-1)/2+1 frames and interpolate x2 back to F (same fps)."),
    last_frame_pattern: str = typer.Option(LAST_FRAME_PATTERN, "--last-frame-pattern",
                                           help="Burst pairs: the last-frame photo beside each photo, a glob with {stem} and {ext}."),
    as_json: bool = typer.Option(False, "--json", help="Stream one JSON line per item on stdout as items finish."),
    quiet: bool = typer.Option(False, "-q", "--quiet"),
    offline: bool = typer.Option(False, "--offline"),
    models_dir: Optional[Path] = typer.Option(None, "--models-dir", help=MODELS_DIR_HELP),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """Turn many photos into clips with one model load; resumable, isolated per item, shardable.

    Exit codes: 0 every item made (or already done), 8 some items failed (see manifest.jsonl), 130 interrupted.
    """
    set_offline(offline)
    set_models_dir(models_dir)
    from ..batch.driver import run_batch
    from ..batch.items import BatchOptions, parse_shard
    from ..effects.rules import check_choices, check_options
    from ..output.slowdown import parse_slowdown

    if effects is None and preset_file is None:
        raise UsageError("name the effect(s) with -e bullet-time[,slow-motion] or pass --preset FILE")
    check_choices(effects=effects, preset_file=preset_file)
    check_options(locals())  # every option by its parameter name, against the one table (checks.RULES)
    if outdir.exists() and not outdir.is_dir():
        raise OutputError(f"-o {outdir} exists and is not a folder")  # the output cannot be written: exit 6
    opts = BatchOptions(
        inputs=inputs, effects=[e.strip() for e in effects.split(",") if e.strip()] if effects else [],
        outdir=outdir, recursive=recursive, name=name, seed=seed, frames=frames, fps=fps, steps=steps, fit=fit,
        device=device, dtype=dtype, quantize=quantize_recipe, backbone=backbone, preset_file=preset_file,
        overwrite=overwrite, shard=parse_shard(shard), crf=crf, as_json=as_json, quiet=quiet,
        slowdown=parse_slowdown(slowdown), interpolator=interpolator, fast_frames=fast_frames,
        last_frame_pattern=last_frame_pattern,
        extra={"ray_actors": ray_actors},
    )
    remote = None
    if ray is not None:
        from ..batch.ray_driver import run_on_ray

        remote = functools.partial(run_on_ray, address=ray)
    raise typer.Exit(run_batch(opts, stderr_console(quiet), remote=remote))
