"""Progress a person can read, on stderr, for runs that take seconds on a GPU and an hour on a CPU.

A terminal gets one live line (rich): the stage running now, the denoising steps as a bar (i/N), the elapsed time
and, once the first step is measured, the time left (the steps still to run at the measured pace, plus the decode,
estimated from the encode it mirrors). Logs, CI and Slurm files (stderr not a terminal) get plain lines, never
rewritten: one when a stage starts (so an hour-long VAE pass shows what is running) and one when it ends with its
seconds (``cine: [  12.3 s] denoise step 2/4: 3.10 s``). Both follow ``Timings`` (core/timing.py) through its
stage callbacks: the one timing mechanism stays the only clock.
"""

from __future__ import annotations

import time

from ..core.timing import Timings

DECODE_PER_ENCODE = 1.6  # a Wan VAE decode takes about 1.6x its encode (README: 49 frames, 2155 s vs 4130 s on CPU)


class StageProgress:
    """``with StageProgress(console, timings, "bullet-time: 49 frames 832x480 on cuda", steps=4):`` around a run."""

    def __init__(self, console, timings: Timings, label: str, steps: int):
        self.console, self.timings, self.label, self.steps = console, timings, label, steps
        self.live = console.is_terminal
        self.done_steps, self.step_seconds = 0, []
        self.stage = "starting"
        self._progress = self._task = None

    # --- Timings callbacks -------------------------------------------------------------------------------------
    def started(self, name: str) -> None:
        self.stage, self._stage_started = name, time.perf_counter()
        if self.live:
            self._update()
        else:
            self.console.print(f"cine: [{self.timings.total():7.1f} s] {name} …", markup=False, highlight=False)

    def ended(self, name: str, seconds: float) -> None:
        if name.startswith("denoise step"):
            self.done_steps += 1
            self.step_seconds.append(seconds)
        if self.live:
            self._update()
        else:
            self.console.print(f"cine: [{self.timings.total():7.1f} s] {name}: {seconds:.2f} s", markup=False,
                               highlight=False)

    def eta(self) -> float | None:
        """Seconds left: the remaining steps at the measured pace, then the decode (≈ 1.6x the encode); None until
        a step is measured."""
        if not self.step_seconds:
            return None
        pace = sum(self.step_seconds) / len(self.step_seconds)
        decode = DECODE_PER_ENCODE * self.timings.stages.get("vae encode", 0.0)
        left = (self.steps - self.done_steps) * pace
        if self.stage.startswith("vae decode"):
            return max(0.0, decode - (time.perf_counter() - self._stage_started))
        return left + decode

    # --- the live line ------------------------------------------------------------------------------------------
    def _update(self) -> None:
        if self._progress is None:
            return
        eta = self.eta()
        left = f"  ~{_clock(eta)} left" if eta is not None else ""
        self._progress.update(self._task, completed=self.done_steps,
                              description=f"{self.label} · {self.stage}{left}")
        self._progress.refresh()

    def __enter__(self) -> StageProgress:
        self._stage_started = time.perf_counter()
        self.timings.on_stage_start, self.timings.on_stage_end = self.started, self.ended
        if self.live:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                SpinnerColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            self._progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(bar_width=20),
                                      MofNCompleteColumn(), TextColumn("steps"), TimeElapsedColumn(),
                                      console=self.console, transient=True)
            self._task = self._progress.add_task(self.label, total=self.steps)
            self._progress.start()
            self._update()
        return self

    def __exit__(self, *exc) -> None:
        self.timings.on_stage_start = self.timings.on_stage_end = None
        if self._progress is not None:
            self._progress.stop()


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"
