"""Quantize once: a 16-bit DiT quantized at load is written to cine's cache and memory-mapped on later runs.

The first run loads the checkpoint on the CPU (memory-mapped), merges the backbone's LoRAs, and quantizes it layer
by layer as ``recipes.write_quantized`` writes the result (the same self-describing file ``cine quantize`` writes)
atomically into ``<cache>/dit/``, dropping each source layer's pages once written. Then it loads that file like
any pre-quantized checkpoint, so the first run and every later one hold the same thing: the quantized file's
pages, never the 16-bit source's.

The file name carries a key over everything that changes the result: each source file's resolved path, size and
modification time, the recipe with its overrides, the merged LoRAs (same identity) with their strengths, and
``FORMAT``. A different source, recipe or LoRA gets a new file instead of reusing a stale one.
"""

from __future__ import annotations

import gc
import hashlib
import json
import sys
from pathlib import Path

import torch

from ..core.dirs import cache_dir
from ..weights.files import resolve_files

FORMAT = 1  # bump when the quantized layout changes, so old cache files are not reused


def _identity(path: Path, patterns: tuple[str, ...]) -> list[str]:
    return [f"{f.resolve()}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in resolve_files(path, patterns)]


def identity(path: Path, patterns: tuple[str, ...]) -> list[str]:
    """The cache key of a source: each file's resolved path, size and modification time (shared with the VAE's)."""
    return _identity(path, patterns)


def cached_path(source: Path, recipe, merges: list[tuple[Path, float]]) -> Path:
    """Where the converted file for this source, recipe and merged LoRAs lives (it may not exist yet)."""
    from .dit_loader import DIT_PATTERNS

    key = json.dumps({
        "format": FORMAT, "dit": _identity(Path(source), DIT_PATTERNS), "recipe": recipe.name,
        "overrides": sorted(recipe.overrides.items()),
        "merge": [[_identity(Path(p), ("*.safetensors", "*.pth")), strength] for p, strength in merges],
    }, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    stem = Path(source).name.split(".safetensors")[0].split(".pth")[0] or "dit"
    return cache_dir() / "dit" / f"{stem}.{recipe.name}.{digest}.safetensors"


def is_prequantized(source: Path) -> bool:
    """A checkpoint that comes quantized (``cine quantize`` output, ComfyUI/lightx2v fp8 or int8): loaded as is."""
    from ..weights.files import read_header
    from .dit_loader import DIT_PATTERNS
    from .recipes import read_metadata

    if read_metadata(source) is not None:
        return True
    return any(dt in (torch.float8_e4m3fn, torch.int8) for _, dt in read_header(source, DIT_PATTERNS).values())


def load_quantized(source: Path, recipe, merges: list[tuple[Path, float, str]], *, device: torch.device,
                   dtype: torch.dtype):
    """The DiT of ``source`` with ``merges`` applied and quantized by ``recipe``: from the cache, or converted once."""
    from . import load_dit
    from .adapters import merge_into
    from .load import release_source, trim_heap
    from .recipes import quantize_dit, write_quantized

    target = cached_path(source, recipe, [(p, s) for p, s, _ in merges])
    if target.is_file():
        return load_dit(target, device=device, dtype=dtype)
    model = load_dit(source, device="cpu", dtype=dtype)  # converted on the CPU: the device never holds 16-bit weights
    for path, strength, name in merges:
        merge_into(model, path, strength=strength, what=f"LoRA {name}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        write_quantized(model, target, recipe)  # layer by layer: one layer's quantized copy at a time
    except OSError as exc:  # a read-only or full cache only costs the conversion next time
        print(f"warning: could not cache the quantized DiT in {target.parent}: {exc.strerror or exc}", file=sys.stderr)
        quantize_dit(model, recipe)
        return release_source(model).to(device)  # unmap the 16-bit file: only the quantized copy stays
    del model
    gc.collect()
    trim_heap()  # give the conversion's heap back before the cached file is mapped
    return load_dit(target, device=device, dtype=dtype)
