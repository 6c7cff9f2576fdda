"""DiT blocks streamed to the device one block ahead of use, for backbones whose weights do not fit it.

The transformer blocks hold nearly all the weights (the 14B DiT: 40 blocks of ~0.8 GB in bf16, ~0.3 GB hybrid);
the rest (patch/text/time/image embeddings, head) is small and moves to the device once. With streaming on:

  CUDA  each block's weights wait packed in one exactly-pinned host slab (``Slab``); while block i computes,
        block i+1 is copied (one copy per block) on a side stream into the other of two device slots (double
        buffering), so the device holds the activations plus exactly two blocks. The compute stream waits on the
        copy's event only when it needs the block; a slot is overwritten only after an event says the compute two
        blocks back has finished with it.
  MPS   the same slabs and slots, copied in order on the one stream (MPS has no user streams).
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

from ..core.devices import activation_dtype, kind, limits, module_to_device, storage_dtype, to_device
from .wan_dit import Chunking

ALIGN = 256  # bytes: every tensor in a slab starts on a 256-byte boundary (what CUDA kernels and copies like)


class Slab:
    """One block's parameters packed into one contiguous host buffer, each parameter's ``.data`` a view into it.

    One buffer per block makes a block's host → device move a single copy, and lets CUDA pin exactly its bytes
    (``cudaHostRegister`` on the buffer; ``pin_memory()`` per tensor goes through the caching host allocator, which
    rounds every allocation up to a power of two: 17.9 GB pinned for a 12.6 GB 14B hybrid).
    """

    def __init__(self, block: nn.Module, pin: bool):
        self.params = list(block.parameters())
        self.layout = []  # (offset, nbytes) per parameter
        size = 0
        for p in self.params:
            n = p.numel() * p.element_size()
            self.layout.append((size, n))
            size += -(-n // ALIGN) * ALIGN
        self.nbytes = size
        self.payload = sum(n for _, n in self.layout)  # the parameters' own bytes (copied_bytes counts these)
        self.buffer = torch.empty(size, dtype=torch.uint8)
        with torch.no_grad():
            for p, (off, n) in zip(self.params, self.layout):
                self.buffer[off:off + n].copy_(p.data.cpu().reshape(-1).view(torch.uint8))  # bytes, any dtype
                p.data = self.view(self.buffer, off, n, p.data)
        self.pinned = pin_exactly(self.buffer) if pin else 0
        self._ptrs = self._current()

    @staticmethod
    def view(buffer: torch.Tensor, off: int, n: int, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        return buffer[off:off + n].view(dtype or like.dtype).view(like.shape)

    def _current(self) -> list[tuple[int, int]]:
        return [(id(p), p.data.data_ptr()) for p in self.params]

    def stale(self, block: nn.Module) -> bool:
        """Whether the block's parameters changed since packing (an effect LoRA attached: new adapter parameters)."""
        params = list(block.parameters())
        return len(params) != len(self.params) or [(id(p), p.data.data_ptr()) for p in params] != self._ptrs


def pin_exactly(buffer: torch.Tensor) -> int:
    """Page-lock ``buffer``'s own bytes (CUDA) and unlock them when it is freed; returns the bytes pinned.

    A failure is the out-of-memory error it is (``CUDA error: out of memory``, exit 7), not a crash later."""
    import weakref

    cudart = torch.cuda.cudart()
    ptr, size = buffer.data_ptr(), buffer.numel()
    code = int(cudart.cudaHostRegister(ptr, size, 0))
    if code != 0:
        raise RuntimeError(f"CUDA error: out of memory (page-locking {size / (1 << 30):.2f} GiB of host memory for "
                           f"streamed blocks failed: cudaError {code})")
    weakref.finalize(buffer.untyped_storage(), cudart.cudaHostUnregister, ptr)
    return size


class BlockStream:
    """Iterate ``blocks`` with each block's parameters on ``device`` while it is in use, prefetching the next.

    The device holds exactly two block-sized slots, used in turn: block i+1 is copied into the other slot while
    block i computes, and a slot is overwritten only after the compute that used it (two blocks back) is done
    (an event on the compute stream). So the pool is two blocks, as the plan counts, never three.
    """

    def __init__(self, blocks: nn.ModuleList, device: torch.device | str):
        self.blocks = blocks
        self.device = torch.device(device)
        real_cuda = self.device.type == "cuda"
        self.pin = real_cuda and limits(self.device).pins_host
        self.copy_stream = torch.cuda.Stream(self.device) if real_cuda else None
        self.slabs = [Slab(b, self.pin) for b in blocks]
        self.slots: list[torch.Tensor | None] = [None, None]
        self.freed: list[object] = [None, None]  # per slot: the compute-stream event after its last use
        self.copied_bytes = 0  # host → device traffic so far (tests and benchmarks read it)

    @property
    def pinned_bytes(self) -> int:
        return sum(s.pinned for s in self.slabs)

    def release_slots(self) -> None:
        """Give the two device slots back (a parked expert of a two-expert backbone); the next pass reallocates."""
        if self.copy_stream is not None:
            self.copy_stream.synchronize()  # no copy may still be writing into a slot being freed
        self.slots, self.freed = [None, None], [None, None]

    def _slot(self, j: int, nbytes: int) -> torch.Tensor:
        if self.slots[j] is None or self.slots[j].numel() < nbytes:
            size = max(nbytes, max(s.nbytes for s in self.slabs))
            self.slots[j] = to_device(torch.empty(0, dtype=torch.uint8), self.device).new_empty(size)
        return self.slots[j]

    def _fetch(self, i: int) -> tuple[list[torch.Tensor], object]:
        """Queue the copy of block i into slot i % 2 → (device views in ``parameters()`` order, copy-done event)."""
        if self.slabs[i].stale(self.blocks[i]):  # repack after an adapter was attached (it moved host memory)
            self.slabs[i] = Slab(self.blocks[i], self.pin)
        slab, j = self.slabs[i], i % 2
        self.copied_bytes += slab.payload
        slot = self._slot(j, slab.nbytes)
        if self.copy_stream is None:  # MPS, or the CPU stand-in the tests use: in order on the one stream
            slot[:slab.nbytes].copy_(slab.buffer)
            done = None
        else:
            with torch.cuda.stream(self.copy_stream):
                if self.freed[j] is not None:
                    self.copy_stream.wait_event(self.freed[j])  # block i-2 has finished with this slot
                slot[:slab.nbytes].copy_(slab.buffer, non_blocking=True)
                done = torch.cuda.Event()
                done.record(self.copy_stream)
        views = [Slab.view(slot, off, n, p.data, storage_dtype(p.dtype, self.device))
                 for p, (off, n) in zip(slab.params, slab.layout)]
        return views, done

    def __iter__(self) -> Iterator[nn.Module]:
        n = len(self.blocks)
        if n == 0:
            return
        upcoming = self._fetch(0)
        for i in range(n):
            dev, done = upcoming
            if done is not None:
                torch.cuda.current_stream(self.device).wait_event(done)
            params = list(self.blocks[i].parameters())
            host = [p.data for p in params]
            for p, d in zip(params, dev):
                p.data = d
            del dev
            # the next block's copy overlaps with this one's compute (its slot was freed two blocks ago)
            upcoming = self._fetch(i + 1) if i + 1 < n else None
            try:
                yield self.blocks[i]
            finally:
                for p, h in zip(params, host):
                    p.data = h  # back to the host weights; the slot is reused two blocks on
                if self.copy_stream is not None:
                    freed = torch.cuda.Event()
                    freed.record(torch.cuda.current_stream(self.device))
                    self.freed[i % 2] = freed


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
    model.block_stream = BlockStream(model.blocks, device)  # packs each block into one (CUDA: pinned) host slab
    model.compute_dtype = activation_dtype(device, model.patch_embedding.weight.dtype)
    model.chunking = Chunking.for_device(limits(device))
    return model
