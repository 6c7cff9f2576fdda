"""The one timing mechanism: named stages, timed with the device synchronized, plus peak memory.

Every stage of a run (and every benchmark) is measured through ``Timings.stage``, so the timing report, the
benchmarks and the progress display all agree on what a stage took.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch


def synchronize(device: torch.device | str | None) -> None:
    """Wait for queued device work, so a wall-clock reading covers it."""
    device = torch.device(device) if device is not None else None
    if device is None or device.type == "cpu":
        return
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def current_rss() -> int:
    """Resident set size of this process in bytes (Linux /proc; falls back to the peak elsewhere)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return peak_rss()


def peak_rss() -> int:
    """Peak resident set size of this process in bytes, over its whole life."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if os.uname().sysname == "Darwin" else peak * 1024


class RssSampler:
    """Peak RSS over a window of time (ru_maxrss only knows the whole process life): samples every ``interval``."""

    def __init__(self, interval: float = 0.002):
        self.interval, self.peak = interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, current_rss())
            time.sleep(self.interval)

    def __enter__(self) -> RssSampler:
        self.peak = current_rss()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, current_rss())


def _log_stage(name: str, event: str) -> None:
    """With ``CINE_STAGE_LOG=FILE``, append one JSON line per stage start/end (wall clock): how bench/memory.py
    lines up the RSS it samples from outside the process with the stages."""
    path = os.environ.get("CINE_STAGE_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"stage": name, "event": event, "t": time.time()}) + "\n")


@dataclass
class Timings:
    """Ordered stage durations in seconds. Re-entering a stage name adds a numbered entry (step 1, step 2…)."""

    device: torch.device | str | None = None
    stages: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    _active: str | None = None
    last_stage: str | None = None  # the most recent stage entered: where a failure happened
    on_stage_start: Callable[[str], None] | None = None  # (name): progress (output/progress.py)
    on_stage_end: Callable[[str, float], None] | None = None  # (name, seconds)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage. Stages do not nest: nesting would count time twice and break "stages add up to total"."""
        if self._active is not None:
            raise RuntimeError(f"stage '{name}' started inside stage '{self._active}'")
        self._active = self.last_stage = name
        synchronize(self.device)
        _log_stage(name, "start")
        if self.on_stage_start is not None:
            self.on_stage_start(name)
        t0 = time.perf_counter()
        try:
            yield
        finally:
            synchronize(self.device)
            seconds = time.perf_counter() - t0
            self.stages[name] = self.stages.get(name, 0.0) + seconds
            self._active = None
            if self.on_stage_end is not None:
                self.on_stage_end(name, seconds)
            _log_stage(name, "end")

    def total(self) -> float:
        """Wall time since the Timings was created."""
        return time.perf_counter() - self.started

    def peak_memory(self) -> dict[str, int | str]:
        """CUDA max allocated on CUDA, otherwise the process peak RSS."""
        device = torch.device(self.device) if self.device is not None else torch.device("cpu")
        if device.type == "cuda":
            return {"kind": "cuda_max_allocated", "bytes": torch.cuda.max_memory_allocated(device)}
        return {"kind": "peak_rss", "bytes": peak_rss()}


def time_call(fn, device: torch.device | str | None):
    """(seconds, result) of one call of ``fn``: CUDA events around it on CUDA (the GPU's time, no host jitter),
    else wall clock with the device synchronized."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3, out
    synchronize(device)
    t0 = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - t0, out
