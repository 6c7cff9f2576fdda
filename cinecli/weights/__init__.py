"""Weights: finding files in every layout, reading them lazily, and normalizing their key names."""

from .files import Source, iter_tensors, read_config, read_shapes, resolve_files
from .keys import normalize_dit_keys, normalize_keys

__all__ = ["Source", "iter_tensors", "read_config", "read_shapes", "resolve_files", "normalize_dit_keys", "normalize_keys"]
