"""DiT blocks streamed to the device one block ahead of use, for backbones whose weights do not fit it.

The transformer blocks hold nearly all the weights (the 14B DiT: 40 blocks of ~0.8 GB in bf16, ~0.3 GB hybrid);
the rest (patch/text/time/image embeddings, head) is small and moves to the device once. With streaming on:

  CUDA  block weights stay in pinned host memory; while block i computes, block i+1 is copied on a side stream
        (double buffering), so the device holds the activations plus about two blocks. The compute stream waits
        on the copy's event only when it needs the block; ``record_stream`` keeps the caching allocator from
        reusing a block's memory before the compute stream is done with it.
  MPS   the same, copied in order on the one stream (MPS has no user streams).
  CPU   the weights stay memory-mapped from the checkpoint (cine's quantized file, or a 16-bit one loaded
        zero-copy); each block's pages are dropped from the process once the block has run (``PagedBlocks``,
        ``load.release_pages``), so resident weights stay about one block. The page cache keeps them while RAM
        allows (the next step refaults them at memory speed); a machine short of RAM re-reads them from disk:
        1.2 GB per step for the 1.3B hybrid, seconds against minutes of CPU compute per step.

Weights are swapped in by pointing each parameter's ``.data`` at its device copy and back at the host tensor
afterwards, so parameters keep their identity: peft adapters (effect LoRAs, unmerged) live inside the blocks
and are streamed with them; switching effects (``adapters.Effects.use``) edits host tensors between forwards
and needs no reload. The device copies are fresh tensors; host weights are never modified by a forward.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn as nn

from ..core.devices import activation_dtype, kind, limits, module_to_device, to_device
from .wan_dit import Chunking


class BlockStream:
    """Iterate ``blocks`` with each block's parameters on ``device`` while it is in use, prefetching the next."""

    def __init__(self, blocks: nn.ModuleList, device: torch.device | str):
        self.blocks = blocks
        self.device = torch.device(device)
        self.copy_stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.copied_bytes = 0  # host → device traffic so far (tests and benchmarks read it)

    def _fetch(self, i: int) -> tuple[list[torch.Tensor], object]:
        """Queue the copy of block i's parameters → (device tensors in ``parameters()`` order, copy-done event)."""
        host = [p.data for p in self.blocks[i].parameters()]
        self.copied_bytes += sum(t.numel() * t.element_size() for t in host)
        if self.copy_stream is None:  # MPS, or the CPU stand-in the tests use: copies in order on the one stream
            return [to_device(t, self.device, copy=True) for t in host], None
        # Start after the compute queued so far (up to block i-1): at most ~2 blocks of copies are in flight.
        self.copy_stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.copy_stream):
            dev = [to_device(t, self.device, non_blocking=True) for t in host]
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        return dev, done

    def __iter__(self) -> Iterator[nn.Module]:
        n = len(self.blocks)
        if n == 0:
            return
        upcoming = self._fetch(0)
        for i in range(n):
            dev, done = upcoming
            upcoming = self._fetch(i + 1) if i + 1 < n else None  # overlaps with block i's compute
            if done is not None:
                compute = torch.cuda.current_stream(self.device)
                compute.wait_event(done)
                for t in dev:
                    t.record_stream(compute)  # freed only once the compute stream has used it
            params = list(self.blocks[i].parameters())
            host = [p.data for p in params]
            for p, d in zip(params, dev):
                p.data = d
            del dev
            try:
                yield self.blocks[i]
            finally:
                for p, h in zip(params, host):
                    p.data = h  # back to the host weights; the device copy is released


class PagedBlocks:
    """CPU streaming: iterate ``blocks``; once each has run, drop its memory-mapped pages and trim the heap."""

    def __init__(self, blocks: nn.ModuleList):
        self.blocks = blocks
        self.released_bytes = 0

    def __iter__(self) -> Iterator[nn.Module]:
        from .load import release_pages, trim_heap

        for block in self.blocks:
            try:
                yield block
            finally:
                self.released_bytes += release_pages(block)
                trim_heap()  # and the block's freed activations (glibc keeps q/k/v-sized blocks otherwise)


def stream_blocks(model: nn.Module, device: torch.device | str, *, force: bool = False) -> nn.Module:
    """Set a loaded WanDiT up to stream its blocks to ``device`` (everything else moves there once).

    On the CPU the blocks stay where they are (memory-mapped) and their pages are dropped after use
    (``PagedBlocks``), unless ``force``: then blocks are copied in from the host store exactly as on a GPU, which
    is how the tests exercise the copy path without one.
    """
    device = torch.device(device)
    if kind(device) == "cpu" and not force:
        model.block_stream = PagedBlocks(model.blocks)
        return model
    for name, child in model.named_children():
        if name != "blocks":
            module_to_device(child, device)
    with torch.no_grad():
        for p in model.blocks.parameters():
            if p.device.type != "cpu":
                p.data = p.data.cpu()
            if limits(device).pins_host and device.type == "cuda":
                p.data = p.data.pin_memory()  # page-locked: the side-stream copies run asynchronously
    model.block_stream = BlockStream(model.blocks, device)
    model.compute_dtype = activation_dtype(device, model.patch_embedding.weight.dtype)
    model.chunking = Chunking.for_device(limits(device))
    return model
