"""GGUF files written with the ``gguf`` package, in city96's layout for Wan2.1 DiTs (ComfyUI-GGUF tools/convert.py).

The package quantizes Q8_0, Q5_0/Q5_1 and Q4_0/Q4_1 (``gguf.quants.quantize``) but not the K-types
(NotImplementedError in gguf 0.19): Q3_K, Q4_K, Q5_K and Q6_K blocks are built from random bytes here, with their
float16 super-block scales (d, dmin) set to small finite values — any byte pattern is a valid block otherwise.
The reference for every type is the package's own ``gguf.quants.dequantize``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

FLOATS = ("F32", "F16", "BF16")
BLOCK_TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q5_0", "Q5_1", "Q4_K", "Q4_0", "Q4_1", "Q3_K")
# Byte offsets of the float16 scales in each K-type block (the rest of a block is any bytes).
K_SCALE_FIELDS = {"Q4_K": (0, 2), "Q5_K": (0, 2), "Q6_K": (208,), "Q3_K": (108,), "Q2_K": (80, 82)}


def encode(array: np.ndarray, kind: str, rng: np.random.Generator, scale: float = 1e-3) -> np.ndarray:
    """A float32 [rows, cols] array → its GGUF data of type ``kind`` (hand-built random blocks for K-types)."""
    import gguf

    qtype = gguf.GGMLQuantizationType[kind]
    if kind == "F16":
        return array.astype(np.float16)
    if kind not in K_SCALE_FIELDS:
        return gguf.quants.quantize(array.astype(np.float32), qtype)
    per_block, size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = array.shape
    raw = rng.integers(0, 256, (rows, cols // per_block * size), dtype=np.uint8)
    blocks = raw.reshape(-1, size)
    for at in K_SCALE_FIELDS[kind]:
        d = (np.abs(rng.standard_normal((blocks.shape[0], 1))) * scale).astype(np.float16)
        blocks[:, at:at + 2] = d.view(np.uint8)
    return raw


def reference(data: np.ndarray, kind: str) -> torch.Tensor:
    """The gguf package's own dequantization, as a float32 tensor."""
    import gguf

    return torch.from_numpy(np.ascontiguousarray(gguf.quants.dequantize(data, gguf.GGMLQuantizationType[kind]), dtype=np.float32))


def city96_type(key: str, tensor: torch.Tensor, kind: str) -> str:
    """Which type city96's converter + llama.cpp quantize give a Wan tensor: F32 for 1-D, tiny (≤ 1024) and
    ``.modulation`` tensors and the 5-D patch embedding; ``kind`` for 2-D weights whose rows fit its blocks;
    F16 otherwise (llama.cpp's fallback)."""
    import gguf

    if tensor.ndim != 2 or tensor.numel() <= 1024 or ".modulation" in key or key == "head.modulation":
        return "F32"
    if kind in FLOATS:
        return kind
    per_block, _ = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    return kind if tensor.shape[1] % per_block == 0 else "F16"


def write_city96_gguf(sd: dict[str, torch.Tensor], path: Path, kind: str, seed: int = 0) -> dict[str, torch.Tensor]:
    """Write ``sd`` (original Wan keys) as city96 does; return the float32 weights the file stands for."""
    import gguf

    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(path), arch="wan")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    meant = {}
    for key, tensor in sorted(sd.items()):
        t = city96_type(key, tensor, kind)
        array = tensor.float().numpy()
        data = array if t == "F32" else encode(array, t, rng)
        writer.add_tensor(key, data, raw_dtype=gguf.GGMLQuantizationType[t] if t not in ("F32", "F16") else None)
        meant[key] = torch.from_numpy(array.copy()) if t == "F32" else reference(data, t).reshape(tensor.shape)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return meant
