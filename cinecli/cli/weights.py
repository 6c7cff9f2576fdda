"""``cine models …`` (download, list, verify, remove, locate weights) and ``cine lora inspect``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer

from ..core.errors import EXIT_WEIGHTS, UsageError, WeightsError
from ..core.sizes import human_bytes
from .common import MODELS_DIR_HELP, fail, handle_errors, set_models_dir, stderr_console

models_app = typer.Typer(no_args_is_help=True, help="Download, list, verify and remove the weights presets need.")
lora_app = typer.Typer(no_args_is_help=True, help="Look inside LoRA files.")


def _refs_for(target: str | None, backbone: str | None = None, preset_file: Path | None = None,
              fast_decode: bool = False) -> dict[str, object]:
    """``all``, an effect/alias, ``--preset FILE`` and/or ``--backbone NAME`` → {component label: WeightRef},
    deduplicated across presets: the same selection a run with those options resolves."""
    from ..effects.preset import Catalog

    if target == "rife":  # the frame interpolator (--slowdown, --fast-frames, cine interpolate): no preset
        from ..models.rife_weights import RIFE_REF

        return {"rife": RIFE_REF}
    catalog = Catalog(extra_preset=preset_file)
    if target is None and preset_file is None:
        if backbone is None:
            raise UsageError("name an effect (or all), --preset FILE or --backbone NAME")
        found = catalog.backbone(backbone, Path("."))
        return found.components() | ({"tiny_vae": found.tiny_vae} if fast_decode and found.tiny_vae else {})
    names = [None] if target is None else catalog.names() if target == "all" else [catalog.resolve(target).name]
    refs = {}
    from ..models.scan import local_refs

    for name in names:
        for label, ref in local_refs(catalog.resolve(name, backbone=backbone), fast_decode, hash_files=False).items():  # models-dir files count
            refs.setdefault(str(ref), (label, ref))
    return {label: ref for label, ref in refs.values()}


@models_app.command("list")
@handle_errors
def models_list(target: str = typer.Argument("all", help="An effect, rife (the frame interpolator), or all."),
                as_json: bool = typer.Option(False, "--json"),
                models_dir: Optional[Path] = typer.Option(None, "--models-dir", help=MODELS_DIR_HELP)) -> None:
    """What each preset needs: present or missing, sizes on disk, and where each comes from (hub cache, models dir)."""
    set_models_dir(models_dir)
    from ..effects.preset import Catalog
    from ..run import weights_needed

    catalog = Catalog()
    names = catalog.names() if target == "all" else [] if target == "rife" else [catalog.resolve(target).name]
    rows = {name: weights_needed(catalog.resolve(name)) for name in names}
    if target in ("all", "rife"):  # the frame interpolator: --slowdown, --fast-frames, cine interpolate
        from ..models.rife_weights import locate_rife

        rows["rife"] = {"rife": locate_rife(record=False).as_json()}
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    for name, comps in rows.items():
        print(f"{name}:")
        for label, w in comps.items():
            print(f"  {'present' if w['present'] else 'missing'} {human_bytes(w['bytes']):>9s}  {label:28s} {w['ref']}"
                  + (f"  ({w['source']})" if w.get("source") == "models dir" else ""))


@models_app.command("pull")
@handle_errors
def models_pull(target: Optional[str] = typer.Argument(None, help="An effect (or alias), all, or rife (the frame interpolator)."),
                backbone: Optional[str] = typer.Option(None, "--backbone", help="With this backbone instead of the preset's (alone: only the backbone)."),
                preset_file: Optional[Path] = typer.Option(None, "--preset", help="What a preset TOML file needs."),
                fast_decode: bool = typer.Option(False, "--fast-decode", help="Also the tiny VAE that --fast-decode uses."),
                yes: bool = typer.Option(False, "-y", "--yes", help="Do not ask before downloading."),
                dry_run: bool = typer.Option(False, "--dry-run", help="Only show what would be downloaded.")) -> None:
    """Download an effect's weights (sizes first, then a progress bar per file) and lock their revision and hash."""
    from ..weights.hub import download, hub_reachable, locate, offline, remote_sizes

    refs = _refs_for(target, backbone, preset_file, fast_decode)
    todo = {label: ref for label, ref in refs.items() if locate(ref).path is None}
    if not todo:
        print("all weights present")
        return
    if ref_local := [r for r in todo.values() if r.path is not None]:
        fail(f"local weights not found: {', '.join(str(r) for r in ref_local)}", EXIT_WEIGHTS)
    if not hub_reachable():
        fail(f"cannot download {len(todo)} file set(s): {'offline mode' if offline() else 'the hub is unreachable'} "
             f"({', '.join(str(r) for r in todo.values())})", EXIT_WEIGHTS)
    sizes = {label: remote_sizes(ref) for label, ref in todo.items()}
    total = sum(sum(s.values()) for s in sizes.values())
    console = stderr_console()
    for label, files in sizes.items():
        console.print(f"{label}: {todo[label]} — {len(files)} file(s), {human_bytes(sum(files.values()))}")
    console.print(f"total to download: {human_bytes(total)}")
    if dry_run:
        return
    if not yes and console.is_terminal and not typer.confirm("download?", err=True):
        raise typer.Exit(1)
    for ref in todo.values():
        found = download(ref)
        print(found.path)


@models_app.command("verify")
@handle_errors
def models_verify(as_json: bool = typer.Option(False, "--json")) -> None:
    """Re-hash every downloaded file, and every local weight file used so far, against the lock (sha256); exit 4 on any difference."""
    from ..effects.preset import WeightRef
    from ..weights import lock
    from ..weights.hub import _cached

    results = {}
    data = lock.read_lock()
    for key, entry in data["refs"].items():
        found = _cached(WeightRef(repo=entry["repo"], file=entry["file"], revision=entry["revision"]))
        results[key] = ["not in the cache"] if found.root is None else lock.verify(entry, found.root, full=True)
    for name, entry in data["local"].items():
        results[name] = lock.verify_local(name, entry)
    bad = {k: v for k, v in results.items() if v}
    if as_json:
        print(json.dumps({"ok": not bad, "refs": results}, indent=2))
    else:
        for key, problems in results.items():
            print(f"{'ok  ' if not problems else 'FAIL'} {key}" + (f": {'; '.join(problems)}" if problems else ""))
        if not results:
            print("nothing downloaded or used yet (the lock file is empty)")
    if bad:
        raise typer.Exit(EXIT_WEIGHTS)


@models_app.command("path")
@handle_errors
def models_path(target: str = typer.Argument(..., help="An effect (or alias).")) -> None:
    """Print the local path of each weight component of an effect (missing ones say so on stderr; exit 4)."""
    from ..weights.hub import locate

    missing = 0
    for label, ref in _refs_for(target).items():
        found = locate(ref)
        if found.path is None:
            missing += 1
            stderr_console().print(f"{label}: missing ({ref})", highlight=False)
        else:
            print(f"{label}\t{found.path}")
    if missing:
        raise typer.Exit(EXIT_WEIGHTS)  # scripts can test `cine models path X` before a run


@models_app.command("rm")
@handle_errors
def models_rm(target: str = typer.Argument(..., help="An effect (or alias), or all."),
              yes: bool = typer.Option(False, "-y", "--yes", help="Do not ask.")) -> None:
    """Delete an effect's downloaded hub files from the cache (local paths are never touched)."""
    from ..weights import lock
    from ..weights.hub import locate

    found = [locate(ref) for ref in _refs_for(target).values() if ref.repo]
    found = [f for f in found if f.root is not None]
    if not found:
        print("nothing to remove")
        return
    size = sum(p.stat().st_size for f in found for p in f.files if p.exists())
    if not yes and not typer.confirm(f"remove {len(found)} downloaded file set(s), {human_bytes(size)}?", err=True):
        raise typer.Exit(1)
    data = lock.read_lock()
    for f in found:
        for p in f.files:
            blob = p.resolve()
            p.unlink(missing_ok=True)
            if blob != p and blob.exists():
                blob.unlink()
        data["refs"].pop(lock.key(f.ref), None)
    lock.write_lock(data)
    print(f"removed {human_bytes(size)}")


@lora_app.command("inspect")
@handle_errors
def lora_inspect(lora: Path = typer.Argument(..., help="A LoRA file (.safetensors or .pth)."),
                 backbone: Optional[str] = typer.Option(None, "--backbone", help="DiT weights (file/folder) or a backbone name to check the fit against."),
                 as_json: bool = typer.Option(False, "--json")) -> None:
    """Format, ranks, alphas and targets of a LoRA; with --backbone, how many tensors match and which do not."""
    from ..weights.lora_file import check_fit, read_lora

    if not lora.exists():
        raise WeightsError(f"{lora}: no such file")  # a weights file: exit 4 (3 is for photos)
    parsed = read_lora(lora)
    doc = {"file": str(lora), **parsed.summary()}
    if backbone is not None:
        shapes = _dit_shapes(backbone)
        targets = parsed.targets()
        matched = [t for t, s in targets.items() if tuple(shapes.get(t, ())) == tuple(s)]
        doc["backbone"] = backbone
        doc["matched"] = len(matched)
        doc["unmatched"] = sorted(set(targets) - set(matched))
    if as_json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"{lora}: {doc['format']}, {doc['targets']} targets ({doc['low_rank_modules']} low-rank, "
              f"{doc['full_deltas']} full deltas), ranks {doc['ranks']}, alphas {doc['alphas']}")
        if parsed.ignored:
            print(f"  {sum(parsed.ignored.values())} of {parsed.tensors} tensors not loaded ({parsed.ignored_counts()}), "
                  f"e.g. {parsed.ignored_keys[0]}")
        if backbone is not None:
            print(f"  fits {backbone}: {doc['matched']} of {doc['targets']} targets match")
            for t in doc["unmatched"][:10]:
                print(f"    no match: {t}")
    if backbone is not None:
        try:
            check_fit(parsed, shapes, str(lora))
        except WeightsError as exc:
            fail(str(exc), exc.exit_code)


def _dit_shapes(backbone: str) -> dict[str, tuple[int, ...]]:
    """Canonical parameter shapes of a DiT, read from file headers only (no weights loaded)."""
    from ..effects.preset import Catalog
    from ..models.dit_loader import DIT_PATTERNS
    from ..weights import read_shapes
    from ..weights.files import component_folder
    from ..weights.hub import locate
    from ..weights.keys import normalize_dit_keys

    source: object = Path(backbone)
    if not Path(backbone).exists():
        catalog = Catalog()
        if backbone not in catalog.backbones:
            raise UsageError(f"--backbone {backbone}: neither a path nor a backbone name ({', '.join(sorted(catalog.backbones))})")
        found = locate(catalog.backbone(backbone, Path(".")).dit)
        if found.path is None:
            raise UsageError(f"backbone {backbone}'s DiT is not downloaded; pass its file with --backbone PATH")
        source = found.path
    shapes = read_shapes(component_folder(source, "transformer"), DIT_PATTERNS)
    names = normalize_dit_keys(shapes)
    return {names[k]: shapes[k] for k in names}
