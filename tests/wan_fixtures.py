"""Tiny random Wan2.1 DiT weights, and writers for every on-disk layout real checkpoints use.

The original→diffusers key table below is written independently of cinecli's normalizer, straight from
wan2.1-reference.md §B (like diffusers' converter script), so a wrong rule in cinecli cannot pass by symmetry.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from cinecli.models.wan_dit import DIT_CONFIGS, DiTConfig, WanDiT

# original → diffusers, applied as ordered substring replacements (norm2/norm3 swapped through a placeholder).
ORIGINAL_TO_DIFFUSERS = [
    ("time_embedding.0", "condition_embedder.time_embedder.linear_1"),
    ("time_embedding.2", "condition_embedder.time_embedder.linear_2"),
    ("text_embedding.0", "condition_embedder.text_embedder.linear_1"),
    ("text_embedding.2", "condition_embedder.text_embedder.linear_2"),
    ("time_projection.1", "condition_embedder.time_proj"),
    ("img_emb.proj.0", "condition_embedder.image_embedder.norm1"),
    ("img_emb.proj.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    ("img_emb.proj.3", "condition_embedder.image_embedder.ff.net.2"),
    ("img_emb.proj.4", "condition_embedder.image_embedder.norm2"),
    ("img_emb.emb_pos", "condition_embedder.image_embedder.pos_embed"),
    ("head.modulation", "scale_shift_table"),
    ("head.head", "proj_out"),
    (".modulation", ".scale_shift_table"),
    ("self_attn.q.", "attn1.to_q."), ("self_attn.k.", "attn1.to_k."), ("self_attn.v.", "attn1.to_v."),
    ("self_attn.o.", "attn1.to_out.0."), ("self_attn.norm_q", "attn1.norm_q"), ("self_attn.norm_k", "attn1.norm_k"),
    ("cross_attn.q.", "attn2.to_q."), ("cross_attn.k.", "attn2.to_k."), ("cross_attn.v.", "attn2.to_v."),
    ("cross_attn.o.", "attn2.to_out.0."), ("cross_attn.norm_q", "attn2.norm_q"), ("cross_attn.norm_k.", "attn2.norm_k."),
    ("cross_attn.k_img", "attn2.add_k_proj"), ("cross_attn.v_img", "attn2.add_v_proj"),
    ("cross_attn.norm_k_img", "attn2.norm_added_k"),
    ("ffn.0", "ffn.net.0.proj"), ("ffn.2", "ffn.net.2"),
]


def to_diffusers_key(key: str) -> str:
    for a, b in ORIGINAL_TO_DIFFUSERS:
        key = key.replace(a, b)
    if key.startswith("blocks."):  # the affine cross-attention norm: original norm3 is diffusers' norm2
        key = key.replace(".norm3.", ".norm2.")
    return key


def tiny_config(model_type: str = "i2v", **kw) -> DiTConfig:
    from dataclasses import replace

    if model_type == "t2v":  # no image branch: in_dim 16, image_dim unused (left at its default)
        kw = {"in_dim": 16, "image_dim": DiTConfig.image_dim, **kw}
    return replace(DIT_CONFIGS["tiny-i2v"], model_type=model_type, **kw)


def random_state_dict(cfg: DiTConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Original-layout fp32 weights where every tensor matters: norms near 1, projections ~ N(0, 1/fan_in)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in WanDiT(cfg).state_dict().items()}
    sd = {}
    for k, shape in sorted(shapes.items()):
        noise = torch.randn(shape, generator=gen)
        if k.endswith("weight") and "norm" in k or k.endswith("proj.0.weight") or k.endswith("proj.4.weight"):
            sd[k] = 1 + 0.1 * noise
        elif len(shape) >= 2 and "modulation" not in k and "emb_pos" not in k:
            fan_in = int(torch.tensor(shape[1:]).prod())
            sd[k] = noise / fan_in**0.5
        else:
            sd[k] = 0.1 * noise
    return sd


def diffusers_model(cfg: DiTConfig, sd: dict[str, torch.Tensor]):
    from diffusers import WanTransformer3DModel

    model = WanTransformer3DModel(
        patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=cfg.in_dim, out_channels=cfg.out_dim, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim,
        ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
        eps=cfg.eps, image_dim=cfg.image_dim if cfg.has_image_input else None,
        added_kv_proj_dim=cfg.dim if cfg.has_image_input else None,
        pos_embed_seq_len=514 if cfg.model_type == "flf2v" else None,
    )
    model.load_state_dict({to_diffusers_key(k): v for k, v in sd.items()}, strict=True)
    return model.eval()


# --- writers: one per layout in the wild --------------------------------------------------------------------------
def write_layout(layout: str, sd: dict[str, torch.Tensor], root: Path, cfg: DiTConfig) -> Path:
    """Write ``sd`` (original names) in ``layout`` under ``root``; return the path a user would pass."""
    root.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in sd.items()}
    if layout == "safetensors":
        save_file(sd, root / "model.safetensors")
        return root / "model.safetensors"
    if layout == "bf16-safetensors":
        save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, root / "model_bf16.safetensors")
        return root / "model_bf16.safetensors"
    if layout == "comfyui":
        save_file({"model.diffusion_model." + k: v for k, v in sd.items()}, root / "wan_comfy.safetensors")
        return root / "wan_comfy.safetensors"
    if layout == "diffusion_model-prefix":
        save_file({"diffusion_model." + k: v for k, v in sd.items()}, root / "wan_prefixed.safetensors")
        return root / "wan_prefixed.safetensors"
    if layout == "pth":
        torch.save(sd, root / "model.pth")
        return root / "model.pth"
    if layout == "sharded":  # the official Wan repo layout: shards + index + config.json beside other components
        keys = sorted(sd)
        half = len(keys) // 2
        weight_map = {}
        for i, part in enumerate((keys[:half], keys[half:]), start=1):
            name = f"diffusion_pytorch_model-{i:05d}-of-00002.safetensors"
            save_file({k: sd[k] for k in part}, root / name)
            weight_map.update({k: name for k in part})
        (root / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
        (root / "config.json").write_text(json.dumps({"_class_name": "WanModel", "dim": cfg.dim, "num_heads": cfg.num_heads, "model_type": cfg.model_type}))
        torch.save({"decoder.conv1.weight": torch.zeros(1)}, root / "Wan2.1_VAE.pth")  # a neighbour that must be ignored
        return root
    if layout == "diffusers":  # a diffusers pipeline root with transformer/ inside
        diffusers_model(cfg, sd).save_pretrained(root / "transformer")
        return root
    raise ValueError(layout)


LAYOUTS = ["safetensors", "comfyui", "diffusion_model-prefix", "pth", "sharded", "diffusers"]
