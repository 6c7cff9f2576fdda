"""Turn weight references into local paths: a local file as is, hub files from the cache or a download.

``HF_HOME``, ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` are read by huggingface_hub when it is imported, so the CLI
sets them (``--offline``) before anything here runs; huggingface_hub is imported lazily for that reason.
After resolution every loader reads local paths only.
"""

from __future__ import annotations

import fnmatch
import json
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from ..errors import WeightsError
from ..preset import WeightRef


def offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def hub_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP probe of the hub endpoint, so a machine without network fails in seconds, not retries."""
    if offline():
        return False
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _is_pattern(file: str) -> bool:
    return file.endswith("/") or any(c in file for c in "*?[")


@dataclass
class Resolved:
    ref: WeightRef
    path: Path | None  # None: not available locally
    files: list[Path]


def _cached(ref: WeightRef) -> Resolved:
    """Look a hub reference up in the local cache only."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    file = ref.file or ""
    pattern = file + "*" if file.endswith("/") else file
    try:
        root = Path(snapshot_download(ref.repo, revision=ref.revision, allow_patterns=[pattern], local_files_only=True))
    except (LocalEntryNotFoundError, FileNotFoundError, OSError):
        return Resolved(ref, None, [])
    files = sorted(p for p in root.rglob("*") if p.is_file() and fnmatch.fnmatch(p.relative_to(root).as_posix(), pattern))
    if not files:
        return Resolved(ref, None, [])
    if file.endswith(".safetensors.index.json"):
        index = root / file
        shards = {index.parent / s for s in json.loads(index.read_text())["weight_map"].values()}
        if not all(s.exists() for s in shards):
            return Resolved(ref, None, [])
        files = [index, *sorted(shards)]
        return Resolved(ref, index, files)
    if file.endswith("/"):
        return Resolved(ref, root / file, files)
    return Resolved(ref, files[0] if len(files) == 1 or not _is_pattern(file) else root, files)


def locate(ref: WeightRef) -> Resolved:
    """Where a reference's files are now, without any network access."""
    if ref.path is not None:
        return Resolved(ref, ref.path if ref.path.exists() else None, [ref.path] if ref.path.exists() else [])
    return _cached(ref)


def download(ref: WeightRef) -> Resolved:
    """Fetch a hub reference into the HF cache (shards of an index included) and return it."""
    from huggingface_hub import hf_hub_download, snapshot_download

    file = ref.file or ""
    try:
        if _is_pattern(file):
            snapshot_download(ref.repo, revision=ref.revision, allow_patterns=[file + "*" if file.endswith("/") else file])
        else:
            local = hf_hub_download(ref.repo, file, revision=ref.revision)
            if file.endswith(".safetensors.index.json"):
                shards = set(json.loads(Path(local).read_text())["weight_map"].values())
                prefix = file.rsplit("/", 1)[0] + "/" if "/" in file else ""
                for shard in sorted(shards):
                    hf_hub_download(ref.repo, prefix + shard, revision=ref.revision)
    except Exception as exc:  # network, auth, missing repo: all end the same way for the user
        raise WeightsError(f"could not download {ref}: {str(exc).splitlines()[0]}") from None
    found = _cached(ref)
    if found.path is None:
        raise WeightsError(f"downloaded {ref} but found no matching file in the cache")
    return found


def resolve_all(refs: dict[str, WeightRef], pull_hint: str, allow_download: bool = True) -> dict[str, Path]:
    """Every component's local path; downloads what is missing when the hub is reachable.

    Raises one WeightsError listing every missing file and ``pull_hint`` (the command that fetches them).
    """
    found = {name: locate(ref) for name, ref in refs.items()}
    missing = {name: r for name, r in found.items() if r.path is None}
    local_missing = [r for r in missing.values() if r.ref.path is not None]
    if local_missing:
        raise WeightsError("weights not found: " + ", ".join(str(r.ref.path) for r in local_missing))
    if missing and allow_download and hub_reachable():
        for name in missing:
            found[name] = download(refs[name])
        missing = {}
    if missing:
        why = "offline mode" if offline() else "no network"
        names = ", ".join(str(r.ref) for r in missing.values())
        raise WeightsError(f"missing weights ({why}): {names}; fetch them with: {pull_hint}")
    return {name: r.path for name, r in found.items()}
