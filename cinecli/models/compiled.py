"""Regional torch.compile of the DiT: one compiled transformer block reused by all blocks.

Compiling the block (not the whole model) keeps the compile to one small graph: every block runs the same code on
same-shaped tensors, and since torch 2.5 dynamo passes a module's parameters as graph inputs, so the 30 (or 40)
blocks share one compiled artifact. Inductor's on-disk caches go under cine's cache folder (``dirs.cache_dir()``),
so a second run loads the kernels instead of compiling them again.

Off by default, not measured faster anywhere yet: on the 2-core CPU, shared with other jobs, compiling just the
INT4 dequantize function took 197 s (and its output differed in the last bit from eager), while a CPU step is SDPA
and GEMMs that inductor calls as they are; on CUDA it awaits bench/speed.py --compile on a GPU.
"""

from __future__ import annotations

import os

import torch.nn as nn

from ..core.dirs import cache_dir


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
