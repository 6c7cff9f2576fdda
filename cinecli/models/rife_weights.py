"""Where RIFE's ``flownet.pkl`` comes from, like every other component's weights (weights/hub.py, weights/lock.py).

In this order, with no network access unless a download is allowed and needed:
  1. ``--weights FILE`` (a ``flownet.pkl`` or any file in its key layout): recorded in the lock file's ``local``
     table (size, mtime, sha256) on first use, as every local weight file is;
  2. the Hugging Face cache: ``hzwer/RIFE`` / ``RIFEv4.26_0921.zip`` at a pinned commit (the archive the authors
     publish; it holds ``train_log/flownet.pkl`` beside the model code, which cine does not run);
  3. a RIFE v4.25/4.26 ``.pkl`` in a models folder (``--models-dir``, ``CINE_MODELS_DIR``, ``models_dirs``; found by
     its key names, never its file name: ``cine models scan``);
  4. a download of the archive (``cine models pull rife`` does it ahead), locked with its sha256 like every download.
The archive's ``flownet.pkl`` is extracted once into ``<cache>/rife/<commit>/`` with its sha256 beside it, so later
runs read the 25 MB file directly and the MP4's metadata names it by hash without re-hashing.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..core import dirs
from ..core.errors import WeightsError
from ..effects.preset import WeightRef
from ..weights import lock

RIFE_REF = WeightRef(repo="hzwer/RIFE", file="RIFEv4.26_0921.zip", revision="01fdc7e97404120c243c3ea7b427046e5dc7643e",
                     bytes=22_869_906)
# The archive's sha256 as its users pin it (found with the search tool in public fetch scripts, beside the same
# revision and size): checked once, before the first extraction, since the pickle inside is what cine will load.
ARCHIVE_SHA256 = "1fa9b9cda3d9b8c3e301359e2595960902f97bf926c08598b0e9957a3f3f760e"
MEMBER = "flownet.pkl"
PULL_HINT = "cine models pull rife"


@dataclass
class RifeWeights:
    path: Path | None  # the flownet.pkl to load; None: not available without a download
    source: str  # "--weights", "hub cache", "models dir" or "hub" (missing)
    name: str  # what MP4 metadata and reports say: hub repo/file, or a local file's name (never its folder)
    bytes: int | None  # on disk, else the declared download size
    sha256: str | None = None  # of flownet.pkl; None until it is known (a missing file)

    def as_json(self) -> dict:
        return {"ref": self.name, "present": self.path is not None, "bytes": self.bytes, "source": self.source,
                "path": str(self.path) if self.path else None}


def _extracted(archive: Path) -> Path:
    """The archive's flownet.pkl in cine's cache, extracted on first use (atomically: a killed run leaves none)."""
    folder = dirs.cache_dir() / "rife" / (RIFE_REF.revision or "unpinned")[:16]
    target = folder / MEMBER
    if target.is_file() and (folder / f"{MEMBER}.sha256").is_file():
        return target
    if (digest := lock.sha256(archive)) != ARCHIVE_SHA256:
        raise WeightsError(f"{archive.name} is not the published RIFE v4.26 archive (sha256 {digest[:16]}…, expected "
                           f"{ARCHIVE_SHA256[:16]}…); delete it and run `{PULL_HINT}`, or pass --weights FILE")
    try:
        with zipfile.ZipFile(archive) as zf:
            # by name, never extractall: the archive also holds Mac metadata (__MACOSX/) and Python code
            names = [n for n in zf.namelist() if n.rsplit("/", 1)[-1] == MEMBER and not n.startswith("__MACOSX/")]
            if len(names) != 1:
                raise WeightsError(f"{archive.name} holds {len(names)} {MEMBER} files, expected one; run "
                                   "`cine models verify`")
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{MEMBER}.{os.getpid()}.tmp"
            with zf.open(names[0]) as src, open(tmp, "wb") as dst:
                while block := src.read(1 << 20):
                    dst.write(block)
    except (zipfile.BadZipFile, OSError) as exc:
        raise WeightsError(f"cannot extract {MEMBER} from {archive}: {exc}; run `cine models verify`") from None
    (folder / f"{MEMBER}.sha256").write_text(lock.sha256(tmp) + "\n")
    os.replace(tmp, target)
    return target


def _from_models_dirs() -> Path | None:
    """The first RIFE v4.25/4.26 .pkl in the models folders (by its key names and Head width)."""
    from .scan import identify, models_dirs

    for folder in models_dirs():
        if not folder.is_dir():
            continue
        for path in sorted(folder.rglob("*.pkl")):
            if not any(p.startswith(".") for p in path.relative_to(folder).parts) and path.is_file():
                found = identify(path)
                if found.kind == "rife" and found.info.get("fits"):
                    return path
    return None


def _local(path: Path, source: str, record: bool) -> RifeWeights:
    if record:
        lock.note_local([path])  # hashed once per file version into the lock file's "local" table
    entry = lock.read_lock()["local"].get(str(path.resolve()), {})
    return RifeWeights(path, source, path.name, path.stat().st_size, entry.get("sha256"))


def locate_rife(weights_file: Path | None = None, record: bool = True) -> RifeWeights:
    """Where the weights are now, without network access; ``path`` None when only a download would bring them.
    A ``--weights FILE`` that does not exist is an error (exit 4), not a reason to look elsewhere. ``record``: hash a
    local file into the lock file (runs that use it); plans and --dry-run only look (its sha256 may be None)."""
    from ..weights.hub import locate

    if weights_file is not None:
        path = Path(weights_file).expanduser()
        if not path.is_file():
            raise WeightsError(f"--weights {weights_file}: no such file")
        return _local(path, "--weights", record)
    found = locate(RIFE_REF)
    if found.path is not None:
        pkl = _extracted(found.path)
        sha = (pkl.parent / f"{MEMBER}.sha256").read_text().strip()
        return RifeWeights(pkl, "hub cache", str(RIFE_REF), found.path.stat().st_size, sha)
    if (path := _from_models_dirs()) is not None:
        return _local(path, "models dir", record)
    return RifeWeights(None, "hub", str(RIFE_REF), RIFE_REF.bytes)


def resolve_rife(weights_file: Path | None = None, allow_download: bool = True) -> RifeWeights:
    """``locate_rife``, then a download when allowed and the hub answers; else one line naming the pull command."""
    from ..weights.hub import check_against_lock, download, hub_reachable, locate, offline

    found = locate_rife(weights_file)
    if found.path is not None:
        if found.source == "hub cache":
            check_against_lock(locate(RIFE_REF))
        return found
    if allow_download and hub_reachable():
        download(RIFE_REF)
        return locate_rife()
    why = "offline mode" if offline() else "no network" if allow_download else "no download asked"
    raise WeightsError(f"missing RIFE weights ({why}): {RIFE_REF}; fetch them with: {PULL_HINT}, or pass "
                       "--weights FILE (a flownet.pkl)")

