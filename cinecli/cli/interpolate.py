"""``cine interpolate IN.mp4 --factor N -o OUT.mp4``: re-time any clip by frame interpolation (RIFE v4.26 by default).

F frames → (F−1)·N+1 at the same frame rate: the clip plays N times slower, its own frames untouched. Every value
and the clip's frame count are checked before any weights are looked up or loaded (exit 2).
"""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Optional

import typer

from ..core.errors import InputError, UsageError
from .common import complete_device, handle_errors, set_offline, stderr_console


def parse_factor(value: str) -> int:
    """``--factor``: a whole number from 2 to 8 (``1.5``, ``1``, ``9`` are exit 2, with the rule said)."""
    from ..effects.rules import FACTORS

    text = str(value).strip()
    number = int(text) if text.lstrip("-").isdigit() else text
    if problem := FACTORS(number):
        raise UsageError(f"--factor {value}: {problem}")
    return number


def default_output(source: str, factor: int, output: str | None) -> str:
    """None → ./<stem>.x<N>.mp4; DIR/ → DIR/<stem>.x<N>.mp4; stdin's stem is ``stdin``."""
    name = f"{'stdin' if source == '-' else Path(source).stem}.x{factor}.mp4"
    if output is None:
        return name
    if output != "-" and (output.endswith("/") or Path(output).is_dir()):
        return str(Path(output) / name)
    return output


@handle_errors
def interpolate(
    source: str = typer.Argument(..., metavar="IN", help="The clip to re-time (an MP4 or any video PyAV reads; - for stdin)."),
    factor: str = typer.Option(..., "--factor", "-n", help="Frames per input interval, 2 to 8: F frames → (F−1)·N+1."),
    output: Optional[str] = typer.Option(None, "-o", "--output", metavar="OUT", help="Output MP4, DIR/ or - for stdout (default ./<stem>.x<N>.mp4)."),
    weights: Optional[Path] = typer.Option(None, "--weights", help="RIFE weights file (a flownet.pkl) instead of the pinned download."),
    interpolator: str = typer.Option("rife", "--interpolator", help="rife (RIFE v4.26) or minterpolate (FFmpeg, no weights)."),
    crf: int = typer.Option(18, "--crf", help="H.264 quality (lower is better, 18 is visually lossless)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps.", autocompletion=complete_device),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the frame counts and the weights (present or missing, size); load nothing."),
    offline: bool = typer.Option(False, "--offline", help="Never touch the network (as HF_HUB_OFFLINE=1)."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="Only the output path on stdout."),
    as_json: bool = typer.Option(False, "--json", help="What was done (frames, interpolator, weights, stage times) as JSON on stdout."),
    no_metadata: bool = typer.Option(False, "--no-metadata", help="Do not embed the settings in the MP4."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Re-time a clip: N−1 synthesized frames between each pair, same fps (cine interpolate in.mp4 --factor 4 -o out.mp4)."""
    set_offline(offline)
    from .. import __version__
    from ..core.sizes import human_bytes
    from ..core.timing import Timings
    from ..effects.rules import check_options
    from ..output.slowdown import output_frames
    from ..output.video import STDOUT, check_output_paths, check_writable, read_frames, write_mp4

    n = parse_factor(factor)
    if as_json and output == "-":
        raise UsageError("--json prints to stdout, which -o - already uses for the video")
    check_options({"crf": crf, "interpolator": interpolator, "device": device})
    if weights is not None and interpolator != "rife":
        raise UsageError(f"--weights is RIFE's; --interpolator {interpolator} uses none")
    out = default_output(source, n, output)
    check_output_paths(out, {"IN": source, "--weights": weights})
    if not dry_run:
        check_writable(out, overwrite)
    timings = Timings()
    with timings.stage("read"):
        if source == "-":
            frames, fps, meta = read_frames(io.BytesIO(sys.stdin.buffer.read()), name="stdin")
        elif not Path(source).is_file():
            raise InputError(f"{source}: no such file")
        else:
            frames, fps, meta = read_frames(source)
    if frames.shape[0] < 2:
        raise UsageError(f"{source}: {frames.shape[0]} frame(s); interpolation needs at least 2")
    if not fps:
        raise UsageError(f"{source}: the clip states no frame rate")
    t, h, w, _ = frames.shape
    console = stderr_console(quiet)
    doc = {"input": source, "output": out, "frames": t, "width": w, "height": h, "fps": float(fps), "factor": n,
           "output_frames": output_frames(t, n), "interpolator": interpolator}
    if dry_run:
        from ..models.rife_weights import locate_rife

        found = locate_rife(weights, record=False) if interpolator == "rife" else None
        if as_json:
            print(json.dumps({**doc, "dry_run": True, "weights": found.as_json() if found else None}, indent=2))
            return
        print(f"[dry-run] {source} → {out}: {t} frames {w}x{h} @ {float(fps):g} fps → {output_frames(t, n)} frames "
              f"(x{n}, {interpolator})", file=sys.stderr)
        if found is not None:
            state = "present" if found.path else "MISSING"
            print(f"  weights: rife {state} {human_bytes(found.bytes)}  {found.name}"
                  + ("" if found.path else "  (fetch: cine models pull rife)"), file=sys.stderr)
        return
    from ..core.devices import choose_device
    from ..output.interpolate import choose

    with timings.stage("load interpolator"):
        interp = choose(interpolator, weights, choose_device(device), explicit_weights=True).load()
    if not quiet:
        console.print(f"cine: interpolating {t} frames {w}x{h} x{n} with {interp.label}", markup=False, highlight=False)
    result = interp.run(frames, n, timings)
    settings = {"cine": __version__, "interpolated": True, "factor": n, "frames": t, "output_frames": result.shape[0],
                "fps": float(fps), "crf": crf, **interp.settings()}
    if meta:  # a clip cine made: what made it, beside how it was re-timed
        settings["source"] = {k: meta[k] for k in ("effect", "seed", "frames", "fps", "backbone") if k in meta}
    with timings.stage("mp4 encode"):
        written = write_mp4(result, out, fps, None if no_metadata else settings, crf=crf, overwrite=overwrite)
    if not quiet:
        stages = ", ".join(f"{k} {v:.2f} s" for k, v in timings.stages.items())
        console.print(f"cine: {stages}", markup=False, highlight=False)
    if as_json:
        print(json.dumps({**doc, "output": str(written), "interpolator": interp.kind, **interp.settings(),
                          "stages": timings.stages, "total_s": sum(timings.stages.values())}, indent=2))
    elif written != STDOUT:
        print(written)
