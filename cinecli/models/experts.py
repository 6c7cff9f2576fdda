"""Mixture-of-experts backbones (Wan2.2-I2V-A14B): two DiTs of one architecture, exactly one in use at a time.

The high-noise expert runs the first steps of the schedule and the low-noise expert the rest (the sampler's
``expert_for`` decides). Memory holds one expert's weights plus the rest, never two experts' worth, because the
idle one is parked where the memory plan (plan/memory.py) counts it:

  CPU       both experts are memory-mapped files; parking one drops its pages from the process
            (``load.release_pages``), so the next one's steps fault in only their own pages.
  streamed  each expert streams its blocks through two device slots (streaming.py); parking one frees its slots,
            so the device holds two blocks of the active expert plus both experts' small non-block parts.
  resident  the active expert is whole on the device; the idle one waits in host memory and the two trade places
            at the switch (as the official ``offload_model`` does: wan/image2video.py moves the idle expert to
            the CPU).

A one-DiT backbone uses the same object with one model: ``activate`` never parks anything.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..core.devices import activation_dtype, kind, to_device


class Experts:
    """Named DiTs (``"high_noise"``, ``"low_noise"``) on ``device``; ``activate(name)`` parks the others first."""

    def __init__(self, device: torch.device, streamed: bool):
        self.device = torch.device(device)
        self.streamed = streamed
        self.models: dict[str, nn.Module] = {}
        self.active: str | None = None
        self.switches = 0  # how many times an expert was parked for another (tests read it)

    @property
    def swaps_whole(self) -> bool:
        """Whether activating moves an expert's whole weights (resident on a GPU or Mac with two experts)."""
        return len(self.models) > 1 and not self.streamed and kind(self.device) != "cpu"

    def add(self, name: str, model: nn.Module) -> None:
        """A loaded expert (on the host when ``swaps_whole``: it moves to the device when activated)."""
        self.models[name] = model

    def activate(self, name: str) -> nn.Module:
        """The expert ``name``, on the device and ready; any other expert is parked first (its memory freed)."""
        if self.active != name:
            if self.active is not None:
                self.park(self.active)
                self.switches += 1
            model = self.models[name]
            if self.swaps_whole:
                _move(model, self.device)
                model.compute_dtype = activation_dtype(self.device, model.patch_embedding.weight.dtype)
            self.active = name
        return self.models[name]

    def park(self, name: str) -> None:
        """Free what expert ``name`` holds on the device (CPU: its mapped pages) until it is activated again."""
        from ..core.devices import release_cached
        from .load import release_pages, trim_heap

        model = self.models[name]
        if kind(self.device) == "cpu":
            release_pages(model)
            trim_heap()
        elif getattr(model, "block_stream", None) is not None:  # streamed: free its two device slots
            model.block_stream.release_slots()
            release_cached(self.device)
        elif self.swaps_whole:
            _move(model, torch.device("cpu"))
            release_cached(self.device)
        if self.active == name:
            self.active = None

    def release(self) -> None:
        """After the denoising steps: on the CPU every expert's pages leave the process (the VAE decode is next)."""
        from .load import release_pages

        release_pages(*self.models.values())  # only file-mapped pages: a no-op for weights on a GPU


def _move(model: nn.Module, device: torch.device) -> None:
    """Every weight of ``model`` copied to ``device`` (``devices.to_device``). Always a copy, as between a GPU and
    the host, so an emulated device (whose tensors live on the CPU) frees what it held when the expert leaves."""
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            t.data = to_device(t.data, device, copy=True)
