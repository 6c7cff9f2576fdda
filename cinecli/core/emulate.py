"""Device emulation on the CPU: cine's MPS and CUDA paths run here, under those devices' limits.

``CINE_EMULATE_DEVICE=mps`` (or ``cuda``) turns ``--device mps`` into ``devices.EMULATED`` (the CPU under another
name), and every rule that reads ``devices.limits`` takes the emulated device's branch: fp8 weights stored as
bits, float64 tables built on the host, attention chunked under the 4 GiB tensor cap, no pinned memory. Then two
guards make the emulation honest rather than a code path nobody checks:

  placement   every host → device move (``devices.to_device``) is checked: no float8 or float64 tensor, none over
              the size cap, and its bytes count against the emulated memory;
  compute     ``DeviceRules`` (a TorchDispatchMode around device work) checks every new tensor an op makes the same
              way (views share a checked storage and pass). Deliberate host work inside device code (file reads,
              float64 tables and schedules) runs in ``devices.on_host()``.

Memory is a ledger of live storages (bytes added when a storage is first seen, removed when it is freed); past
``CINE_EMULATE_DEVICE_MEMORY`` (default: ``LIMITS[kind].emulated_memory``) it raises the device's own out-of-memory
error (MPS: a RuntimeError from MPSAllocator; CUDA: torch.OutOfMemoryError), so what a user would see is tested
here. It is an approximation of an allocator (no caching, no fragmentation), so it proves that rules and error
paths work, not that a plan fits a real card to the last megabyte.
"""

from __future__ import annotations

import os
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode_stack
from torch.utils._pytree import tree_leaves

from .errors import DeviceError
from .limits import DeviceLimits
from .sizes import parse_size

_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


def torch_version() -> tuple[int, int]:
    """(major, minor) of the running torch: which ops a device has (LIMITS' ops_since)."""
    major, minor = torch.__version__.split(".")[:2]
    return int(major), int(minor)


class Ledger:
    """Live bytes on one emulated device (storages, each counted once), and its capacity."""

    def __init__(self, lim: DeviceLimits):
        self.kind, self.default_capacity = lim.kind, lim.emulated_memory
        self.live = 0
        self.peak = 0
        self._seen: dict[int, int] = {}

    @property
    def capacity(self) -> int:
        text = os.environ.get("CINE_EMULATE_DEVICE_MEMORY", "").strip()
        if not text:
            return self.default_capacity
        if (size := parse_size(text)) is None:
            raise DeviceError(f"CINE_EMULATE_DEVICE_MEMORY={text!r}: not a size like 8GB or 12GiB")
        return size

    def add(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        ptr, size = storage.data_ptr(), storage.nbytes()
        if ptr == 0 or ptr in self._seen:
            return
        if self.live + size > self.capacity:
            raise out_of_memory(self.kind, size, self.live, self.capacity)
        self._seen[ptr] = size
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, ptr)

    def _free(self, ptr: int) -> None:
        self.live -= self._seen.pop(ptr, 0)


_LEDGERS: dict[str, Ledger] = {}


def ledger(lim: DeviceLimits) -> Ledger:
    if lim.kind not in _LEDGERS:
        _LEDGERS[lim.kind] = Ledger(lim)
    return _LEDGERS[lim.kind]


def free_bytes(lim: DeviceLimits) -> int:
    """What the emulated device can still give (devices.device_memory on an emulated device)."""
    book = ledger(lim)
    return max(0, book.capacity - book.live)


# --- the device's errors ------------------------------------------------------------------------------------------
def out_of_memory(kind: str, size: int, live: int, capacity: int) -> Exception:
    """The exception the real device raises when an allocation does not fit."""
    mib = lambda n: f"{n / (1 << 20):.2f} MiB"  # noqa: E731
    if kind == "cuda":
        return torch.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {mib(size)}. GPU 0 has a total capacity of "
                                      f"{mib(capacity)} of which {mib(capacity - live)} is free. [emulated]")
    return RuntimeError(f"MPS backend out of memory (MPS allocated: {mib(live)}, other allocations: 0 bytes, max "
                        f"allowed: {mib(capacity)}). Tried to allocate {mib(size)} on private pool. [emulated]")


class EmulatedAbort(RuntimeError):
    """What would end the process on the real device (MPS: a tensor over 4 GiB): never caught as out of memory."""


def check(tensor: torch.Tensor, lim: DeviceLimits, what: str) -> None:
    """Raise the device's error for a tensor it could not hold."""
    if tensor.dtype in _FLOAT8 and not lim.float8:
        raise TypeError(f"Trying to convert {str(tensor.dtype).removeprefix('torch.').capitalize()} to the "
                        f"MPS backend but it does not have support for that dtype. [emulated {lim.kind}: {what}]")
    if tensor.dtype == torch.float64 and not lim.float64:
        raise TypeError("Cannot convert a MPS Tensor to float64 dtype as the MPS framework doesn't support float64. "
                        f"Please use float32 instead. [emulated {lim.kind}: {what}]")
    size = tensor.untyped_storage().nbytes() if tensor.layout == torch.strided else 0
    if lim.max_tensor_bytes is not None and size > lim.max_tensor_bytes:
        raise EmulatedAbort(f"[emulated {lim.kind}] {what} made a {size / (1 << 30):.2f} GiB tensor {tuple(tensor.shape)}: "
                            f"over the {lim.max_tensor_bytes >> 30} GiB a single tensor may have, the real device "
                            "aborts the process here")


def place(tensor: torch.Tensor, lim: DeviceLimits) -> None:
    """A tensor has just moved to the emulated device (devices.to_device): check and count it."""
    check(tensor, lim, "a tensor moved to the device")
    ledger(lim).add(tensor)


# --- compute ------------------------------------------------------------------------------------------------------
# SDPA kernels that never materialise scores on the CPU; an emulated MPS accounts for the scores it would make.
_FUSED_SDPA = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default}


class DeviceRules(TorchDispatchMode):
    """Checks and counts every tensor an op makes while active (device work on an emulated device)."""

    def __init__(self, lim: DeviceLimits, meta: bool = False):
        super().__init__()
        self.limits = lim
        self.book = ledger(lim)
        self.paused = 0
        self.devices = ("cpu", "meta") if meta else ("cpu",)  # meta: shape-only checks at real sizes (tests)
        self.largest = 0  # bytes of the largest tensor seen (scores included)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused and self.limits.fp32_scores and func in _FUSED_SDPA:
            self._scores(args[0], args[1])
        if not self.paused and self.limits.ops_since:
            self._has_op(func)
        out = func(*args, **(kwargs or {}))
        if self.paused:
            return out
        # A view (or an in-place op) makes no new tensor: it shares an input's storage, which was checked where it
        # was made; that input may be host data (a float64 schedule indexed on the host), so views pass.
        inputs = {x.untyped_storage().data_ptr() for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)
                  and x.layout == torch.strided and x.device.type != "meta"}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor) or t.device.type not in self.devices:
                continue
            if t.device.type == "cpu" and t.untyped_storage().data_ptr() in inputs:
                continue
            self.largest = max(self.largest, t.numel() * t.element_size())
            check(t, self.limits, f"op {func}")
            if t.device.type == "cpu":
                self.book.add(t)
        return out

    def _has_op(self, func) -> None:
        name = func.name().split("::")[-1].split(".")[0]
        for op, since in self.limits.ops_since:
            if name == op and torch_version() < since:
                raise NotImplementedError(f"The operator 'aten::{name}.out' is not currently implemented for the "
                                          f"{self.limits.kind.upper()} device (torch {'.'.join(map(str, since))} adds "
                                          "it). [emulated]")

    def _scores(self, q: torch.Tensor, k: torch.Tensor) -> None:
        """The fp32 score matrix a device like MPS materialises for SDPA, which the CPU's fused kernel does not."""
        b, h, lq, _ = q.shape  # [B, H, Lq, D]
        size = b * h * lq * k.shape[-2] * 4
        self.largest = max(self.largest, size)
        if self.limits.max_tensor_bytes is not None and size > self.limits.max_tensor_bytes:
            raise EmulatedAbort(f"[emulated {self.limits.kind}] attention over {lq} queries × {k.shape[-2]} keys × {h} "
                                f"heads makes a {size / (1 << 30):.2f} GiB fp32 score matrix: over the "
                                f"{self.limits.max_tensor_bytes >> 30} GiB a single tensor may have")


def _current() -> DeviceRules | None:
    modes = [m for m in _get_current_dispatch_mode_stack() if isinstance(m, DeviceRules)]
    return modes[-1] if modes else None


def active() -> bool:
    return _current() is not None


class suspended:
    """``devices.on_host()`` on an emulated device: the innermost DeviceRules lets ops through unchecked."""

    def __enter__(self):
        self.mode = _current()
        if self.mode is not None:
            self.mode.paused += 1
        return self

    def __exit__(self, *exc):
        if self.mode is not None:
            self.mode.paused -= 1
        return False
