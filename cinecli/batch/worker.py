"""One batch worker per process (or per Ray actor): it holds the loaded backbones and turns items into videos and
manifest records. A per-item problem becomes a failed record; only a full disk stops the batch."""

from __future__ import annotations

import sys
import time
from pathlib import Path

from ..core.devices import release_cached
from ..core.errors import CineError, DiskFullError, WeightsError
from ..core.limits import is_out_of_memory
from ..weights.lock import sha256
from .items import BatchOptions, Item, item_record


class Worker:
    """Loads each backbone once and serves every item that uses it."""

    def __init__(self, opts: BatchOptions):
        from ..effects.preset import Catalog

        self.opts = opts
        self.catalog = Catalog(extra_preset=opts.preset_file)
        self.generators: dict[str, object] = {}
        self._interpolator = None  # chosen (and RIFE loaded) on the first item that slows down: once per batch

    def generator(self, preset, timings):
        from ..core.devices import choose_device, choose_dtype
        from ..generate.pipeline import Generator, Request, plan
        from ..models.attention import choose_backend
        from ..models.scan import local_refs
        from ..run import apply_plan, memory_plan, pull_hint, weights_needed
        from ..weights.hub import resolve_all

        key = preset.backbone.name
        if key not in self.generators:
            refs = local_refs(preset)
            paths = resolve_all(refs, pull_hint(preset, self.opts.backbone, self.opts.preset_file))
            device = choose_device(self.opts.device)
            for notice in choose_backend(device):
                print(notice, file=sys.stderr)
            gen = Generator(preset.backbone, paths, device, choose_dtype(self.opts.dtype, device), quantize=self.opts.quantize)
            # One plan per backbone (it loads once), sized for the preset's clip at its full pixel budget: every
            # photo's frame is within max_area, whatever its aspect ratio.
            side = int(preset.max_area**0.5)
            clip = plan(Request(image="-", preset=preset, frames=self.opts.frames, steps=self.opts.steps, seed=0), (side, side))
            apply_plan(gen, memory_plan(self.opts, preset, clip, weights_needed(preset, refs=refs), device))
            self.generators[key] = gen
        gen = self.generators[key]
        if preset.effect is not None and not set(preset.effect.labels().values()) <= gen.paths.keys():  # another effect
            gen.paths.update(resolve_all(local_refs(preset), pull_hint(preset, self.opts.backbone, self.opts.preset_file)))
        gen.timings = timings
        timings.device = gen.device
        return gen

    def encode_prompts(self, items: list[Item]) -> None:
        """Encode every prompt of the batch up front, one text-encoder load per backbone, before any DiT loads."""
        from ..core.timing import Timings
        from ..generate.pipeline import Request, final_prompt

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

    def interpolator(self, device):
        """The interpolator of --slowdown and --fast-frames, as `cine run` chooses it (--interpolator, else RIFE, or
        minterpolate offline without its weights)."""
        from ..output.interpolate import choose

        if self._interpolator is None:
            self._interpolator = choose(self.opts.interpolator, device=device).load()
        return self._interpolator

    def process(self, item: Item) -> dict:
        """Make one item's video; never raises for a per-item problem (it becomes a failed record). A full disk or
        a backbone's weights (missing, unreadable) fail every item alike: they stop the batch, with one line."""
        from ..core.timing import Timings
        from ..generate.image import read_image
        from ..generate.pipeline import Request, metadata, plan
        from ..output.video import frames_to_uint8, write_mp4

        timings = Timings()
        record = {**item_record(item, self.opts.outdir), "status": "failed", "error": None, "stage": None}
        started = time.time()
        try:
            preset = self.catalog.resolve(item.effect if self.opts.preset_file is None else None, backbone=self.opts.backbone)
            with timings.stage("read image"):
                image = read_image(item.input)
            request = Request(image=item.input, preset=preset, output=item.output, seed=item.seed, frames=self.opts.frames,
                              fps=self.opts.fps, fit=self.opts.fit, prompt=item.prompt, steps=self.opts.steps,
                              last_frame=item.last_frame, slowdown=self.opts.slowdown, fast_frames=self.opts.fast_frames)
            the_plan = plan(request, image.size)
            gen = self.generator(preset, timings)
            interp = self.interpolator(gen.device) if the_plan.interp_factor > 1 else None
            video = gen.generate(request, the_plan, image)
            frames = frames_to_uint8(video)
            settings = metadata(request, the_plan, gen, self.opts.crf)
            if interp is not None:
                frames = interp.run(frames, the_plan.interp_factor, timings)
                settings.update(interp.settings())
            with timings.stage("mp4 encode"):
                Path(item.output).parent.mkdir(parents=True, exist_ok=True)
                write_mp4(frames, item.output, the_plan.fps, settings, crf=self.opts.crf, overwrite=True)
            record.update(status="ok", output_sha256=sha256(Path(item.output)), frames=the_plan.frames,
                          output_frames=the_plan.output_frames, width=the_plan.width, height=the_plan.height)
        except (DiskFullError, WeightsError):
            raise  # every later item would fail the same way (a full disk, a backbone's missing weights): stop once
        except CineError as exc:
            error = str(exc).splitlines()[0].replace(item.input, record["input"])  # no absolute local path
            record.update(error=error, stage=timings.last_stage, exit_code=exc.exit_code)
        except (MemoryError, RuntimeError) as exc:
            if not is_out_of_memory(exc):
                raise
            record.update(error=f"out of memory in stage '{timings.last_stage}' ({self.opts.frames or 'preset'} frames, "
                                f"device {self.opts.device}, dtype {self.opts.dtype}): {str(exc).splitlines()[0][:160]}",
                          stage=timings.last_stage)
            release_cached()
        record["timings"] = {k: round(v, 4) for k, v in timings.stages.items()}
        record["seconds"] = round(time.time() - started, 3)
        record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        return record
