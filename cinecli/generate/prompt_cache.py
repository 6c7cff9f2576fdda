"""Prompt embeddings cached on disk, so the 11 GB text encoder loads only for a prompt never seen before.

Key: sha256 of (text-encoder identity, prompt). The identity is the encoder file's resolved path, size and
modification time (cheap to compute; a re-downloaded or edited file gets new entries). Values are safetensors
files holding the trimmed states [L, 4096] in the encoder's dtype, under ``user_cache_dir("cine")/prompts``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..core import dirs


def cache_dir() -> Path:
    return dirs.cache_dir() / "prompts"


def encoder_identity(path: Path) -> str:
    path = Path(path).resolve()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return "|".join(f"{p}:{p.stat().st_size}:{int(p.stat().st_mtime)}" for p in files)


def cache_key(identity: str, prompt: str) -> str:
    return hashlib.sha256(f"{identity}\0{prompt}".encode()).hexdigest()


def lookup(identity: str, prompt: str) -> torch.Tensor | None:
    path = cache_dir() / f"{cache_key(identity, prompt)}.safetensors"
    if not path.is_file():
        return None
    try:
        return load_file(str(path))["context"]
    except (SafetensorError, KeyError, OSError):
        path.unlink(missing_ok=True)  # a damaged entry is recomputed, not fatal
        return None


def store(identity: str, prompt: str, context: torch.Tensor) -> None:
    folder = cache_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
        final = folder / f"{cache_key(identity, prompt)}.safetensors"
        tmp = final.with_suffix(f".{os.getpid()}.tmp")
        save_file({"context": context.detach().cpu().contiguous()}, str(tmp), metadata={"prompt": prompt[:2000]})
        os.replace(tmp, final)
    except OSError:
        pass  # a read-only cache only costs speed
