"""Models: the Wan2.1 DiT, the Wan VAE and tiny decoder, and the umT5 / CLIP encoders, each with its loader.

Every loader takes a file, a folder or a state dict in any layout found in the wild, builds the module on the
meta device and fills it tensor by tensor in the target dtype (see load.py).
"""

from .dit_loader import infer_config, load_dit
from .image_encoder import ImageEncoder, load_image_encoder
from .text_encoder import TextEncoder, load_text_encoder
from .tiny_vae import TinyVAE
from .vae_loader import load_tiny_vae, load_vae
from .wan_dit import DIT_CONFIGS, Context, DiTConfig, WanDiT
from .wan_vae import VAE_CONFIGS, WanVAE

__all__ = [
    "DIT_CONFIGS", "VAE_CONFIGS", "Context", "DiTConfig", "ImageEncoder", "TextEncoder", "TinyVAE", "WanDiT", "WanVAE",
    "infer_config", "load_dit", "load_image_encoder", "load_text_encoder", "load_tiny_vae", "load_vae",
]
