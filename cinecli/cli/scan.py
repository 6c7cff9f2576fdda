"""``cine models scan DIR``: what each weight file in a ComfyUI / Wan2GP / any folder is, read from its header."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from ..core.errors import UsageError
from ..core.sizes import human_bytes
from .common import handle_errors, stderr_console
from .weights import models_app


@models_app.command("scan")
@handle_errors
def models_scan(folder: Path = typer.Argument(..., help="A models folder (ComfyUI's models/, Wan2GP's ckpts/, any)."),
                as_json: bool = typer.Option(False, "--json", help="One JSON document on stdout."),
                remember: bool = typer.Option(False, "--remember", help="Use this folder in every later run (user config).")) -> None:
    """Identify Wan files by content (keys, shapes, dtypes): DiT, umT5, CLIP, VAE, LoRA or unknown. Only which
    Wan2.2 expert a file holds (high or low noise: one shape) comes from its metadata or, else, its name."""
    from ..models.scan import remember as remember_folder
    from ..models.scan import scan

    found = scan(folder)
    if as_json:
        print(json.dumps([f.as_dict() for f in found], indent=2))
    else:
        for f in found:
            shown = f.path.relative_to(folder) if folder.is_dir() else f.path
            print(f"{f.kind:13s} {human_bytes(f.bytes):>9s}  {f.label:34s} {shown}")
        if not found:
            print(f"no .safetensors or .gguf files under {folder}")
    if remember:
        if not folder.is_dir():
            raise UsageError(f"--remember takes a folder; {folder} is a file")
        where = remember_folder(folder)
        stderr_console().print(f"runs will look in {folder} (saved in {where})", highlight=False)
