"""Weights: finding files in every layout, reading them lazily, normalizing their key names (keys.py, the one
normalizer), LoRA files, GGUF, and fetching and pinning them (hub.py, lock.py). May import effects/ and core/."""

from .files import Source, iter_tensors, read_config, read_shapes, resolve_files
from .keys import normalize_dit_keys, normalize_keys

__all__ = ["Source", "iter_tensors", "read_config", "read_shapes", "resolve_files", "normalize_dit_keys", "normalize_keys"]
