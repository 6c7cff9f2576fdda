"""``cine batch``: many photos × effects with one model load, a JSONL manifest, resume, isolation and sharding.

Items are (photo, effect) pairs. Each item's seed derives from the base seed and the photo's path relative to
its input root, and shards pick items by a stable hash of that same path, so a sharded run makes exactly the
videos an unsharded one makes. Outputs appear atomically (video.atomic_file), so a run killed at any moment
leaves finished items intact and no partial file; a rerun skips items whose output exists and whose manifest
line has the same parameters hash.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import string
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..core.errors import UsageError
from ..effects.rules import parse_shard  # noqa: F401 - launcher variables are checked with every other value

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
LAST_FRAME_PATTERN = "{stem}.last.*"  # glob beside the photo: face.jpg + face.last.png is a burst pair


@dataclass
class Item:
    input: str  # absolute path of the photo
    rel: str  # path relative to its input root: mirrors into OUTDIR, seeds and shards by it
    effect: str
    output: str = ""
    seed: int = 0
    prompt: str | None = None  # from a <stem>.txt sidecar
    params_hash: str = ""
    last_frame: str | None = None  # a burst pair's second photo (a <stem>.last.* sidecar, --last-frame-pattern)


@dataclass
class BatchOptions:
    inputs: list[str]
    effects: list[str]
    outdir: Path
    recursive: bool = False
    name: str = "{stem}.{effect}.mp4"
    seed: int = 0
    frames: int | None = None
    fps: int | None = None
    steps: int | None = None
    fit: str = "crop"
    device: str = "auto"
    dtype: str = "auto"
    quantize: str | None = None
    backbone: str | None = None
    preset_file: Path | None = None
    overwrite: bool = False
    shard: tuple[int, int] = (0, 1)
    crf: int = 18
    slowdown: int | None = None  # None: each preset's
    interpolator: str | None = None  # --interpolator rife|minterpolate; None: rife (minterpolate offline without it)
    fast_frames: bool = False  # --fast-frames: generate (F−1)/2+1 frames, interpolate ×2 back to F
    last_frame_pattern: str = LAST_FRAME_PATTERN
    as_json: bool = False
    quiet: bool = False
    extra: dict = field(default_factory=dict)


# --- inputs, seeds, shards ----------------------------------------------------------------------------------------------
def collect(inputs: list[str], recursive: bool, skipped: list[str] | None = None) -> list[tuple[str, str]]:
    """Folders, files, globs and ``-`` (newline-separated paths on stdin) → sorted unique (abs path, rel path).

    Each path as named is its own item: a symlink and its target are two photos, two clips (the user named both).
    Files a folder walk passes over (not an image type, hidden) go to ``skipped``, so the batch can say so.

    ``rel`` is the path below the input's root: the folder given, a glob's literal folder, or for listed files
    (stdin, file arguments) the deepest folder they share, so ``DCIM/100/IMG_0001.jpg`` and ``DCIM/101/IMG_0001.jpg``
    stay ``100/IMG_0001.jpg`` and ``101/IMG_0001.jpg`` however they are spelled (relative, absolute, ``../``).
    """
    found: dict[str, str] = {}
    listed: list[Path] = []  # stdin lines and file arguments: one group, one common root

    def add(path: Path, rel: str) -> None:
        found.setdefault(os.path.abspath(path), rel)  # normalized, not resolved: a link is a path of its own

    for spec in inputs:
        if spec == "-":
            listed += [Path(line.strip()) for line in sys.stdin.read().splitlines() if line.strip()]
        elif any(c in spec for c in "*?["):
            prefix = re.split(r"[*?\[]", spec, maxsplit=1)[0]  # the literal part: paths are relative to its folder
            root = Path(os.path.abspath(prefix if prefix.endswith(("/", os.sep)) else Path(prefix).parent))
            for match in sorted(glob.glob(spec, recursive=True)):
                p = Path(os.path.abspath(match))
                if p.is_file():
                    add(p, p.relative_to(root).as_posix() if p.is_relative_to(root) else p.name)
        elif Path(spec).is_dir():
            root = Path(spec)
            files = root.rglob("*") if recursive else root.iterdir()
            for p in sorted(files):
                if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."):
                    add(p, p.relative_to(root).as_posix())
                elif (p.is_file() or p.is_symlink()) and skipped is not None and not _sidecar(p):
                    skipped.append(str(p))
        else:
            listed.append(Path(spec))  # a file (a missing one fails as an item, not the batch)
    if listed:
        absolute = [Path(os.path.abspath(p)) for p in listed]  # normalized, symlinks kept: the path as named
        root = Path(os.path.commonpath([str(p.parent) for p in absolute]))
        for p in absolute:
            add(p, p.relative_to(root).as_posix())
    return sorted(found.items(), key=lambda kv: kv[1])


def _sidecar(path: Path) -> bool:
    """A prompt file beside a photo (``face.txt`` next to ``face.jpg``): part of an item, not a skipped file."""
    return path.suffix.lower() == ".txt" and any(path.with_suffix(s).exists() for s in IMAGE_SUFFIXES)


def pair_last_frames(found: list[tuple[str, str]], pattern: str) -> tuple[list[tuple[str, str]], dict[str, str]]:
    """Burst pairs: each photo's last-frame sidecar (``pattern`` globbed in the photo's folder, {stem} and {ext}
    filled in; the first image in sorted order wins). Returns the photos that are items (sidecars are not) and
    photo → sidecar."""
    try:
        pattern.format(stem="x", ext="jpg")
    except (KeyError, IndexError, ValueError) as exc:
        raise UsageError(f"--last-frame-pattern '{pattern}': use {{stem}} and {{ext}} only ({exc})") from None
    pairs: dict[str, str] = {}
    for path, _ in found:
        p = Path(path)
        spec = pattern.format(stem=glob.escape(p.stem), ext=glob.escape(p.suffix.lstrip(".")))
        matches = sorted(m for m in glob.glob(os.path.join(glob.escape(str(p.parent)), spec)) if Path(m).suffix.lower() in IMAGE_SUFFIXES
                         and Path(m).resolve() != p.resolve())
        if matches:
            pairs[path] = str(Path(matches[0]).resolve())
    sidecars = set(pairs.values())
    return [(path, rel) for path, rel in found if path not in sidecars], {k: v for k, v in pairs.items() if k not in sidecars}


def stable_int(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:12], 16)


def item_seed(base: int, rel: str) -> int:
    return (base + stable_int(rel)) % 2**31


def in_shard(rel: str, shard: tuple[int, int]) -> bool:
    index, count = shard
    return stable_int("shard:" + rel) % count == index


# --- planning ----------------------------------------------------------------------------------------------------------
NAME_FIELDS = ("stem", "effect", "ext")


def check_name_pattern(pattern: str) -> None:
    """``--name``: only {stem}, {effect}, {ext}; a relative ``.mp4`` path that stays inside OUTDIR (exit 2 otherwise)."""
    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(pattern) if f is not None]
        unknown = [f for f in fields if f not in NAME_FIELDS]
        if unknown:
            raise UsageError(f"--name {pattern!r}: unknown field {{{unknown[0]}}} (use {', '.join(f'{{{f}}}' for f in NAME_FIELDS)})")
        sample = pattern.format(stem="photo", effect="effect", ext="jpg")
    except (ValueError, IndexError, KeyError) as exc:
        raise UsageError(f"--name {pattern!r}: not a valid pattern ({exc})") from None
    if not sample.lower().endswith(".mp4"):
        raise UsageError(f"--name {pattern!r}: must end in .mp4, e.g. '{{stem}}.{{effect}}.mp4'")
    path = Path(sample)
    if path.is_absolute() or ".." in path.parts or sample.startswith("~"):
        raise UsageError(f"--name {pattern!r}: must be a path inside OUTDIR (no absolute path, no '..')")


def output_path(outdir: Path, rel: str, name: str) -> Path:
    """OUTDIR / (rel's folder) / name, refused if it would leave OUTDIR (a stray '..' in an input path)."""
    inner = Path(os.path.normpath(Path(rel).parent / name))
    if inner.is_absolute() or inner.parts[:1] == ("..",):
        raise UsageError(f"output for {rel} would leave the output folder ({inner})")
    return outdir / inner


def check_clashes(items: list[Item]) -> None:
    """Two photos must never write one file (the second would overwrite the first): refuse before any work."""
    first: dict[str, Item] = {}
    clashes = [(other, item) for item in items if (other := first.setdefault(os.path.normcase(item.output), item)) is not item]
    if clashes:
        a, b = clashes[0]
        what = (f"{a.input} and {b.input}" if a.input != b.input else f"{a.input} with effects {a.effect} and {b.effect}")
        more = f" (and {len(clashes) - 1} more)" if len(clashes) > 1 else ""
        raise UsageError(f"outputs clash: {what} would both write {a.output}{more}; pass their common parent folder, "
                         "or use --name '{stem}.{ext}.{effect}.mp4'")


def plan_items(opts: BatchOptions, catalog, skipped: list[str] | None = None) -> list[Item]:
    """Every (photo, effect) item of this shard, with its output, seed and parameters hash.

    Outputs are checked over the whole batch (every shard refuses the same clash), before any model loads.
    Files the folder walks passed over are appended to ``skipped``.
    """
    check_name_pattern(opts.name)
    # With --preset FILE the file is the one effect (resolve(None) reads it); otherwise each named effect.
    effects = opts.effects if opts.preset_file is None else [None]
    presets = {e: catalog.resolve(e, backbone=opts.backbone) for e in effects}
    items = []
    found, last_frames = pair_last_frames(collect(opts.inputs, opts.recursive, skipped), opts.last_frame_pattern)
    for path, rel in found:
        sidecar = Path(path).with_suffix(".txt")
        prompt = sidecar.read_text().strip() if sidecar.is_file() else None
        for preset in presets.values():
            stem = Path(rel).stem
            name = opts.name.format(stem=stem, effect=preset.name, ext=Path(rel).suffix.lstrip("."))
            output = output_path(opts.outdir, rel, name)
            seed = item_seed(opts.seed, rel)
            stat = Path(path).stat() if Path(path).exists() else None
            last = last_frames.get(path)
            params = {"effect": preset.name, "backbone": preset.backbone.name, "dit": str(preset.backbone.dit),
                      "prompt": prompt or preset.prompt, "negative": preset.negative_for(preset.effective_sampler), "seed": seed,
                      "frames": opts.frames or preset.frames, "fps": opts.fps or preset.fps, "steps": opts.steps,
                      "fit": opts.fit, "quantize": opts.quantize, "crf": opts.crf, "name": name,
                      "input": [stat.st_size, stat.st_mtime_ns] if stat else None,
                      "slowdown": opts.slowdown or preset.slowdown, "fast_frames": opts.fast_frames,
                      "interpolator": opts.interpolator,
                      "last_frame": [last, Path(last).stat().st_size, Path(last).stat().st_mtime_ns] if last else None}
            h = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]
            items.append(Item(input=path, rel=rel, effect=preset.name, output=str(output), seed=seed, prompt=prompt, params_hash=h,
                              last_frame=last))
    check_clashes(items)
    items = [it for it in items if in_shard(it.rel, opts.shard)]
    items.sort(key=lambda it: (it.effect, it.rel))  # grouped by effect: each LoRA switch happens once
    return items


def item_record(item: Item, outdir: Path) -> dict:
    """An item as the manifest (and --json) shows it: input and output relative to OUTDIR, where the manifest
    lives, so the file holds no absolute local path and stays valid when the folders move together."""
    record = {**asdict(item), "input": os.path.relpath(item.input, outdir), "output": os.path.relpath(item.output, outdir)}
    if item.last_frame:
        record["last_frame"] = os.path.relpath(item.last_frame, outdir)
    return record


def is_done(item: Item, manifest: dict) -> bool:
    r = manifest.get((item.rel, item.effect))
    return bool(r and r.get("status") == "ok" and r.get("params_hash") == item.params_hash and Path(item.output).exists())
