"""Models: the Wan2.1 DiT, the Wan VAE and tiny decoder, and the umT5 / CLIP encoders, each with its loader.

Every loader takes a file, a folder or a state dict in any layout found in the wild, builds the module on the
meta device and fills it tensor by tensor in the target dtype (see load.py). Names are imported lazily, so
``from cinecli.models import load_dit`` does not pull in transformers (≈100 MB of resident memory).
scan.py tells which of these components a file on disk holds. May import weights/, effects/ and core/.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "load_dit": "dit_loader", "infer_config": "dit_loader",
    "DIT_CONFIGS": "wan_dit", "Context": "wan_dit", "DiTConfig": "wan_dit", "WanDiT": "wan_dit",
    "load_vae": "vae_loader", "load_tiny_vae": "vae_loader", "VAE_CONFIGS": "wan_vae", "WanVAE": "wan_vae",
    "TinyVAE": "tiny_vae",
    "load_text_encoder": "text_encoder", "TextEncoder": "text_encoder",
    "load_image_encoder": "image_encoder", "ImageEncoder": "image_encoder",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cinecli.models' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value
