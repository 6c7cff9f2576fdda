"""Find and read weight files in every on-disk layout we meet in the wild.

A *source* is one of:
  - a state dict (``Mapping[str, Tensor]``), used as is;
  - a ``.safetensors`` file (read memory-mapped, one tensor at a time);
  - a ``*.safetensors.index.json`` (sharded; the shards sit next to it);
  - a ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt`` file (only through ``torch.load(weights_only=True)``:
    a pickle that would run code is refused);
  - a ``.gguf`` file (weights/gguf.py: float tensors as tensors, block-quantized weights as raw bytes);
  - a folder holding one of the above (a diffusers component folder, an original Wan repo, a ComfyUI
    models folder). Which file of a folder belongs to which component is decided by the caller's
    ``patterns`` (glob patterns tried in order).

Reading is lazy: ``iter_tensors`` yields one tensor at a time, straight from the memory map, so a loader
can cast and place each one before the next is touched and never holds a second full copy of the model.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import zipfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..core.errors import WeightsError
from .gguf import GGUF_SUFFIX, iter_gguf, read_gguf_header

Source = str | os.PathLike | Mapping[str, torch.Tensor]

PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".pkl")  # .pkl: RIFE's flownet.pkl
INDEX_SUFFIX = ".safetensors.index.json"


def _is_index(path: Path) -> bool:
    return path.name.endswith(INDEX_SUFFIX)


def resolve_files(source: str | os.PathLike, patterns: Sequence[str] = ("*.safetensors", "*.pth")) -> list[Path]:
    """Return the tensor files that make up ``source`` (several for a sharded checkpoint)."""
    path = Path(source).expanduser()
    if not path.exists():
        raise WeightsError(f"weights not found: {path}")
    if path.is_dir():
        # An index wins over the shards it names, for any pattern: that is how sharded checkpoints are read.
        for pattern in patterns:
            base = pattern.removesuffix("*.safetensors").removesuffix(".safetensors")
            indexes = sorted(p for p in path.glob(base + "*" + INDEX_SUFFIX) if p.is_file())
            if pattern.endswith(".safetensors") and len(indexes) == 1:
                return resolve_files(indexes[0])
            matches = sorted(p for p in path.glob(pattern) if p.is_file() and not _is_index(p))
            if matches:
                for match in matches:
                    check_weight_file(match)
                return matches
        raise WeightsError(f"no weight file matching {' or '.join(patterns)} in folder {path}")
    if _is_index(path):
        try:
            weight_map = json.loads(path.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise WeightsError(f"unreadable shard index {path}: {exc}") from None
        shards = [path.parent / name for name in dict.fromkeys(weight_map.values())]
        missing = [str(s) for s in shards if not s.is_file()]
        if missing:
            raise WeightsError(f"shard index {path.name} names missing files: {', '.join(missing)}")
        for shard in shards:
            check_weight_file(shard)
        return shards
    check_weight_file(path)
    return [path]


def check_weight_file(path: Path) -> None:
    """Say "empty", "truncated" or "corrupt" in one line before a reader says something cryptic (cheap: the header only).

    safetensors: an 8-byte little-endian header length, a JSON header, then data up to the largest offset it names.
    .pth: a zip archive (torch.save since 1.6; its directory sits at the end) or a legacy pickle (starts with 0x80).
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if size == 0:
                raise WeightsError(f"{path}: empty weight file (0 bytes); download or copy it again")
            if path.suffix == ".safetensors":
                n = int.from_bytes(head, "little") if len(head) == 8 else -1
                if not 2 <= n <= size - 8:
                    raise WeightsError(f"{path}: corrupt safetensors file (no valid header: it claims {max(n, 0)} bytes "
                                       f"of a {size}-byte file)")
                try:
                    header = json.loads(f.read(n))
                    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
                except (ValueError, TypeError, KeyError, IndexError, AttributeError):
                    raise WeightsError(f"{path}: corrupt safetensors file (its header is not valid JSON)") from None
                if 8 + n + end > size:
                    raise WeightsError(f"{path}: truncated safetensors file ({size} of {8 + n + end} bytes)")
            elif path.suffix in PICKLE_SUFFIXES:
                if head[:4] == b"PK\x03\x04":
                    if not zipfile.is_zipfile(f):
                        raise WeightsError(f"{path}: truncated or corrupt checkpoint (its zip directory is missing)")
                elif head[:1] != b"\x80":
                    raise WeightsError(f"{path}: corrupt checkpoint (neither a torch.save zip nor a pickle)")
    except OSError as exc:
        raise WeightsError(f"cannot read {path}: {exc.strerror or exc}") from None


def load_pickle(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a pickled checkpoint, through ``torch.load(weights_only=True)`` only (memory-mapped when it is
    a torch.save zip); a pickle naming other Python objects is refused (exit 4)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        if "GLOBAL" not in str(exc):  # not a refused class: the pickle itself is broken
            raise WeightsError(f"{path}: corrupt checkpoint (not a readable pickle)") from None
        named = re.search(r"GLOBAL (\S+)", str(exc))
        first = f"it names {named.group(1)}" if named else type(exc).__name__
        raise WeightsError(
            f"refusing to load {path.name}: it holds Python objects, not only tensors ({first}); "
            "convert it to .safetensors from a trusted copy"
        ) from None
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        try:  # legacy (non-zip) checkpoints cannot be memory-mapped; weights_only still applies
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc2:
            if "GLOBAL" not in str(exc2):
                raise WeightsError(f"{path}: corrupt checkpoint (not a readable pickle)") from None
            raise WeightsError(f"refusing to load {path.name}: it holds Python objects, not only tensors") from None
        except Exception:
            raise WeightsError(f"unreadable checkpoint {path}: {str(exc).splitlines()[0]}") from None
    # Training checkpoints often nest the weights one level down.
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise WeightsError(f"{path.name} does not hold a state dict (found {type(obj).__name__})")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def iter_tensors(source: Source, patterns: Sequence[str] = ("*.safetensors", "*.pth")) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(key, tensor)`` pairs of a source, one at a time, on the CPU, in the stored dtype."""
    if isinstance(source, Mapping):
        yield from source.items()
        return
    for path in resolve_files(source, patterns):
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    for key in f.keys():
                        yield key, f.get_tensor(key)
            except (SafetensorError, OSError) as exc:
                raise WeightsError(f"unreadable safetensors file {path}: {exc}") from None
        elif path.suffix in PICKLE_SUFFIXES:
            yield from load_pickle(path).items()
        elif path.suffix == GGUF_SUFFIX:
            yield from iter_gguf(path)
        else:
            raise WeightsError(f"unknown weight file type: {path} (expected .safetensors or .pth)")


_SAFETENSORS_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I8": torch.int8, "U8": torch.uint8,
                      "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def read_header(source: Source, patterns: Sequence[str] = ("*.safetensors", "*.pth")) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{key: (shape, stored dtype)}`` of a source without reading tensor data (configs, pre-quantized layers)."""
    if isinstance(source, Mapping):
        return {k: (tuple(v.shape), v.dtype) for k, v in source.items()}
    header: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
    for path in resolve_files(source, patterns):
        if path.suffix == ".safetensors":
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    for key in f.keys():
                        info = f.get_slice(key)
                        header[key] = (tuple(info.get_shape()), _SAFETENSORS_DTYPES.get(info.get_dtype(), torch.float32))
            except (SafetensorError, OSError) as exc:
                raise WeightsError(f"unreadable safetensors file {path}: {exc}") from None
        elif path.suffix == GGUF_SUFFIX:
            header.update(read_gguf_header(path))
        else:
            header.update((k, (tuple(v.shape), v.dtype)) for k, v in load_pickle(path).items())
    return header


_DTYPE_NAMES = {v: k for k, v in _SAFETENSORS_DTYPES.items()}


def write_safetensors(path: str | os.PathLike, layout: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                      pieces: Iterator[torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """Write a safetensors file one piece at a time: ``pieces`` yields the data of ``layout``'s entries in order,
    each tensor whole or as consecutive pieces, so neither a whole model nor a whole large tensor needs to exist
    in memory (safetensors' ``save_file`` first copies every tensor into bytes). Atomic: a temp file in the same
    folder renamed over ``path``, removed on any failure. Returns the bytes of tensor data."""
    path = Path(path)
    header, offset = {}, 0
    for key, (shape, dtype) in layout.items():
        size = int(torch.Size(shape).numel()) * torch.empty(0, dtype=dtype).element_size()
        header[key] = {"dtype": _DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps({**({"__metadata__": metadata} if metadata else {}), **header}, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # tensor data starts 8-byte aligned
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    try:
        with open(tmp, "wb") as f:
            f.write(len(blob).to_bytes(8, "little") + blob)
            written = 0
            for piece in pieces:
                data = piece.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
                f.write(memoryview(data))
                written += data.nbytes
            if written != offset:
                raise ValueError(f"write_safetensors: {written} bytes of tensor data for a layout of {offset}")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return offset


def read_shapes(source: Source, patterns: Sequence[str] = ("*.safetensors", "*.pth")) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of a source without reading tensor data (used to infer configs)."""
    return {k: shape for k, (shape, _) in read_header(source, patterns).items()}


def read_config(source: Source, name: str = "config.json") -> dict | None:
    """The JSON config stored next to (or inside) a source folder, if any."""
    if isinstance(source, Mapping):
        return None
    path = Path(source).expanduser()
    candidate = path / name if path.is_dir() else path.parent / name
    if not candidate.is_file():
        return None
    try:
        return json.loads(candidate.read_text())
    except ValueError as exc:
        raise WeightsError(f"unreadable config {candidate}: {exc}") from None


def component_folder(source: Source, subfolder: str) -> Source:
    """A diffusers pipeline root keeps each component in its own folder (``transformer/``, ``vae/``, …)."""
    if isinstance(source, (str, os.PathLike)) and Path(source).is_dir() and (Path(source) / subfolder).is_dir():
        return Path(source) / subfolder
    return source


def describe(source: Source) -> str:
    """How error messages name a source."""
    return "state dict" if isinstance(source, Mapping) else str(source)
