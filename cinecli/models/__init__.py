"""Models: the Wan2.1 DiT, the Wan VAE and tiny decoder, and the umT5 / CLIP encoders, with their loaders."""

from .dit_loader import infer_config, load_dit
from .wan_dit import DIT_CONFIGS, Context, DiTConfig, WanDiT

__all__ = ["DIT_CONFIGS", "Context", "DiTConfig", "WanDiT", "infer_config", "load_dit"]
