"""GGUF files (city96's Wan2.1 DiT quantizations for ComfyUI-GGUF, ``*.gguf``), read with the ``gguf`` package.

What city96's converter (ComfyUI-GGUF ``tools/convert.py``, ``ModelWan``) writes, and how it reads back here:
  - ``general.architecture`` = ``"wan"``; tensor names are the original Wan keys (any ``model.diffusion_model.``
    prefix stripped — the key normalizer would take one anyway);
  - GGUF lists dimensions innermost first (``ne``); ``GGUFReader`` hands back numpy arrays in PyTorch order, so
    a float tensor reads with its original shape, and a block-quantized one as raw bytes ``[rows, row_bytes]``;
  - 1-D tensors, tensors of ≤ 1024 elements and every ``.modulation`` stay F32; the 5-D ``patch_embedding.weight``
    (GGML handles 4 dims) is added back as a 5-D F32 tensor by ``fix_5d_tensors.py``;
  - a tensor reshaped to rows of 256 for quantization names its real shape in ``comfy.gguf.orig_shape.<key>``.

Float tensors (F32, F16, BF16) become torch tensors of their shape; block-quantized linear weights stay raw
bytes (uint8 ``[out, row_bytes]``) that ``models.gguf_linear.GGUFLinear`` dequantizes per call. A type this
module does not decode is refused by name, with the file and tensor.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from ..core.errors import WeightsError

GGUF_SUFFIX = ".gguf"
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
# Block types GGUFLinear decodes: the types of city96's Wan2.1 files from Q3_K_S to Q8_0.
BLOCK_TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q5_1", "Q4_K", "Q4_0", "Q4_1", "Q3_K")


def is_gguf(path: Path) -> bool:
    return path.suffix == GGUF_SUFFIX


def _reader(path: Path):
    try:
        import gguf
    except ImportError:
        raise WeightsError(f"{path.name} is a GGUF file: install the gguf package (pip install gguf)") from None
    try:
        return gguf.GGUFReader(str(path), "c")  # copy-on-write map: tensors are writable views, the file is never touched
    except Exception as exc:  # the reader raises ValueError/struct errors/… on a damaged file
        raise WeightsError(f"unreadable GGUF file {path}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None


def _orig_shapes(reader) -> dict[str, tuple[int, ...]]:
    prefix = "comfy.gguf.orig_shape."
    return {name[len(prefix):]: tuple(int(d) for d in field.contents())
            for name, field in reader.fields.items() if name.startswith(prefix)}


def architecture(path: Path) -> str | None:
    field = _reader(path).get_field("general.architecture")
    return field.contents() if field is not None else None


def _entries(path: Path) -> Iterator[tuple[str, str, tuple[int, ...], object]]:
    """(name, type name, logical shape in PyTorch order, numpy data) per tensor; unknown types refused."""
    reader = _reader(path)
    orig = _orig_shapes(reader)
    for t in reader.tensors:
        kind = t.tensor_type.name
        if kind not in FLOAT_TYPES and kind not in BLOCK_TYPES:
            raise WeightsError(f"{path.name}: tensor {t.name} is GGUF type {kind}, which cine does not support "
                               f"(supported: {', '.join([*FLOAT_TYPES, *BLOCK_TYPES])})")
        shape = orig.get(t.name) or tuple(int(d) for d in reversed(t.shape))
        yield t.name, kind, shape, t.data


def read_gguf_header(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """``{key: (logical shape, dtype)}``; block-quantized tensors report ``torch.uint8``."""
    return {name: (shape, FLOAT_TYPES.get(kind, torch.uint8)) for name, kind, shape, _ in _entries(path)}


def block_types(path: Path) -> dict[str, str]:
    """``{key: GGML type name}`` of the block-quantized tensors of a GGUF file."""
    return {name: kind for name, kind, _, _ in _entries(path) if kind in BLOCK_TYPES}


def iter_gguf(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """``(key, tensor)``: float tensors in their shape and stored dtype, block tensors as uint8 ``[rows, row_bytes]``."""
    for name, kind, shape, data in _entries(path):
        tensor = torch.from_numpy(data)
        if kind == "BF16":  # the reader hands BF16 back as raw bytes
            tensor = tensor.view(torch.bfloat16)
        if kind in FLOAT_TYPES:
            tensor = tensor.reshape(shape)
        elif len(shape) != 2:
            raise WeightsError(f"{path.name}: {kind} tensor {name} has shape {shape}; only 2-D weights can be block-quantized")
        else:
            tensor = tensor.reshape(shape[0], -1)
        yield name, tensor
