"""``cine batch --ray``: the same items through Ray Data, one backbone per actor (a GPU each where GPUs exist).

Actors run the same ``Worker`` as a local batch and write the same outputs (OUTDIR must be on storage every
node sees); the driver appends their records to the manifest and streams them, so resume and ``--json`` behave
exactly as in a local run. Needs the optional extra: ``pip install 'cinecli[ray]'``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict

from ..core.errors import UsageError
from .items import BatchOptions, Item


class RayWorker:
    """A Ray Data callable class: constructed once per actor (loads nothing until its first item)."""

    def __init__(self, options: BatchOptions):
        from .worker import Worker

        self.worker = Worker(options)

    def __call__(self, batch: dict) -> dict:
        return {"record": [json.dumps(self.worker.process(Item(**json.loads(s)))) for s in batch["item"]]}


def run_on_ray(opts: BatchOptions, todo: list[Item], on_record: Callable[[dict], None], address: str = "local") -> list[dict]:
    """A remote runner for ``driver.run_batch``: ``address`` is 'local' (start an instance), 'auto' or ray://HOST:PORT."""
    try:
        import ray
        import ray.data
    except ImportError:
        raise UsageError("--ray needs Ray: pip install 'cinecli[ray]'") from None
    if not todo:
        return []
    ray.init(address=None if address == "local" else address, ignore_reinit_error=True, include_dashboard=False,
             log_to_driver=False, configure_logging=False)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = gpus or int(opts.extra.get("ray_actors", 1))
    data = ray.data.from_items([{"item": json.dumps(asdict(item))} for item in todo])
    results = data.map_batches(RayWorker, fn_constructor_kwargs={"options": opts}, batch_size=1, concurrency=actors,
                               num_gpus=1 if gpus else 0)
    records = []
    for row in results.iter_rows():
        record = json.loads(row["record"])
        on_record(record)
        records.append(record)
    return records
