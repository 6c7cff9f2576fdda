"""ComfyUI's encoder files load and match the same weights in the official Wan layout.

One random tiny model per encoder is written twice: in the official Wan layout (``models_t5_…pth``,
``models_clip_…pth``) and as ComfyUI ships it (``umt5_xxl_fp8_e4m3fn_scaled.safetensors``: transformers names,
float8 linear weights with a scalar ``scale_weight`` and a ``scaled_fp8`` marker; ``clip_vision_h.safetensors``:
fp16 ``vision_model.*`` keys with the projection). The ComfyUI key tables below are written here, independently of
cinecli's rename rules; the outputs are compared with each other and with the references of test_encoders.
"""

from __future__ import annotations

import torch
from safetensors.torch import save_file
from test_encoders import T5, VIT, padded_batch, ref_clip, ref_t5, rel_err, save, wan_clip_state, wan_t5_state

from cinecli.models.image_encoder import load_image_encoder
from cinecli.models.quant import QuantLinear
from cinecli.models.text_encoder import load_text_encoder

FP8 = torch.float8_e4m3fn


def wan_t5_to_comfy(name: str) -> str:
    """Wan T5 key → ComfyUI's (transformers-style) umT5 key."""
    if name == "token_embedding.weight":
        return "shared.weight"
    if name == "norm.weight":
        return "encoder.final_layer_norm.weight"
    _, i, rest = name.split(".", 2)
    table = {"norm1.weight": "layer.0.layer_norm.weight", "attn.q.weight": "layer.0.SelfAttention.q.weight",
             "attn.k.weight": "layer.0.SelfAttention.k.weight", "attn.v.weight": "layer.0.SelfAttention.v.weight",
             "attn.o.weight": "layer.0.SelfAttention.o.weight",
             "pos_embedding.embedding.weight": "layer.0.SelfAttention.relative_attention_bias.weight",
             "norm2.weight": "layer.1.layer_norm.weight", "ffn.gate.0.weight": "layer.1.DenseReluDense.wi_0.weight",
             "ffn.fc1.weight": "layer.1.DenseReluDense.wi_1.weight", "ffn.fc2.weight": "layer.1.DenseReluDense.wo.weight"}
    return f"encoder.block.{i}.{table[rest]}"


def comfy_scaled_fp8(sd: dict) -> tuple[dict, dict]:
    """(ComfyUI fp8_scaled file contents, the Wan-layout weights it stands for).

    Linear weights: W ≈ fp8 · s with one fp32 scalar s = amax/448 per layer, as ComfyUI's files store them; the
    embedding, norms and position biases stay 16-bit (fp16 here).
    """
    comfy, wan = {"scaled_fp8": torch.empty(0, dtype=FP8)}, {}
    for k, v in sd.items():
        key = wan_t5_to_comfy(k)
        if v.ndim == 2 and (".attn." in k or ".ffn." in k):
            scale = v.abs().max() / 448.0
            q = (v / scale).to(FP8)
            comfy[key], comfy[key.replace(".weight", ".scale_weight")] = q, scale.reshape(())
            wan[k] = q.float() * scale  # exactly what the file means
        else:
            comfy[key] = v.half()
            wan[k] = v.half().float()
    return comfy, wan


def test_comfy_umt5_fp8_scaled_matches_official_layout(tmp_path):
    comfy, wan = comfy_scaled_fp8(wan_t5_state(T5, seed=5))
    folder = tmp_path / "models" / "text_encoders"
    folder.mkdir(parents=True)
    save_file(comfy, folder / "umt5_xxl_fp8_e4m3fn_scaled.safetensors")
    official = load_text_encoder(save(wan, tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"), dtype="fp32")
    enc = load_text_encoder(folder / "umt5_xxl_fp8_e4m3fn_scaled.safetensors", dtype="fp32")
    assert enc.config == T5
    attn = enc.model.encoder.block[0].layer[0].SelfAttention
    assert isinstance(attn.q, QuantLinear) and attn.q.weight.dtype == FP8  # stays float8 in memory
    ffn = enc.model.encoder.block[1].layer[1].DenseReluDense
    assert isinstance(ffn.wi_0, QuantLinear) and ffn.wo.weight.dtype == torch.float32  # wo dequantized
    ids, mask = padded_batch([40, 13], total=48, vocab=T5.vocab_size)
    got, want = enc.encode_ids(ids, mask), official.encode_ids(ids, mask)
    err, err_ref = rel_err(got, want), rel_err(got, ref_t5(wan, ids, mask, T5.num_heads))
    print(f"umT5 fp8_scaled vs official: {err:.2e}, vs reference: {err_ref:.2e}")
    assert err <= 1e-5 and err_ref <= 1e-4

    half = load_text_encoder(folder, dtype="fp16")  # a ComfyUI text_encoders folder, found by its file
    assert half.model.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
    assert rel_err(half.encode_ids(ids, mask), want) < 0.02


def wan_clip_to_comfy(sd: dict) -> dict:
    """Wan CLIP visual keys → ComfyUI ``clip_vision_h.safetensors`` (transformers CLIPVisionModelWithProjection), fp16."""
    out = {"vision_model.embeddings.position_ids": torch.arange(sd["visual.pos_embedding"].shape[1])[None]}
    for k, v in sd.items():
        if not k.startswith("visual."):
            continue  # the text tower is not in clip_vision files
        k = k.removeprefix("visual.")
        if k == "cls_embedding":
            out["vision_model.embeddings.class_embedding"] = v.reshape(-1)
        elif k == "pos_embedding":
            out["vision_model.embeddings.position_embedding.weight"] = v[0]
        elif k == "patch_embedding.weight":
            out["vision_model.embeddings.patch_embedding.weight"] = v
        elif k.startswith(("pre_norm", "post_norm")):
            name = "pre_layrnorm" if k.startswith("pre") else "post_layernorm"
            out[f"vision_model.{name}.{k.split('.')[-1]}"] = v
        elif k == "head":
            out["visual_projection.weight"] = v.T
        else:
            _, i, rest = k.split(".", 2)
            p = f"vision_model.encoder.layers.{i}."
            if rest.startswith("attn.to_qkv."):
                for part, chunk in zip("qkv", v.chunk(3, dim=0)):
                    out[p + f"self_attn.{part}_proj.{rest.split('.')[-1]}"] = chunk
            else:
                table = {"norm1": "layer_norm1", "norm2": "layer_norm2", "attn.proj": "self_attn.out_proj",
                         "mlp.0": "mlp.fc1", "mlp.2": "mlp.fc2"}
                mod, leaf = rest.rsplit(".", 1)
                out[p + f"{table[mod]}.{leaf}"] = v
    return {k: v.half().contiguous() if v.is_floating_point() else v for k, v in out.items()}


def test_comfy_clip_vision_h_matches_official_layout(tmp_path):
    sd = {k: v.half().float() for k, v in wan_clip_state(VIT, seed=7).items()}  # what an fp16 file can hold
    folder = tmp_path / "models" / "clip_vision"
    folder.mkdir(parents=True)
    save_file(wan_clip_to_comfy(sd), folder / "clip_vision_h.safetensors")
    official = load_image_encoder(save(sd, tmp_path / "models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth"), dtype="fp32")
    enc = load_image_encoder(folder / "clip_vision_h.safetensors", dtype="fp32")
    assert enc.config == VIT
    images = torch.rand(2, 3, 40, 52, generator=torch.Generator().manual_seed(3)) * 2 - 1
    got = enc.encode(images)
    err, err_ref = rel_err(got, official.encode(images)), rel_err(got, ref_clip(sd, images, VIT))
    print(f"clip_vision_h vs official: {err:.2e}, vs reference: {err_ref:.2e}")
    assert err <= 1e-6 and err_ref <= 1e-4
    assert rel_err(load_image_encoder(folder, dtype="fp32").encode(images), got) == 0  # the folder finds the file
