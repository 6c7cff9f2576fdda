"""The ``cine`` command line: ``cine EFFECT PHOTO -o OUT.mp4`` and its helper commands.

Conventions (as the ``hf`` CLI): progress and messages on stderr, machine output on stdout, the output path on
the last line of stdout, ``--json`` for a JSON document instead, ``-q`` for nothing but the path. Heavy imports
(torch, huggingface_hub) happen inside commands, after ``--offline`` has set the environment they read.
Expected failures print one line and exit with the codes of ``cinecli.core.errors`` (README: Exit codes).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import click
import typer
from typer.core import TyperGroup

from .. import __version__
from ..core.errors import EXIT_USAGE, CineError, UsageError
from .batch import batch
from .common import (
    MODELS_DIR_HELP,
    PlainCommand,
    complete_device,
    complete_effect,
    fail,
    handle_errors,
    set_models_dir,
    set_offline,
    stderr_console,
)
from .interpolate import interpolate
from .quantize import quantize
from .weights import lora_app, models_app


class EffectGroup(TyperGroup):
    """``cine bullet-time …`` is ``cine run --effect bullet-time …``: any first word that is not a command is an effect."""

    def resolve_command(self, ctx: click.Context, args: list[str]):
        if args and not args[0].startswith("-") and args[0] not in self.commands:
            word = args[0]
            self.check_effect_word(word)
            _, cmd, rest = super().resolve_command(ctx, ["run", "--effect-word", word, *args[1:]])
            return word, cmd, rest  # usage lines and errors say `cine bullet-time`, not `cine run`
        if args and args[0] == "batch":  # `--ray` alone means a local Ray instance; `--ray ADDRESS` a cluster
            for i, a in enumerate(args):
                if a == "--ray" and (i + 1 == len(args) or args[i + 1].startswith("-")):
                    args = [*args[: i + 1], "local", *args[i + 1:]]
                    break
        return super().resolve_command(ctx, args)

    def check_effect_word(self, word: str) -> None:
        """A first word that is neither a command nor an effect: suggest the command (``efects`` → effects) or the
        effect (``bulet-time`` → bullet-time) it is closest to, before Click complains about a missing PHOTO."""
        import difflib

        from ..effects.preset import Catalog

        try:
            catalog = Catalog()
            if word.strip().lower() in catalog.aliases():
                return
        except CineError:
            return  # a broken catalog: the run reports it
        close = difflib.get_close_matches(word, list(self.commands), n=1, cutoff=0.6)
        if close:
            fail(f"No such command '{word}'. Did you mean '{close[0]}'?", EXIT_USAGE)
        try:
            catalog.resolve(word)
        except CineError as exc:
            fail(f"No such command or effect '{word}': {str(exc).splitlines()[0]}", EXIT_USAGE)

    def shell_complete(self, ctx, incomplete: str):
        """`cine <TAB>`: the commands and every effect name and alias (an effect is a first word too)."""
        items = super().shell_complete(ctx, incomplete)
        try:
            from typer._click.shell_completion import CompletionItem
        except ImportError:  # older typer on the click package
            from click.shell_completion import CompletionItem
        from .common import complete_effect

        return items + [CompletionItem(name) for name in complete_effect(incomplete) if "," not in name]

    def format_usage(self, ctx, formatter):
        formatter.write_usage("cine", "EFFECT PHOTO [-o OUT.mp4] [OPTIONS]  |  cine COMMAND [ARGS]...")


app = typer.Typer(
    cls=EffectGroup, no_args_is_help=True, pretty_exceptions_show_locals=False, rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    help="Turn a photo into a short cinematic clip. Effects: bullet-time (bulletti), dolly-zoom (hitchcock), "
         "slow-motion (slowmo); `cine effects` lists them all.",
)


def _print_version(value: bool) -> None:
    if value:
        print(__version__)
        raise typer.Exit()


@app.callback()
def _global_options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True, help="Print cine's version and exit."),
) -> None:
    pass


@app.command("run", cls=PlainCommand)
@handle_errors
def run(
    image: str = typer.Argument(..., metavar="PHOTO", help="Photo to animate (a file, or - to read it from stdin)."),
    output: Optional[str] = typer.Option(None, "-o", "--output", metavar="OUT", help="Output MP4, DIR/ (names it <stem>.<effect>.mp4) or - for stdout."),
    effect: Optional[str] = typer.Option(None, "--effect", "-e", help="Effect or alias (cine effects lists them).",
                                         autocompletion=complete_effect),
    preset_file: Optional[Path] = typer.Option(None, "--preset", help="A preset TOML file to use instead of a named effect."),
    backbone: Optional[str] = typer.Option(None, "--backbone", help="Use another backbone than the preset's."),
    prompt: Optional[str] = typer.Option(None, "--prompt", "-p", help="Replace the preset's prompt (trigger words are kept)."),
    negative_prompt: Optional[str] = typer.Option(None, "--negative-prompt"),
    seed: Optional[int] = typer.Option(None, "--seed", "-s", help="Random seed (recorded in the file; random if left out)."),
    frames: Optional[int] = typer.Option(None, "--frames", "-f", help="Frame count, rounded to 4k+1 (preset default 49)."),
    fps: Optional[int] = typer.Option(None, "--fps", help="Frames per second of the MP4 (preset default 16)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Override the sampler's step count (distilled presets warn)."),
    fit: str = typer.Option("crop", "--fit", help="How the photo meets the frame: crop, pad or stretch."),
    last_frame: Optional[str] = typer.Option(None, "--last-frame", help="End image (backbones that support it)."),
    slowdown: Optional[str] = typer.Option(None, "--slowdown", help="Synthesize frames after decoding: 2 to 8x longer at the same fps, or off (slow-motion: 2)."),
    interpolator: Optional[str] = typer.Option(None, "--interpolator", help="Frame interpolation for --slowdown/--fast-frames: rife (default) or minterpolate."),
    fast_frames: bool = typer.Option(False, "--fast-frames", help="Generate (F-1)/2+1 frames and interpolate x2 back to F (same fps)."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N or mps.", autocompletion=complete_device),
    dtype: str = typer.Option("auto", "--dtype", help="Weight dtype: auto, bf16, fp16 or fp32."),
    crf: int = typer.Option(18, "--crf", help="H.264 quality (lower is better, 18 is visually lossless)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    report_file: Optional[Path] = typer.Option(None, "--report", help="Write the timing report (JSON) here."),
    as_json: bool = typer.Option(False, "--json", help="Print the timing report as JSON on stdout."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress; only the output path on stdout."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the resolved job and the weights it needs; load nothing."),
    offline: bool = typer.Option(False, "--offline", help="Never touch the network (as HF_HUB_OFFLINE=1)."),
    models_dir: Optional[Path] = typer.Option(None, "--models-dir", help=MODELS_DIR_HELP),
    no_metadata: bool = typer.Option(False, "--no-metadata", help="Do not embed the settings in the MP4."),
    quantize_recipe: Optional[str] = typer.Option(None, "--quantize", help="Quantize the DiT at load: hybrid, compact, fp8, int8 or none."),
    strength: Optional[float] = typer.Option(None, "--strength", help="Effect LoRA strength (default: the LoRA card's)."),
    fast_decode: bool = typer.Option(False, "--fast-decode", help="Decode with the tiny VAE (TAEW2.1): faster, softer."),
    sampler: Optional[str] = typer.Option(None, "--sampler", help="distill, euler or unipc (default: the backbone's)."),
    distill_step: Optional[str] = typer.Option(None, "--distill-step", help="Distilled backbones: renoise (default) or euler."),
    offload: str = typer.Option("auto", "--offload", help="DiT weights: auto, none (all on the device) or blocks (streamed from host memory)."),
    memory_budget: Optional[str] = typer.Option(None, "--memory-budget", help="Cap the memory plan, e.g. 8GB (else CINE_MEMORY_BUDGET)."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
    effect_word: Optional[str] = typer.Option(None, "--effect-word", hidden=True),  # `cine EFFECT …` (EffectGroup)
) -> None:
    """Make a clip from PHOTO with an effect: cine bullet-time photo.jpg -o out.mp4"""
    set_offline(offline)
    set_models_dir(models_dir)
    from ..effects.rules import check_choices
    from ..run import RunOptions, run_one

    if as_json and output == "-":
        raise UsageError("--json prints to stdout, which -o - already uses for the video; use --report FILE")
    check_choices(effect_word, effect, preset_file)  # the values themselves: run_one → checks.check_options
    effect = effect_word or effect
    if effect is None and preset_file is None:
        raise UsageError("name an effect (cine bullet-time PHOTO) or pass --preset FILE")
    opts = RunOptions(
        image=image, output=output, effect=effect, preset_file=preset_file, backbone=backbone, prompt=prompt,
        negative_prompt=negative_prompt, seed=seed, frames=frames, fps=fps, steps=steps, fit=fit, last_frame=last_frame,
        device=device, dtype=dtype, crf=crf, overwrite=overwrite, report_file=report_file, as_json=as_json,
        quiet=quiet, dry_run=dry_run, metadata=not no_metadata, quantize=quantize_recipe, strength=strength,
        fast_decode=fast_decode, sampler=sampler, distill_step=distill_step, slowdown=slowdown, offload=offload,
        memory_budget=memory_budget, interpolator=interpolator, fast_frames=fast_frames,
    )
    run_one(opts, stderr_console(quiet))


@app.command("effects", cls=PlainCommand)
@handle_errors
def effects(
    preset_file: Optional[Path] = typer.Option(None, "--preset", help="Also show this preset file."),
    as_json: bool = typer.Option(False, "--json", help="JSON on stdout."),
) -> None:
    """List the effects (presets), their aliases and backbones."""
    from ..effects.preset import Catalog

    catalog = Catalog(extra_preset=preset_file)
    rows = []
    for name in catalog.names():
        p = catalog.resolve(name)
        rows.append({"effect": p.name, "aliases": list(p.aliases), "backbone": p.backbone.name,
                     "lora": p.effect.name if p.effect else None, "frames": p.frames, "fps": p.fps,
                     "steps": p.effective_sampler.num_steps, "description": p.description, "source": str(p.source)})
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if not sys.stdout.isatty():  # a pipe or a script: the names, one per line (`cine effects | head -1`)
        print("\n".join(r["effect"] for r in rows))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table("effect", "aliases", "backbone", "effect LoRA", "frames", "steps")
    for r in rows:
        table.add_row(r["effect"], ", ".join(r["aliases"]), r["backbone"], r["lora"] or "(prompt only)", str(r["frames"]), str(r["steps"]))
    table.columns[2].no_wrap = True  # backbone names are identifiers: whole, never cut with …
    Console(width=max(Console().width, 120)).print(table)  # a terminal: the table alone


@app.command("info", cls=PlainCommand)
@handle_errors
def info(
    files: list[str] = typer.Argument(..., help="MP4s written by cine, or - for one on stdin (`… -o - | cine info -`)."),
    as_json: bool = typer.Option(False, "--json", help="JSON on stdout (a list when several files are given)."),
) -> None:
    """Show clips' stream facts and the settings cine stored in them."""
    import io

    from ..output.video import read_info

    docs = []
    for file in files:
        if file == "-":
            docs.append(read_info(io.BytesIO(sys.stdin.buffer.read()), name="stdin"))
            continue
        if not Path(file).exists():
            fail(f"{file}: no such file", 3)
        docs.append(read_info(file))
    if as_json:
        print(json.dumps(docs[0] if len(docs) == 1 else docs, indent=2))
        return
    for data in docs:
        print(f"{data['path']}: {data['codec']} {data['width']}x{data['height']} {data['frames']} frames @ {data['fps']} fps")
        for key, value in (data.get("cine") or {}).items():
            print(f"  {key}: {readable(value)}")
        if not data.get("cine"):
            print("  (no cine metadata)")


@app.command("doctor", cls=PlainCommand)
@handle_errors
def doctor(
    as_json: bool = typer.Option(False, "--json", help="JSON on stdout."),
    selftest: bool = typer.Option(True, "--selftest/--no-selftest", help="Run the pipeline on the tiny self-test backbone."),
    device: str = typer.Option("auto", "--device"),
    offline: bool = typer.Option(False, "--offline"),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """Versions, devices, codecs, caches and weights present; then a self-test of the whole pipeline."""
    set_offline(offline)
    from .doctor import run_doctor

    code = run_doctor(as_json=as_json, run_selftest=selftest, device=device, console=stderr_console())
    raise typer.Exit(code)


from . import scan  # noqa: E402,F401 - registers `cine models scan`

app.add_typer(models_app, name="models")
app.add_typer(lora_app, name="lora")
app.command("quantize", cls=PlainCommand)(quantize)
app.command("batch", cls=PlainCommand)(batch)
app.command("interpolate", cls=PlainCommand)(interpolate)


@app.command("version")
def version() -> None:
    """Print cine's version."""
    print(__version__)


SHELLS = ("bash", "zsh", "fish", "powershell", "pwsh")


def readable(value) -> str:
    """A metadata value as a person reads it: none, a, b, k=v — not Python's None, ['a'], {'k': v}."""
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ", ".join(map(readable, value)) or "none"
    if isinstance(value, dict):
        return ", ".join(f"{k}={readable(v)}" for k, v in value.items()) or "none"
    return str(value)


def main() -> None:
    """The ``cine`` entry point. Click's own usage errors (``--frames 1.5``, ``--bogus``) print as one
    ``cine: error:`` line like every other error (exit 2), not Click's four-line block."""
    from .common import click_errors

    args = sys.argv[1:]
    if len(args) == 2 and args[0] == "--show-completion" and args[1] in SHELLS:  # a named shell, not the detected one
        try:
            from typer._completion_shared import get_completion_script
        except ImportError:  # another typer: its own --show-completion handles it
            pass
        else:
            print(get_completion_script(prog_name="cine", complete_var="_CINE_COMPLETE", shell=args[1]))
            sys.exit(0)
    try:
        code = app(prog_name="cine", standalone_mode=False)
    except getattr(click_errors, "NoArgsIsHelpError", ()) as exc:  # bare `cine`: the help, as before
        exc.show()
        sys.exit(exc.exit_code)
    except click_errors.ClickException as exc:
        message = (exc.format_message() or type(exc).__name__).strip().splitlines()[0]
        ctx = getattr(exc, "ctx", None)
        where = " ".join(ctx.command_path.split()[1:]) if ctx is not None else ""
        sys.stderr.write(f"cine: error: {message[:1].lower() + message[1:]} (cine {where + ' ' if where else ''}-h for help)\n")
        sys.exit(exc.exit_code)
    except (getattr(click_errors, "Abort", typer.Abort), typer.Abort):
        sys.stderr.write("cine: interrupted\n")
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
