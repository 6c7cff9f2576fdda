"""Turn weight references into local paths: a local file as is, hub files from the cache or a download.

``HF_HOME``, ``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE`` are read by huggingface_hub when it is imported, so the CLI
sets them (``--offline``) before anything here runs; huggingface_hub is imported lazily for that reason.
Downloads are pinned and hashed in the lock file (weights/lock.py). After resolution every loader reads local
paths only: a run with its weights present never touches the network.
"""

from __future__ import annotations

import fnmatch
import json
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

from ..core.errors import WeightsError
from ..effects.preset import WeightRef
from . import lock


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


def _pattern(file: str) -> str:
    return file + "*" if file.endswith("/") else file


def _is_pattern(file: str) -> bool:
    return file.endswith("/") or any(c in file for c in "*?[")


@dataclass
class Resolved:
    ref: WeightRef
    path: Path | None  # what loaders get (a file, a folder, an index.json); None: not available locally
    files: list[Path] = field(default_factory=list)  # every file it consists of
    root: Path | None = None  # hub snapshot folder
    revision: str | None = None  # hub commit


def _cached(ref: WeightRef) -> Resolved:
    """Look a hub reference up in the local cache only."""
    from huggingface_hub import snapshot_download

    file = ref.file or ""
    try:
        root = Path(snapshot_download(ref.repo, revision=lock.pinned_revision(ref), allow_patterns=[_pattern(file)],
                                      local_files_only=True))
    except Exception:  # LocalEntryNotFoundError and friends: simply not cached
        return Resolved(ref, None)
    files = sorted(p for p in root.rglob("*") if p.is_file() and fnmatch.fnmatch(p.relative_to(root).as_posix(), _pattern(file)))
    if not files:
        return Resolved(ref, None)
    if file.endswith("/"):
        path = root / file  # a folder (a tokenizer, a diffusers component)
    elif len(files) == 1:
        path = files[0]  # a file, or the one match of a glob
    else:
        path = root  # several matches: the loaders pick from the folder
    if file.endswith(".safetensors.index.json"):
        index = root / file
        shards = sorted({index.parent / s for s in json.loads(index.read_text())["weight_map"].values()})
        if not all(s.exists() for s in shards):
            return Resolved(ref, None)
        files, path = [index, *shards], index
    return Resolved(ref, path, files, root, root.name)


def locate(ref: WeightRef) -> Resolved:
    """Where a reference's files are now, without any network access."""
    if ref.path is not None:
        if not ref.path.exists():
            return Resolved(ref, None)
        files = sorted(p for p in ref.path.rglob("*") if p.is_file()) if ref.path.is_dir() else [ref.path]
        return Resolved(ref, ref.path, files)
    return _cached(ref)


def remote_sizes(ref: WeightRef) -> dict[str, int]:
    """Sizes of the files a hub reference needs, asked from the hub (for `cine models pull` to show first)."""
    from huggingface_hub import HfApi

    info = HfApi().model_info(ref.repo, revision=lock.pinned_revision(ref), files_metadata=True)
    sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
    if (ref.file or "").endswith(".safetensors.index.json"):
        prefix = ref.file.rsplit("/", 1)[0] + "/" if "/" in ref.file else ""
        stem = ref.file.rsplit("/", 1)[-1].removesuffix(".safetensors.index.json")
        return {k: v for k, v in sizes.items() if k == ref.file or (k.startswith(prefix + stem) and k.endswith(".safetensors"))}
    return {k: v for k, v in sizes.items() if fnmatch.fnmatch(k, _pattern(ref.file or ""))}


def download(ref: WeightRef) -> Resolved:
    """Fetch a hub reference (shards of an index included) at its pinned revision, then lock what arrived."""
    from huggingface_hub import hf_hub_download, snapshot_download

    file, revision = ref.file or "", lock.pinned_revision(ref)
    try:
        if _is_pattern(file):
            snapshot_download(ref.repo, revision=revision, allow_patterns=[_pattern(file)])
        else:
            local = hf_hub_download(ref.repo, file, revision=revision)
            if file.endswith(".safetensors.index.json"):
                prefix = file.rsplit("/", 1)[0] + "/" if "/" in file else ""
                for shard in sorted(set(json.loads(Path(local).read_text())["weight_map"].values())):
                    hf_hub_download(ref.repo, prefix + shard, revision=revision)
    except Exception as exc:  # network, auth, missing repo: all end the same way for the user
        raise WeightsError(f"could not download {ref}: {str(exc).splitlines()[0]}") from None
    found = _cached(ref)
    if found.path is None:
        raise WeightsError(f"downloaded {ref} but found no matching file in the cache")
    if lock.key(ref) not in lock.read_lock()["refs"]:
        lock.record(ref, found.revision, found.root, found.files)
    return found


def check_against_lock(found: Resolved) -> None:
    """Cheap per-run check (sizes); `cine models verify` does the full sha256."""
    if found.root is None:
        return
    entry = lock.read_lock()["refs"].get(lock.key(found.ref))
    if entry and entry["revision"] == found.revision:
        problems = lock.verify(entry, found.root, full=False)
        if problems:
            raise WeightsError(f"{found.ref} changed since it was downloaded ({problems[0]}); run `cine models verify`")


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
        raise WeightsError(f"missing weights ({why}): {names}; use Wan files already on disk with --models-dir DIR, try "
                           f"the self-test with no download (cine doctor), or fetch them with: {pull_hint}")
    for r in found.values():
        check_against_lock(r)
    local = [f for r in found.values() if r.ref.path is not None for f in r.files]
    lock.note_local(local)
    return {name: r.path for name, r in found.items()}
