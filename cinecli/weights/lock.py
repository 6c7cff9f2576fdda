"""The lock file: the resolved hub revision and sha256 of every weight file cine downloaded.

``<platformdirs user_data_dir("cine")>/weights.lock.json`` (``CINE_DATA_DIR`` overrides the folder):

    {"version": 1, "refs": {"<repo>/<file>": {"repo": ..., "file": ..., "revision": "<commit sha>",
                                              "files": {"<path in repo>": {"sha256": ..., "size": ...}}}}}

The first download of a reference without a pinned revision records the commit it resolved to; later
downloads ask for that commit, so a preset keeps producing the same weights. Runs check sizes (cheap);
``cine models verify`` re-hashes everything against the lock.

Local weight files (``{ path = ... }`` references, ComfyUI folders) are recorded on first use under ``"local"``:
``{"<absolute path>": {"size": ..., "mtime_ns": ..., "sha256": ...}}``. Later runs only stat them and re-hash a
file whose size or mtime moved (a warning says when its content changed); ``cine models verify`` re-hashes all.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

from ..core import dirs
from ..core.errors import WeightsError
from ..effects.preset import WeightRef


def lock_path() -> Path:
    return dirs.data_dir() / "weights.lock.json"


def key(ref: WeightRef) -> str:
    return f"{ref.repo}/{ref.file}"


def read_lock() -> dict:
    path = lock_path()
    if not path.exists():
        return {"version": 1, "refs": {}, "local": {}}
    try:
        data = json.loads(path.read_text())
    except ValueError as exc:
        raise WeightsError(f"corrupt lock file {path}: {exc}; delete it to start over") from None
    data.setdefault("refs", {})
    data.setdefault("local", {})
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


# --- local files ---------------------------------------------------------------------------------------------------
WEIGHT_SUFFIXES = (".safetensors", ".sft", ".pth", ".pt", ".bin", ".ckpt", ".pkl", ".gguf")  # what is hashed (not configs, tokenizers)


def weight_files(files: list[Path]) -> list[Path]:
    return [f for f in files if f.suffix in WEIGHT_SUFFIXES]


def check_local(files: list[Path]) -> list[str]:
    """Record local weight files on first use; re-hash only those whose size or mtime changed since.

    Returns one warning per file whose content changed (the record then follows the new content).
    """
    data = read_lock()
    warnings, changed = [], False
    for f in weight_files(files):
        st, name = f.stat(), str(f.resolve())
        old = data["local"].get(name)
        if old and old["size"] == st.st_size and old.get("mtime_ns") == st.st_mtime_ns:
            continue  # unchanged: no hashing (a 30 GB DiT would take a minute)
        digest = sha256(f)
        if old and old["sha256"] != digest:
            warnings.append(f"{f} changed since cine first used it (size {old['size']} → {st.st_size} bytes, "
                            f"sha256 {old['sha256'][:12]}… → {digest[:12]}…)")
        data["local"][name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": digest}
        changed = True
    if changed:
        write_lock(data)
    return warnings


def note_local(files: list[Path]) -> None:
    """``check_local`` with its warnings on stderr (one line each): what runs call for the local files they use."""
    for warning in check_local(files):
        sys.stderr.write(f"cine: warning: {warning}; `cine models verify` checks every file\n")


def verify_local(name: str, entry: dict) -> list[str]:
    """Problems of one recorded local file: missing, or (full re-hash) content differing from the record."""
    path = Path(name)
    if not path.exists():
        return ["missing"]
    if path.stat().st_size != entry["size"]:
        return [f"size {path.stat().st_size} ≠ {entry['size']}"]
    return [] if sha256(path) == entry["sha256"] else ["sha256 differs from the record made at first use"]


def describe(ref: WeightRef, path: Path | None = None) -> str:
    """A reference as shared files show it: ``repo/file`` on the hub, else file names and sha256 (no local path)."""
    if ref.path is None:
        return str(ref)
    target = Path(path or ref.path)
    files = weight_files(sorted(p for p in target.rglob("*") if p.is_file())) if target.is_dir() else [target]
    local = read_lock()["local"]
    shas = [local.get(str(f.resolve()), {}).get("sha256") for f in files]
    if not files or None in shas:
        return target.name + ("/" if target.is_dir() else "")
    if len(files) == 1:
        name = f"{target.name}/{files[0].name}" if target.is_dir() else target.name
        return f"{name} sha256:{shas[0][:16]}"
    combined = hashlib.sha256("".join(f"{f.relative_to(target).as_posix()}:{h}\n" for f, h in zip(files, shas)).encode())
    return f"{target.name}/ ({len(files)} files) sha256:{combined.hexdigest()[:16]}"
