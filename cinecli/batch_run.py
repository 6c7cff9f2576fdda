"""Running a batch: one ``Worker`` per process (or per Ray actor) holds the loaded backbones and turns items into
videos and manifest records; ``run_batch`` drives a local worker with progress, or hands the items to Ray."""

from __future__ import annotations

import json
import time
from pathlib import Path

from .batch import (
    MANIFEST,
    BatchOptions,
    Item,
    append_manifest,
    file_sha256,
    is_done,
    item_record,
    plan_items,
    read_manifest,
    repair_manifest,
)
from .errors import EXIT_INTERRUPTED, CineError, DiskFullError

EXIT_SOME_FAILED = 8


class Worker:
    """Loads each backbone once and serves every item that uses it."""

    def __init__(self, opts: BatchOptions):
        from .preset import Catalog

        self.opts = opts
        self.catalog = Catalog(extra_preset=opts.preset_file)
        self.generators: dict[str, object] = {}

    def generator(self, preset, timings):
        from .devices import choose_device, choose_dtype
        from .pipeline import Generator, Request, plan
        from .run import apply_plan, memory_plan, pull_hint, weights_needed
        from .weights.hub import resolve_all
        from .weights.scan import local_refs

        key = preset.backbone.name
        if key not in self.generators:
            refs = local_refs(preset)
            paths = resolve_all(refs, pull_hint(preset, self.opts.backbone, self.opts.preset_file))
            device = choose_device(self.opts.device)
            gen = Generator(preset.backbone, paths, device, choose_dtype(self.opts.dtype, device), quantize=self.opts.quantize)
            # One plan per backbone (it loads once), sized for the preset's clip at its full pixel budget: every
            # photo's frame is within max_area, whatever its aspect ratio.
            side = int(preset.max_area**0.5)
            clip = plan(Request(image="-", preset=preset, frames=self.opts.frames, steps=self.opts.steps, seed=0), (side, side))
            apply_plan(gen, memory_plan(self.opts, preset, clip, weights_needed(preset, refs=refs), device))
            self.generators[key] = gen
        gen = self.generators[key]
        if preset.effect is not None and f"effect:{preset.effect.name}" not in gen.paths:  # another effect, same backbone
            gen.paths.update(resolve_all(local_refs(preset), pull_hint(preset, self.opts.backbone, self.opts.preset_file)))
        gen.timings = timings
        timings.device = gen.device
        return gen

    def encode_prompts(self, items: list[Item]) -> None:
        """Encode every prompt of the batch up front, one text-encoder load per backbone, before any DiT loads."""
        from .pipeline import Request, final_prompt
        from .timing import Timings

        by_backbone: dict[str, tuple[object, list[str]]] = {}
        for item in items:
            preset = self.catalog.resolve(item.effect if self.opts.preset_file is None else None, backbone=self.opts.backbone)
            entry = by_backbone.setdefault(preset.backbone.name, (preset, []))
            entry[1].append(final_prompt(Request(image=item.input, preset=preset, prompt=item.prompt)))
        for preset, prompts in by_backbone.values():
            try:
                self.generator(preset, Timings()).encode_prompts(prompts)
            except CineError:
                pass  # e.g. missing weights: each item reports it

    def process(self, item: Item) -> dict:
        """Make one item's video; never raises for a per-item problem (it becomes a failed record)."""
        from .image import read_image
        from .pipeline import Request, metadata, plan
        from .slowdown import slow_down
        from .timing import Timings
        from .video import frames_to_uint8, write_mp4

        timings = Timings()
        record = {**item_record(item, self.opts.outdir), "status": "failed", "error": None, "stage": None}
        started = time.time()
        try:
            preset = self.catalog.resolve(item.effect if self.opts.preset_file is None else None, backbone=self.opts.backbone)
            with timings.stage("read image"):
                image = read_image(item.input)
            request = Request(image=item.input, preset=preset, output=item.output, seed=item.seed, frames=self.opts.frames,
                              fps=self.opts.fps, fit=self.opts.fit, prompt=item.prompt, steps=self.opts.steps,
                              last_frame=item.last_frame, slowdown=self.opts.slowdown)
            the_plan = plan(request, image.size)
            gen = self.generator(preset, timings)
            video = gen.generate(request, the_plan, image)
            frames = slow_down(frames_to_uint8(video), the_plan.slowdown, timings)
            with timings.stage("mp4 encode"):
                Path(item.output).parent.mkdir(parents=True, exist_ok=True)
                write_mp4(frames, item.output, the_plan.fps, metadata(request, the_plan, gen),
                          crf=self.opts.crf, overwrite=True)
            record.update(status="ok", output_sha256=file_sha256(Path(item.output)), frames=the_plan.frames,
                          output_frames=the_plan.output_frames, width=the_plan.width, height=the_plan.height)
        except DiskFullError:
            raise  # every later item would fail the same way: the batch stops (exit 6)
        except CineError as exc:
            error = str(exc).splitlines()[0].replace(item.input, record["input"])  # no absolute local path
            record.update(error=error, stage=timings.last_stage, exit_code=exc.exit_code)
        except (MemoryError, RuntimeError) as exc:
            if not (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError" or "out of memory" in str(exc)):
                raise
            record.update(error=f"out of memory in stage '{timings.last_stage}' ({self.opts.frames or 'preset'} frames, "
                                f"device {self.opts.device}, dtype {self.opts.dtype}): {str(exc).splitlines()[0][:160]}",
                          stage=timings.last_stage)
            _free_memory()
        record["timings"] = {k: round(v, 4) for k, v in timings.stages.items()}
        record["seconds"] = round(time.time() - started, 3)
        record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        return record


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run_batch(opts: BatchOptions, console, ray_address: str | None = None) -> int:
    from .preset import Catalog

    items = plan_items(opts, Catalog(extra_preset=opts.preset_file))  # usage errors before anything is written
    prepare_outdir(opts.outdir)
    if torn := repair_manifest(opts.outdir):
        console.print(f"{MANIFEST}: removed a torn last line ({torn} bytes) left by an interrupted run", highlight=False)
    manifest = read_manifest(opts.outdir)
    todo, skipped = [], []
    for item in items:
        (skipped if not opts.overwrite and is_done(item, manifest) else todo).append(item)
    for item in skipped:
        emit(opts, {**item_record(item, opts.outdir), "status": "skipped"}, record_in_manifest=False)
    shard = f" (shard {opts.shard[0]}/{opts.shard[1]})" if opts.shard[1] > 1 else ""
    if not opts.quiet:
        console.print(f"{len(items)} item(s){shard}: {len(todo)} to make, {len(skipped)} already done → {opts.outdir}", highlight=False)
    if ray_address is not None:
        from .batch_ray import run_on_ray

        records = run_on_ray(opts, todo, ray_address, lambda r: emit(opts, r))
    else:
        records = run_local(opts, todo, console)
    failed = [r for r in records if r["status"] != "ok"]
    if not opts.quiet:
        summary(console, len(records) - len(failed), failed, len(skipped))
    if len(records) < len(todo):
        return EXIT_INTERRUPTED
    return EXIT_SOME_FAILED if failed else 0


def prepare_outdir(outdir: Path) -> None:
    """OUTDIR exists and takes new files, and its manifest takes appends: checked before any model loads."""
    from .errors import output_error
    from .video import check_writable

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
            from .errors import output_error

            raise output_error(exc, "stdout") from None


def run_local(opts: BatchOptions, todo: list[Item], console) -> list[dict]:
    worker = Worker(opts)
    worker.encode_prompts(todo)
    records = []
    progress = None
    if console.is_terminal and not opts.quiet:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
        )

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
                status = "ok" if record["status"] == "ok" else f"FAILED ({record['error']})"
                console.print(f"[{k}/{len(todo)}] {item.effect} {item.rel} → {item.output}: {status} in {record['seconds']:.1f} s",
                              highlight=False, markup=False)
    except KeyboardInterrupt:
        console.print("interrupted: finished items are kept; rerun the same command to continue", highlight=False)
    finally:
        if progress:
            progress.stop()
    return records


def summary(console, ok: int, failed: list[dict], skipped: int) -> None:
    from rich.table import Table

    table = Table("result", "items", title="cine batch", title_justify="left")
    table.add_row("made", str(ok))
    table.add_row("skipped (already done)", str(skipped))
    table.add_row("failed", str(len(failed)))
    console.print(table)
    for r in failed[:20]:
        console.print(f"  failed: {r['rel']} [{r['effect']}]: {r['error']}", highlight=False, markup=False)
    if failed:
        console.print(f"  details in {MANIFEST}", highlight=False)
