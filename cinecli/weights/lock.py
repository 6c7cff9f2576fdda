"""The lock file: the resolved hub revision and sha256 of every weight file cine downloaded.

``<platformdirs user_data_dir("cine")>/weights.lock.json`` (``CINE_DATA_DIR`` overrides the folder):

    {"version": 1, "refs": {"<repo>/<file>": {"repo": ..., "file": ..., "revision": "<commit sha>",
                                              "files": {"<path in repo>": {"sha256": ..., "size": ...}}}}}

The first download of a reference without a pinned revision records the commit it resolved to; later
downloads ask for that commit, so a preset keeps producing the same weights. Runs check sizes (cheap);
``cine models verify`` re-hashes everything against the lock.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .. import dirs
from ..errors import WeightsError
from ..preset import WeightRef


def lock_path() -> Path:
    return dirs.data_dir() / "weights.lock.json"


def key(ref: WeightRef) -> str:
    return f"{ref.repo}/{ref.file}"


def read_lock() -> dict:
    path = lock_path()
    if not path.exists():
        return {"version": 1, "refs": {}}
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise WeightsError(f"corrupt lock file {path}: {exc}; delete it to start over") from None
    data.setdefault("refs", {})
    return data


def write_lock(data: dict) -> None:
    path = lock_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def sha256(path: Path, chunk: int = 16 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def pinned_revision(ref: WeightRef) -> str | None:
    """The preset's revision, else the one recorded at first download, else None (the hub's default branch)."""
    if ref.revision:
        return ref.revision
    entry = read_lock()["refs"].get(key(ref))
    return entry["revision"] if entry else None


def record(ref: WeightRef, revision: str, root: Path, files: list[Path]) -> dict:
    """Hash ``files`` (inside snapshot folder ``root``) and store them under ``ref``."""
    data = read_lock()
    entry = {"repo": ref.repo, "file": ref.file, "revision": revision,
             "files": {f.relative_to(root).as_posix(): {"sha256": sha256(f), "size": f.stat().st_size} for f in files}}
    data["refs"][key(ref)] = entry
    write_lock(data)
    return entry


def verify(entry: dict, root: Path, full: bool = True) -> list[str]:
    """Problems of one locked reference's files under ``root``: missing, wrong size, or (``full``) wrong sha256."""
    problems = []
    for rel, want in entry["files"].items():
        path = root / rel
        if not path.exists():
            problems.append(f"{rel}: missing")
        elif path.stat().st_size != want["size"]:
            problems.append(f"{rel}: size {path.stat().st_size} ≠ {want['size']}")
        elif full and sha256(path) != want["sha256"]:
            problems.append(f"{rel}: sha256 differs from the lock")
    return problems
