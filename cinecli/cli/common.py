"""Helpers every ``cine`` command shares: stderr console, one-line errors with exit codes, offline mode."""

from __future__ import annotations

import functools
import os
import re
import sys
from pathlib import Path

import click
import typer
from typer.core import TyperCommand

try:  # typer 0.2x vendors its own click: its errors are not the click package's classes
    from typer._click import exceptions as click_errors
except ImportError:  # older typer runs on the click package
    from click import exceptions as click_errors  # noqa: F811

from ..core.errors import EXIT_BROKEN_PIPE, EXIT_DEVICE, EXIT_FAILURE, EXIT_INTERRUPTED, CineError, UsageError
from ..core.limits import is_out_of_memory


def stderr_console(quiet: bool = False):
    from rich.console import Console

    console = Console(stderr=True, quiet=quiet, no_color=bool(os.environ.get("NO_COLOR")) or None)
    if not console.is_terminal:
        console.soft_wrap = True  # logs, CI, Slurm files: one record per line, never wrapped at 80 columns
    return console


def fail(message: str, code: int) -> None:
    sys.stderr.write(f"cine: error: {message}\n")
    raise typer.Exit(code)


def handle_errors(fn):
    """One-line errors with documented exit codes instead of tracebacks (``--debug`` or CINE_DEBUG=1 shows them)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        debug = kwargs.get("debug") or os.environ.get("CINE_DEBUG") == "1"
        try:
            return fn(*args, **kwargs)
        except (typer.Exit, typer.Abort, click_errors.ClickException):
            raise
        except CineError as exc:
            if debug:
                raise
            fail(str(exc).splitlines()[0], exc.exit_code)
        except BrokenPipeError:  # `cine … | head`: the reader left; go quietly, as tools killed by SIGPIPE do
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            raise typer.Exit(EXIT_BROKEN_PIPE)
        except KeyboardInterrupt:
            sys.stderr.write("cine: interrupted\n")
            raise typer.Exit(EXIT_INTERRUPTED)
        except MemoryError:
            fail("out of memory; try fewer --frames, a smaller effect size or a quantized backbone", EXIT_DEVICE)
        except Exception as exc:  # noqa: BLE001 - the last line of defence against tracebacks
            if debug:
                raise
            if is_out_of_memory(exc):  # torch.OutOfMemoryError, MPS's and pinned-memory RuntimeErrors (core/limits.py)
                fail(f"the device ran out of memory ({str(exc).splitlines()[0][:120]}); try fewer --frames or a "
                     "quantized backbone", EXIT_DEVICE)
            fail(f"unexpected {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
                 "(rerun with --debug for the traceback)", EXIT_FAILURE)

    return wrapper


def set_offline(offline: bool) -> None:
    if offline:
        os.environ["HF_HUB_OFFLINE"] = "1"  # must be set before huggingface_hub is imported


def complete_device(incomplete: str) -> list[str]:
    """Shell completion for --device (no torch import: completion must be instant)."""
    return [d for d in ("auto", "cpu", "cuda", "cuda:0", "cuda:1", "mps") if d.startswith(incomplete)]


def complete_effect(incomplete: str) -> list[str]:
    """Shell completion for effect names and aliases (comma-separated lists complete their last item)."""
    from ..effects.preset import Catalog

    head, _, last = incomplete.rpartition(",")
    try:
        names = sorted(Catalog().aliases())
    except Exception:  # noqa: BLE001 - a broken user preset must not break the shell
        return []
    return [f"{head + ',' if head else ''}{n}" for n in names if n.startswith(last)]


MODELS_DIR_HELP = "A ComfyUI / Wan2GP / any models folder whose Wan files to use instead of downloading (as CINE_MODELS_DIR)."


def set_models_dir(folder: Path | None) -> None:
    """``--models-dir``: searched first, before CINE_MODELS_DIR's folders and the user config's (weights/scan.py)."""
    if folder is not None:
        if not folder.is_dir():
            raise UsageError(f"--models-dir {folder}: no such folder")
        rest = os.environ.get("CINE_MODELS_DIR", "")
        os.environ["CINE_MODELS_DIR"] = os.pathsep.join(p for p in (str(folder.expanduser()), rest) if p)


def _plain_metavar(match: re.Match) -> str:
    return {"str": "TEXT", "int": "N", "float": "NUMBER", "path": "PATH", "file": "FILE"}.get(match[1], match[1].upper())


class PlainCommand(TyperCommand):
    """Help as users of git, hf or ffmpeg read it: ``Usage: cine bullet-time PHOTO [OPTIONS]``, plain metavars
    (``--seed N``, not Typer's ``--seed <int>``), arguments by their metavar (not ``{image}``)."""

    @staticmethod
    def _arg_name(param: click.Parameter) -> str:
        name = param.metavar or param.name.upper()
        name = name if param.required else f"[{name}]"
        return name + ("..." if param.nargs != 1 else "")

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        args = [self._arg_name(p) for p in self.get_params(ctx) if p.param_type_name == "argument"]
        return [*args, self.options_metavar or "[OPTIONS]"]

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        args, opts = [], []
        for param in self.get_params(ctx):
            record = param.get_help_record(ctx)
            if record is None:
                continue
            if param.param_type_name == "argument":
                args.append((self._arg_name(param).strip("[]"), record[1]))
            else:
                opts.append((re.sub(r"<([\w|\[\], ]+)>", _plain_metavar, record[0]), record[1]))
        for title, rows in (("Arguments", args), ("Options", opts)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)
