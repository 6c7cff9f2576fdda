"""Sizes of memory and files, read from and written for people: ``8GB`` → bytes (``--memory-budget``,
``CINE_MEMORY_BUDGET``, ``CINE_EMULATE_DEVICE_MEMORY``) and bytes → ``7.5 GB`` (dry runs, reports, the plan).
Imports nothing (the CLI checks sizes before torch loads)."""

from __future__ import annotations

import re

_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1000, "kib": 1 << 10, "m": 1 << 20, "mb": 10**6, "mib": 1 << 20,
          "g": 1 << 30, "gb": 10**9, "gib": 1 << 30, "t": 1 << 40, "tb": 10**12, "tib": 1 << 40}


def parse_size(text: object) -> int | None:
    """'8GB', '7.5G', '8GiB', '512M', '1000' → bytes (G/M/K alone are binary, GB/MB decimal); None if not a size."""
    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if not found or found.group(2).lower() not in _UNITS or float(found.group(1)) <= 0:
        return None
    return int(float(found.group(1)) * _UNITS[found.group(2).lower()])


def human_bytes(n: int | None) -> str:
    """1536 → '1.5 kB', 32.8e9 → '32.8 GB': decimal units, as the README and --memory-budget's GB (10⁹; GiB is 2³⁰);
    None → '?' (size unknown, e.g. a file not downloaded yet)."""
    if n is None:
        return "?"
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000:
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} TB"
