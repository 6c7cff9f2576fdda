"""Soak benchmark: many batch items in one process must not grow memory (users report RAM creeping up run to run).

    .venv/bin/python bench/soak.py              # 50 items on the tiny self-test backbone, CPU

Runs ``cine batch``'s Worker on N distinct photos (one backbone load) and prints the process RSS after item 5 and
after item N, and their ratio (target: within 5%).
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cinecli.batch.items import BatchOptions, plan_items  # noqa: E402
from cinecli.batch.worker import Worker  # noqa: E402
from cinecli.core.timing import current_rss, peak_rss  # noqa: E402
from cinecli.effects.preset import Catalog  # noqa: E402
from cinecli.generate.selftest import sample_image, write_backbone  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=50)
    p.add_argument("--frames", type=int, default=9)
    args = p.parse_args()
    from transformers.utils import logging

    logging.disable_progress_bar()
    tmp = Path(tempfile.mkdtemp(prefix="cine-soak-"))
    preset = write_backbone(tmp / "stack")
    (tmp / "in").mkdir()
    for i in range(args.items):  # distinct photos and sizes, as a real folder of portraits has
        sample_image(64 + 16 * (i % 3), 48 + 16 * (i % 2)).rotate(i * 5).save(tmp / "in" / f"p{i:03d}.png")
    opts = BatchOptions(inputs=[str(tmp / "in")], effects=[], outdir=tmp / "out", preset_file=preset, frames=args.frames,
                        device="cpu", dtype="fp32")
    opts.outdir.mkdir()
    items = plan_items(opts, Catalog(extra_preset=preset))
    worker = Worker(opts)
    marks = {}
    start = time.time()
    for k, item in enumerate(items, 1):
        record = worker.process(item)
        assert record["status"] == "ok", record
        gc.collect()
        if k in (5, len(items)) or k % 10 == 0:
            marks[k] = current_rss()
            print(f"  item {k:3d}: RSS {marks[k] / 2**20:8.1f} MiB  ({time.time() - start:.1f} s)", flush=True)
    first, last = marks[5], marks[len(items)]
    print(f"soak: {len(items)} items, RSS at item 5 {first / 2**20:.1f} MiB, at item {len(items)} {last / 2**20:.1f} MiB, "
          f"ratio {last / first:.3f} (peak RSS {peak_rss() / 2**20:.1f} MiB)")


if __name__ == "__main__":
    main()
