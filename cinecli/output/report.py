"""The timing report: every stage of a run, totals, throughput and memory, as JSON and as a terminal table."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path
from typing import TYPE_CHECKING

from .. import __version__

if TYPE_CHECKING:  # torch is imported inside build_report: the CLI loads this module before torch is needed
    import torch

    from ..core.timing import Timings


def build_report(timings: Timings, *, job: dict, sizes: dict, device: torch.device, dtype: torch.dtype,
                 quantization: str, output: str) -> dict:
    """A JSON-ready report. ``stages`` are in run order; ``total_s`` is wall time from start to report."""
    import torch

    from ..models.attention import used_backends

    stages = {name: round(seconds, 6) for name, seconds in timings.stages.items()}
    total = timings.total()
    frames = sizes.get("frames") or 0
    steps = [s for n, s in stages.items() if n.startswith("denoise step")]
    return {
        "cine": __version__,
        "output": output,
        "job": job,
        "sizes": sizes,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine(),
        "dtype": str(dtype).removeprefix("torch."),
        "quantization": quantization,
        "attention": used_backends(),
        "threads": torch.get_num_threads(),
        "stages": stages,
        "stages_total_s": round(sum(stages.values()), 6),
        "total_s": round(total, 6),
        "denoise_s": round(sum(steps), 6),
        "mean_step_s": round(sum(steps) / len(steps), 6) if steps else None,
        "ms_per_frame": round(1000 * total / frames, 3) if frames else None,
        "peak_memory": timings.peak_memory(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def write_report(report: dict, path: str | Path) -> None:
    """Write atomically (temp + rename): a report is never half-written."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps(report, indent=2) + "\n")
        os.replace(tmp, path)
    except OSError as exc:
        from ..core.errors import output_error

        tmp.unlink(missing_ok=True)
        raise output_error(exc, path) from None


def summary_table(report: dict):
    """A rich Table of the stages for stderr."""
    from rich.table import Table

    table = Table(title=f"cine {report['job'].get('effect', '')} → {report['output']}", title_justify="left")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for name, seconds in report["stages"].items():
        table.add_row(name, f"{seconds:.3f}")
    table.add_row("[bold]total", f"[bold]{report['total_s']:.3f}")
    mem = report["peak_memory"]
    table.caption = (f"{report['sizes'].get('frames')} frames {report['sizes'].get('width')}x{report['sizes'].get('height')}, "
                     f"{report['ms_per_frame']} ms/frame, peak {mem['bytes'] / 2**30:.2f} GiB ({mem['kind']}), "
                     f"{report['device']} {report['dtype']}")
    return table
