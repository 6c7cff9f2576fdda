"""The self-test backbone: a tiny random-weight Wan2.1 stack written in the real on-disk layouts.

``cine doctor`` runs the whole pipeline on it (no download needed), and the tests use it as their backbone.
Layouts, as the public checkpoints ship them:
  dit/diffusion_pytorch_model.safetensors   original Wan keys, bf16 (like Wan2.1-Fun-1.3B-InP)
  Wan2.1_VAE.pth, taew2_1.pth               original VAE keys and the TAEW2.1 layout, fp32, weights-only pickles
  text_encoder/ , tokenizer/                transformers folders (as in a diffusers pipeline root)
  image_encoder/                            transformers CLIPVisionModel folder
  selftest.toml                             a preset whose inline backbone points at the files above
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..models.wan_dit import DIT_CONFIGS, WanDiT

WORDS = ["<pad>", "</s>", "<unk>", "the", "a", "camera", "subject", "orbit", "orbits", "around", "frozen", "time",
         "slow", "motion", "zoom", "dolly", "cinematic", "bullet", "rw360xz", "in", "of", "and", "moves", "effect"]


def _random_(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Fill every parameter: projections ~ N(0, 1/fan_in), norms near 1, the rest small."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name or name.endswith("gamma") or "layer_norm" in name:
                p.copy_(1 + 0.05 * noise)
            elif p.ndim >= 2 and "modulation" not in name:
                p.copy_(noise / p[0].numel() ** 0.5)
            else:
                p.copy_(0.02 * noise)
    return module


def write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>").save_pretrained(folder)


def write_backbone(root: Path, seed: int = 0) -> Path:
    """Write the tiny stack under ``root`` (once; reused when complete). Returns the preset file."""
    preset = root / "selftest.toml"
    if preset.exists():
        return preset
    from transformers import CLIPVisionModel, UMT5EncoderModel

    from ..models.image_encoder import IMAGE_ENCODER_CONFIGS
    from ..models.text_encoder import TEXT_ENCODER_CONFIGS
    from ..models.tiny_vae import TINY_VAE_CONFIGS, TinyVAE
    from ..models.wan_vae import VAE_CONFIGS, WanVAE

    root.mkdir(parents=True, exist_ok=True)
    dit_cfg = DIT_CONFIGS["tiny-i2v"]
    dit = _random_(WanDiT(dit_cfg), seed)
    (root / "dit").mkdir(exist_ok=True)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in dit.state_dict().items()},
              root / "dit" / "diffusion_pytorch_model.safetensors")
    (root / "dit" / "config.json").write_text(json.dumps({"_class_name": "WanModel", "model_type": "i2v", "dim": dit_cfg.dim,
                                                          "num_heads": dit_cfg.num_heads, "num_layers": dit_cfg.num_layers}))
    torch.save(_random_(WanVAE(VAE_CONFIGS["tiny"]), seed + 1).state_dict(), root / "Wan2.1_VAE.pth")
    torch.save(_random_(TinyVAE(TINY_VAE_CONFIGS["test"]), seed + 4).state_dict(), root / "taew2_1.pth")
    text_cfg = TEXT_ENCODER_CONFIGS["tiny"]
    assert text_cfg.dim == dit_cfg.text_dim and text_cfg.vocab_size >= len(WORDS)
    _random_(UMT5EncoderModel(text_cfg.to_hf()), seed + 2).save_pretrained(root / "text_encoder")
    write_tokenizer(root / "tokenizer")
    clip_cfg = IMAGE_ENCODER_CONFIGS["tiny"]
    _random_(CLIPVisionModel(clip_cfg.to_hf()), seed + 3).save_pretrained(root / "image_encoder")

    tmp = preset.with_suffix(".tmp")
    tmp.write_text(
        'name = "selftest"\n'
        'description = "the whole pipeline on the tiny self-test backbone (its videos are noise)"\n'
        'prompt = "the camera orbits around the frozen subject"\n'
        'frames = 9\nfps = 8\nmax_area = 4096\n\n'
        '[backbone]\nname = "selftest-tiny"\nmodel_type = "i2v"\nsupports_last_frame = true\n'
        'dit = { path = "dit" }\nvae = { path = "Wan2.1_VAE.pth" }\n'
        'text_encoder = { path = "text_encoder" }\ntokenizer = { path = "tokenizer" }\n'
        'image_encoder = { path = "image_encoder" }\ntiny_vae = { path = "taew2_1.pth" }\n'
        'sampler = { kind = "distill", timesteps = [1000, 750, 500, 250], shift = 5.0 }\n'
    )
    tmp.replace(preset)  # last: a complete preset file means a complete stack
    return preset


def sample_image(width: int = 96, height: int = 64):
    """A deterministic test photo: a colour gradient with a disc (no bundled file needed)."""
    import numpy as np
    from PIL import Image

    y, x = np.mgrid[0:height, 0:width]
    img = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), np.full_like(x, 128)], -1)
    disc = (x - width / 2) ** 2 + (y - height / 2) ** 2 < (min(width, height) / 4) ** 2
    img[disc] = (240, 220, 40)
    return Image.fromarray(img.astype(np.uint8), "RGB")
