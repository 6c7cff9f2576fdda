"""The batch manifest (``OUTDIR/manifest.jsonl``): one JSON line per finished item, valid JSONL through any failure.

Each line is one checked write under an exclusive flock, so lines from concurrent shards never interleave, a short
write is cut back, and a torn last line left by a killed run is removed on the next start.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
from pathlib import Path

from ..core.errors import output_error

MANIFEST = "manifest.jsonl"


# Every append takes an exclusive flock, so a repair (truncating a torn tail) never races another shard's append.
def read_manifest(outdir: Path) -> dict[tuple[str, str], dict]:
    """Last line per (rel, effect); lines that are not JSON (torn by an older cine) are skipped."""
    records = {}
    path = outdir / MANIFEST
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            try:
                r = json.loads(line)
                records[(r["rel"], r["effect"])] = r
            except (ValueError, KeyError, TypeError):
                continue
    return records


@contextlib.contextmanager
def _locked_manifest(outdir: Path):
    try:
        fd = os.open(outdir / MANIFEST, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    except OSError as exc:
        raise output_error(exc, outdir / MANIFEST) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield fd
    finally:
        os.close(fd)  # releases the lock


def repair_manifest(outdir: Path) -> int:
    """Cut a torn last line (a run killed or out of space mid-append) so the next line does not glue onto it.

    Returns the number of bytes removed (0 when the file ends in a newline, as it always does when intact).
    """
    if not (outdir / MANIFEST).exists():
        return 0
    with _locked_manifest(outdir) as fd:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0
        tail_start = max(0, size - (1 << 20))  # a manifest line is a few hundred bytes; look back 1 MiB at most
        tail = os.pread(fd, size - tail_start, tail_start)
        if tail.endswith(b"\n"):
            return 0
        cut = tail.rfind(b"\n")
        keep = tail_start + cut + 1 if cut >= 0 else (0 if tail_start == 0 else size)
        os.ftruncate(fd, keep)
        return size - keep


def append_manifest(outdir: Path, record: dict) -> None:
    """One checked write of one whole line, under the lock: lines from concurrent shards never interleave, and a
    short write (disk full) is cut back so the file stays valid JSONL."""
    line = (json.dumps(record, separators=(",", ":")) + "\n").encode()
    with _locked_manifest(outdir) as fd:
        size = os.fstat(fd).st_size
        try:
            written = os.write(fd, line)
            if written != len(line):
                raise OSError(errno.ENOSPC, f"short write ({written} of {len(line)} bytes)")
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)
            raise output_error(exc, outdir / MANIFEST) from None
