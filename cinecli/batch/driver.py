"""Running a batch: ``run_batch`` plans the items, skips finished ones, and drives a local ``Worker`` with progress,
or hands the items to a remote runner (``ray_driver.run_on_ray``, chosen by the CLI) that returns the same records."""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from ..core.errors import EXIT_INTERRUPTED
from .items import BatchOptions, Item, is_done, item_record, plan_items
from .manifest import MANIFEST, append_manifest, read_manifest, repair_manifest
from .worker import Worker

EXIT_SOME_FAILED = 8


# A remote runner: (options, items to make, a callback for each finished record) → the records, in any order.
RemoteRunner = Callable[[BatchOptions, list[Item], Callable[[dict], None]], list[dict]]


def run_batch(opts: BatchOptions, console, remote: RemoteRunner | None = None) -> int:
    from ..effects.preset import Catalog

    passed_over: list[str] = []
    items = plan_items(opts, Catalog(extra_preset=opts.preset_file), passed_over)  # usage errors before anything is written
    prepare_outdir(opts.outdir)
    if torn := repair_manifest(opts.outdir):
        console.print(f"{MANIFEST}: removed a torn last line ({torn} bytes) left by an interrupted run", highlight=False)
    manifest = read_manifest(opts.outdir)
    todo, skipped, kept = [], [], []
    for item in items:
        if opts.overwrite:
            todo.append(item)
        elif is_done(item, manifest):
            skipped.append(item)  # made by this batch with these settings
        elif Path(item.output).exists():
            kept.append(item)  # someone's file, or a clip made with other settings: never replaced without --overwrite
        else:
            todo.append(item)
    for item in skipped:
        emit(opts, {**item_record(item, opts.outdir), "status": "skipped"}, record_in_manifest=False)
    for item in kept:
        emit(opts, {**item_record(item, opts.outdir), "status": "skipped", "error": "output exists"}, record_in_manifest=False)
    shard = f" (shard {opts.shard[0]}/{opts.shard[1]})" if opts.shard[1] > 1 else ""
    if not opts.quiet:
        console.print(f"{len(items)} item(s){shard}: {len(todo)} to make, {len(skipped)} already done → {opts.outdir}", highlight=False)
        if kept:
            console.print(f"{len(kept)} output(s) exist and were not made by this batch with these settings: kept, not "
                          f"replaced (--overwrite replaces them), e.g. {kept[0].output}", highlight=False, markup=False)
        if passed_over:
            kinds = ", ".join(f"{s or 'no suffix'} {n}" for s, n in Counter(Path(p).suffix.lower() for p in passed_over).most_common())
            console.print(f"{len(passed_over)} file(s) in the input folders are not photos cine reads and were skipped "
                          f"({kinds})", highlight=False, markup=False)
    if remote is not None:
        records = remote(opts, todo, lambda r: emit(opts, r))
    else:
        records = run_local(opts, todo, console)
    failed = [r for r in records if r["status"] != "ok"]
    if not opts.quiet:
        summary(console, len(records) - len(failed), failed, len(skipped), len(kept), opts.outdir)
    if len(records) < len(todo):
        return EXIT_INTERRUPTED
    return EXIT_SOME_FAILED if failed else 0


def prepare_outdir(outdir: Path) -> None:
    """OUTDIR exists and takes new files, and its manifest takes appends: checked before any model loads."""
    from ..core.errors import output_error
    from ..output.video import check_writable

    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise output_error(exc, outdir) from None
    check_writable(outdir / MANIFEST, overwrite=True)


def emit(opts: BatchOptions, record: dict, record_in_manifest: bool = True) -> None:
    if record_in_manifest:
        append_manifest(opts.outdir, record)
    if opts.as_json:
        try:
            print(json.dumps(record, separators=(",", ":")), flush=True)
        except BrokenPipeError:
            raise
        except OSError as exc:  # stdout on a full disk
            from ..core.errors import output_error

            raise output_error(exc, "stdout") from None


def as_given(text: str, record: dict | None = None, item: Item | None = None) -> str:
    """A path for the person at the terminal: relative to where they stand (the manifest's are relative to OUTDIR)."""
    if record is not None and item is not None:
        return text.replace(record["input"], os.path.relpath(item.input))
    return os.path.relpath(text) if os.path.isabs(text) else text


def run_local(opts: BatchOptions, todo: list[Item], console) -> list[dict]:
    worker = Worker(opts)
    worker.encode_prompts(todo)
    records = []
    progress = None
    if console.is_terminal and not opts.quiet:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                            console=console, transient=True)
        task = progress.add_task("batch", total=len(todo))
        progress.start()
    try:
        for k, item in enumerate(todo, 1):
            if progress:
                progress.update(task, description=f"{item.effect} {item.rel}")
            record = worker.process(item)
            emit(opts, record)
            records.append(record)
            if progress:
                progress.advance(task)
            elif not opts.quiet:
                status = "ok" if record["status"] == "ok" else f"FAILED ({as_given(record['error'], record, item)})"
                console.print(f"[{k}/{len(todo)}] {item.effect} {as_given(item.input)} → {as_given(item.output)}: {status} "
                              f"in {record['seconds']:.1f} s", highlight=False, markup=False)
            if opts.quiet and not opts.as_json and record["status"] == "ok":
                print(item.output, flush=True)  # -q: the output paths, one per line, as `cine run -q` prints its one
    except KeyboardInterrupt:
        console.print("interrupted: finished items are kept; rerun the same command to continue", highlight=False)
    finally:
        if progress:
            progress.stop()
    return records


def summary(console, ok: int, failed: list[dict], skipped: int, kept: int = 0, outdir: Path = Path(".")) -> None:
    from rich.table import Table

    table = Table("result", "items", title="cine batch", title_justify="left")
    table.add_row("made", str(ok))
    table.add_row("skipped (already done)", str(skipped))
    if kept:
        table.add_row("kept (output exists)", str(kept))
    table.add_row("failed", str(len(failed)))
    console.print(table)
    for r in failed[:20]:
        given = os.path.relpath(os.path.join(outdir, r["input"]))  # the manifest's path is relative to OUTDIR
        console.print(f"  failed: {given} [{r['effect']}]: {(r['error'] or '').replace(r['input'], given)}",
                      highlight=False, markup=False)
    if failed:
        console.print(f"  details in {MANIFEST}", highlight=False)
