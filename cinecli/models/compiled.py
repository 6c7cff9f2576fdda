"""Regional torch.compile of the DiT: one compiled transformer block reused by all blocks.

Compiling the block (not the whole model) keeps the compile to one small graph: every block runs the same code on
same-shaped tensors, and since torch 2.5 dynamo passes a module's parameters as graph inputs, so the 30 (or 40)
blocks share one compiled artifact. Inductor's on-disk caches go under cine's cache folder (``dirs.cache_dir()``),
so a second run loads the kernels instead of compiling them again.

Off by default: on the CPU the compile of one block costs minutes (a tiny one took >3 min under contention on the
2-core test machine) against a step made of SDPA and GEMMs that inductor does not speed up; on CUDA it has not
been measured yet (bench/speed.py --compile), so it stays opt-in until it is.
"""

from __future__ import annotations

import os

import torch
import torch.nn as nn

from ..dirs import cache_dir


def compile_cache() -> str:
    """Inductor's cache folder: TORCHINDUCTOR_CACHE_DIR if set, else ``<cine cache>/inductor``."""
    path = os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir() / "inductor"))
    os.makedirs(path, exist_ok=True)
    return path


def compile_blocks(model: nn.Module, **options) -> nn.Module:
    """Compile each of ``model.blocks`` in place (nn.Module.compile: the same code object, so one cached graph)."""
    compile_cache()
    for block in model.blocks:
        block.compile(**options)
    return model
