"""umT5 text encoder and CLIP image tower: key conversion, loaders, tokenizer, safety.

The proof of the Wan→transformers key conversion is not circular: the references below are written here, from
the semantics in wan2.1-reference.md §E (not from transformers and not from cinecli), and read the weights in
the original Wan key layout. Random tiny weights; everything fp32 on the CPU.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from cinecli.core.errors import WeightsError
from cinecli.models.image_encoder import (
    IMAGE_ENCODER_CONFIGS,
    ImageEncoderConfig,
    convert_to_tower,
    image_encoder_key_map,
    infer_image_config,
    load_image_encoder,
)
from cinecli.models.text_encoder import (
    TEXT_ENCODER_CONFIGS,
    TextEncoderConfig,
    clean_prompt,
    infer_text_config,
    load_text_encoder,
    text_encoder_key_map,
)

TOL = 1e-4  # max |Δ| ≤ TOL · max |reference|, fp32
T5 = TEXT_ENCODER_CONFIGS["tiny"]
VIT = IMAGE_ENCODER_CONFIGS["tiny"]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


# --- independent reference: Wan's T5 encoder (§E.1) -------------------------------------------------------------


def wan_t5_state(cfg: TextEncoderConfig, seed: int = 0, shape_only: bool = False) -> dict[str, torch.Tensor]:
    """Random weights in the original Wan key layout (``models_t5_umt5-xxl-enc-bf16.pth``)."""
    g = torch.Generator().manual_seed(seed)
    inner = cfg.num_heads * cfg.head_dim

    def w(*shape, std=1.0, mean=0.0):
        if shape_only:
            return torch.empty(shape, device="meta")
        return mean + std * torch.randn(*shape, generator=g)

    sd = {"token_embedding.weight": w(cfg.vocab_size, cfg.dim)}
    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        sd[p + "norm1.weight"] = w(cfg.dim, std=0.1, mean=1.0)
        for n in "qkv":
            sd[p + f"attn.{n}.weight"] = w(inner, cfg.dim, std=cfg.dim**-0.5)
        sd[p + "attn.o.weight"] = w(cfg.dim, inner, std=inner**-0.5)
        sd[p + "norm2.weight"] = w(cfg.dim, std=0.1, mean=1.0)
        sd[p + "ffn.gate.0.weight"] = w(cfg.dim_ffn, cfg.dim, std=cfg.dim**-0.5)
        sd[p + "ffn.fc1.weight"] = w(cfg.dim_ffn, cfg.dim, std=cfg.dim**-0.5)
        sd[p + "ffn.fc2.weight"] = w(cfg.dim, cfg.dim_ffn, std=cfg.dim_ffn**-0.5)
        sd[p + "pos_embedding.embedding.weight"] = w(cfg.num_buckets, cfg.num_heads)
    sd["norm.weight"] = w(cfg.dim, std=0.1, mean=1.0)
    return sd


def t5_bucket(rel: int, num_buckets: int = 32, max_dist: int = 128) -> int:
    """Bidirectional bucket of rel = key - query: half the buckets per direction (upper half: key after query),
    exact below max_exact, log-spaced up to max_dist, clipped to the last bucket of the half."""
    half = num_buckets // 2
    base = half if rel > 0 else 0
    r = abs(rel)
    max_exact = half // 2
    if r < max_exact:
        return base + r
    return base + min(max_exact + int(math.log(r / max_exact) / math.log(max_dist / max_exact) * (half - max_exact)),
                      half - 1)


def ref_t5(sd: dict, ids: torch.Tensor, mask: torch.Tensor, num_heads: int, eps: float = 1e-6) -> torch.Tensor:
    """ids, mask [B, L] → [B, L, dim]: RMS pre-norm, unscaled attention + per-layer bias, gated-GELU FFN."""
    B, L = ids.shape

    def rms(x, w):
        return w * (x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps))

    rel = [[t5_bucket(j - i) for j in range(L)] for i in range(L)]  # [Lq, Lk]
    buckets = torch.tensor(rel)
    layers = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    x = sd["token_embedding.weight"][ids]  # [B, L, dim]
    for i in range(layers):
        p = f"blocks.{i}."
        h = rms(x, sd[p + "norm1.weight"])
        q, k, v = ((h @ sd[p + f"attn.{n}.weight"].T).view(B, L, num_heads, -1).transpose(1, 2) for n in "qkv")
        bias = sd[p + "pos_embedding.embedding.weight"][buckets].permute(2, 0, 1)  # [H, Lq, Lk]
        logits = q @ k.transpose(-1, -2) + bias  # no 1/sqrt(d)
        logits = logits.masked_fill(mask[:, None, None, :] == 0, torch.finfo(logits.dtype).min)
        out = (logits.float().softmax(-1) @ v).transpose(1, 2).reshape(B, L, -1)
        x = x + out @ sd[p + "attn.o.weight"].T
        h = rms(x, sd[p + "norm2.weight"])
        gated = (h @ sd[p + "ffn.fc1.weight"].T) * F.gelu(h @ sd[p + "ffn.gate.0.weight"].T, approximate="tanh")
        x = x + gated @ sd[p + "ffn.fc2.weight"].T
    return rms(x, sd["norm.weight"])


def padded_batch(lengths: list[int], total: int, vocab: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids (pad 0, EOS 1 last) and mask, as the tokenizer makes them."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(len(lengths), total, dtype=torch.long)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for b, n in enumerate(lengths):
        ids[b, : n - 1] = torch.randint(2, vocab, (n - 1,), generator=g)
        ids[b, n - 1] = 1
        mask[b, :n] = 1
    return ids, mask


# --- independent reference: Wan's CLIP visual tower (§E.2) ------------------------------------------------------


def wan_clip_state(cfg: ImageEncoderConfig, seed: int = 0, shape_only: bool = False) -> dict[str, torch.Tensor]:
    """Random weights in the Wan layout (``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth``), text tower
    and logit scale included (they must be left out)."""
    g = torch.Generator().manual_seed(seed)
    d, grid = cfg.dim, cfg.image_size // cfg.patch_size

    def w(*shape, std=0.1, mean=0.0):
        if shape_only:
            return torch.empty(shape, device="meta")
        return mean + std * torch.randn(*shape, generator=g)

    sd = {
        "visual.patch_embedding.weight": w(d, cfg.in_channels, cfg.patch_size, cfg.patch_size),
        "visual.cls_embedding": w(1, 1, d, std=0.5),
        "visual.pos_embedding": w(1, grid * grid + 1, d, std=0.5),
        "visual.pre_norm.weight": w(d, mean=1.0), "visual.pre_norm.bias": w(d),
        "visual.post_norm.weight": w(d, mean=1.0), "visual.post_norm.bias": w(d),
        "visual.head": w(d, 16),
        "textual.token_embedding.weight": w(10, 8), "textual.blocks.0.attn.q.weight": w(8, 8), "log_scale": w(1),
    }
    for i in range(cfg.num_layers):
        p = f"visual.transformer.{i}."
        sd |= {
            p + "norm1.weight": w(d, mean=1.0), p + "norm1.bias": w(d),
            p + "attn.to_qkv.weight": w(3 * d, d, std=d**-0.5), p + "attn.to_qkv.bias": w(3 * d),
            p + "attn.proj.weight": w(d, d, std=d**-0.5), p + "attn.proj.bias": w(d),
            p + "norm2.weight": w(d, mean=1.0), p + "norm2.bias": w(d),
            p + "mlp.0.weight": w(cfg.dim_mlp, d, std=d**-0.5), p + "mlp.0.bias": w(cfg.dim_mlp),
            p + "mlp.2.weight": w(d, cfg.dim_mlp, std=cfg.dim_mlp**-0.5), p + "mlp.2.bias": w(d),
        }
    return sd


def ref_clip(sd: dict, images: torch.Tensor, cfg: ImageEncoderConfig) -> torch.Tensor:
    """images [B, 3, H, W] in [-1, 1] → tokens after block N-1 [B, T, dim] (no post-norm, no head)."""
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(1, 3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(1, 3, 1, 1)
    x = F.interpolate(images, size=(cfg.image_size,) * 2, mode="bicubic", align_corners=False)  # squash, no crop
    x = ((x + 1) / 2 - mean) / std
    x = F.conv2d(x, sd["visual.patch_embedding.weight"], stride=cfg.patch_size)  # [B, dim, g, g], no bias
    x = x.flatten(2).transpose(1, 2)  # [B, g*g, dim]
    B, d, H = x.shape[0], cfg.dim, cfg.num_heads
    x = torch.cat([sd["visual.cls_embedding"].expand(B, -1, -1), x], 1) + sd["visual.pos_embedding"]

    def ln(x, name):
        return F.layer_norm(x, (d,), sd[name + ".weight"], sd[name + ".bias"], eps=cfg.eps)

    x = ln(x, "visual.pre_norm")
    T = x.shape[1]
    for i in range(cfg.num_layers - 1):  # the last block is not used
        p = f"visual.transformer.{i}."
        qkv = F.linear(ln(x, p + "norm1"), sd[p + "attn.to_qkv.weight"], sd[p + "attn.to_qkv.bias"])
        q, k, v = qkv.view(B, T, 3, H, d // H).permute(2, 0, 3, 1, 4)  # 3 × [B, H, T, hd]
        a = ((q @ k.transpose(-1, -2)) / math.sqrt(d // H)).softmax(-1) @ v
        x = x + F.linear(a.transpose(1, 2).reshape(B, T, d), sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        h = F.gelu(F.linear(ln(x, p + "norm2"), sd[p + "mlp.0.weight"], sd[p + "mlp.0.bias"]))  # exact GELU
        x = x + F.linear(h, sd[p + "mlp.2.weight"], sd[p + "mlp.2.bias"])
    return x


def to_open_clip(sd: dict) -> dict:
    """Wan visual keys → open_clip's (an independent table, for the open_clip layout)."""
    table = [("patch_embedding", "conv1"), ("pre_norm", "ln_pre"), ("post_norm", "ln_post"),
             ("transformer.", "transformer.resblocks."), ("norm1", "ln_1"), ("norm2", "ln_2"), ("attn.to_qkv.weight", "attn.in_proj_weight"),
             ("attn.to_qkv.bias", "attn.in_proj_bias"), ("attn.proj", "attn.out_proj"), ("mlp.0", "mlp.c_fc"),
             ("mlp.2", "mlp.c_proj")]
    out = {"transformer.resblocks.0.attn.in_proj_weight": torch.zeros(3, 1), "ln_final.weight": torch.zeros(2)}
    for k, v in sd.items():
        if not k.startswith("visual."):
            continue
        if k == "visual.cls_embedding":
            out["visual.class_embedding"] = v.reshape(-1)
        elif k == "visual.pos_embedding":
            out["visual.positional_embedding"] = v[0]
        elif k == "visual.head":
            out["visual.proj"] = v
        else:
            for a, b in table:
                k = k.replace(a, b)
            out[k] = v
    return out


def save(sd: dict, path: Path) -> Path:
    if path.suffix == ".safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        torch.save(sd, path)
    return path


# --- umT5 ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_t5_wan_layout_matches_reference(suffix, tmp_path):
    sd = wan_t5_state(T5)
    enc = load_text_encoder(save(sd, tmp_path / f"models_t5_umt5-xxl-enc-bf16{suffix}"), dtype="fp32")
    assert enc.config == T5  # inferred from shapes, matched to the named config
    ids, mask = padded_batch([150, 37], total=160, vocab=T5.vocab_size)  # distances past max_dist=128: clipped buckets
    got, want = enc.encode_ids(ids, mask), ref_t5(sd, ids, mask, T5.num_heads)
    err = rel_err(got, want)
    print(f"umT5 {suffix}: max|Δ|/max|ref| = {err:.2e}")
    assert got.shape == (2, 160, T5.dim) and err <= TOL


def test_t5_transformers_folder_sharded_and_pipeline_root(tmp_path):
    from transformers import UMT5EncoderModel

    torch.manual_seed(0)
    hf = UMT5EncoderModel(T5.to_hf()).eval()
    hf.save_pretrained(tmp_path / "text_encoder", max_shard_size="40KB")  # sharded, with an index json
    assert (tmp_path / "text_encoder" / "model.safetensors.index.json").is_file()
    make_tokenizer(tmp_path / "tokenizer")
    enc = load_text_encoder(tmp_path, dtype="fp32")  # diffusers pipeline root: text_encoder/ + tokenizer/
    assert enc.tokenizer is not None and enc.model.encoder.embed_tokens is enc.model.shared
    ids, mask = padded_batch([20, 9], total=24, vocab=T5.vocab_size)
    with torch.no_grad():
        want = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    assert rel_err(enc.encode_ids(ids, mask), want) <= 1e-6

    # The tied embedding stored under its other name only, behind a prefix, in a state dict.
    sd = {"te." + k.replace("shared.weight", "encoder.embed_tokens.weight"): v for k, v in hf.state_dict().items()
          if k != "encoder.embed_tokens.weight"}
    assert rel_err(load_text_encoder(sd, dtype="fp32").encode_ids(ids, mask), want) <= 1e-6


def test_t5_dtypes():
    sd = wan_t5_state(T5)
    half = load_text_encoder(sd, dtype="fp16")
    params = dict(half.model.named_parameters())
    assert params["encoder.block.0.layer.1.DenseReluDense.wo.weight"].dtype == torch.float32  # overflow guard
    assert params["encoder.block.0.layer.0.SelfAttention.q.weight"].dtype == torch.float16
    bf = load_text_encoder(sd, dtype="bf16")
    assert {p.dtype for p in bf.model.parameters()} == {torch.bfloat16}
    ids, mask = padded_batch([12, 5], total=16, vocab=T5.vocab_size)
    out = bf.encode_ids(ids, mask)
    assert out.dtype == torch.bfloat16 and rel_err(out, ref_t5(sd, ids, mask, T5.num_heads)) < 0.05


def make_tokenizer(folder: Path) -> None:
    """A tiny word-level tokenizer with T5's conventions (pad 0, EOS 1 appended), saved like a real one."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2, "a": 3, "cat": 4, "dog": 5, "runs": 6, "&": 7}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(str(folder))


def test_tokenizer_trimmed_rows_equal_padded_run(tmp_path):
    sd = wan_t5_state(T5)
    path = save(sd, tmp_path / "models_t5_umt5-xxl-enc-bf16.pth")
    make_tokenizer(tmp_path / "google" / "umt5-xxl")  # where the Wan repo keeps it: found without being named
    enc = load_text_encoder(path, dtype="fp32")
    out = enc.encode(["a cat", "  a dog\n runs "])
    assert [tuple(o.shape) for o in out] == [(3, T5.dim), (4, T5.dim)]  # real tokens + EOS
    enc.tokenizer.padding_side = "left"  # a tokenizer saved with left padding must not shift the real rows
    ids, mask = enc.tokenize(["a cat", "a dog runs"])
    assert ids.shape == (2, 512) and ids[0, :3].tolist() == [3, 4, 1] and ids[1, :4].tolist() == [3, 5, 6, 1]
    full = enc.encode_ids(ids, mask)  # the reference's way: all 512 positions
    for o, row, n in zip(out, full, (3, 4)):
        assert rel_err(o, row[:n]) <= 1e-5
    assert rel_err(out[1], ref_t5(sd, ids, mask, T5.num_heads)[1, :4]) <= TOL
    assert all(torch.equal(a, b) for a, b in zip(enc.encode(["a cat", "a dog runs"], full_length=True),
                                                 (full[0, :3], full[1, :4])))
    named = load_text_encoder(path, tokenizer=tmp_path / "google" / "umt5-xxl")  # a tokenizer folder given
    assert [tuple(o.shape) for o in named.encode("a cat")] == [(3, T5.dim)]


def test_clean_prompt():
    assert clean_prompt("  a &amp;amp;\t cat \n\n runs ") == "a & cat runs"


def test_t5_without_tokenizer_explains(tmp_path):
    enc = load_text_encoder(save(wan_t5_state(T5), tmp_path / "enc.safetensors"))
    with pytest.raises(WeightsError, match="tokenizer"):
        enc.encode(["a cat"])


def test_full_size_t5_conversion_and_config():
    """umt5-xxl at full size, on meta tensors: Wan keys map onto exactly the transformers model's tensors."""
    from transformers import UMT5EncoderModel

    cfg = TEXT_ENCODER_CONFIGS["umt5-xxl"]
    sd = wan_t5_state(cfg, shape_only=True)
    assert sd["blocks.0.pos_embedding.embedding.weight"].shape == (32, 64)
    names = text_encoder_key_map(list(sd))
    shapes = {names[k]: tuple(v.shape) for k, v in sd.items()}
    assert infer_text_config(shapes) == cfg
    hf = cfg.to_hf()
    assert (hf.d_model, hf.d_kv, hf.d_ff, hf.num_heads, hf.num_layers) == (4096, 64, 10240, 64, 24)
    assert hf.is_gated_act and hf.dense_act_fn == "gelu_new" and hf.layer_norm_epsilon == 1e-6
    assert (hf.relative_attention_num_buckets, hf.relative_attention_max_distance, hf.vocab_size) == (32, 128, 256384)
    with torch.device("meta"):
        model = UMT5EncoderModel(hf)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items() if k != "encoder.embed_tokens.weight"}
    assert shapes == expected


# --- CLIP ------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["wan.pth", "wan.safetensors", "open_clip.bin"])
def test_clip_layouts_match_reference(layout, tmp_path):
    sd = wan_clip_state(VIT)
    name, suffix = layout.split(".")
    src = to_open_clip(sd) if name == "open_clip" else sd
    enc = load_image_encoder(save(src, tmp_path / f"weights.{suffix}"), dtype="fp32")
    assert enc.config == VIT and len(enc.tower.encoder.layers) == VIT.num_layers - 1  # last block not built
    images = torch.rand(2, 3, 45, 61, generator=torch.Generator().manual_seed(2)) * 2 - 1  # not square, not 28
    got, want = enc.encode(images), ref_clip(sd, images, VIT)
    err = rel_err(got, want)
    print(f"CLIP {layout}: max|Δ|/max|ref| = {err:.2e}")
    assert got.shape == (2, VIT.num_tokens, VIT.dim) and err <= TOL


@pytest.mark.parametrize("with_projection", [True, False])
def test_clip_transformers_folder(with_projection, tmp_path):
    from transformers import CLIPVisionModel, CLIPVisionModelWithProjection

    hf_cfg = VIT.to_hf()
    hf_cfg.num_hidden_layers = VIT.num_layers  # a complete checkpoint, all blocks
    torch.manual_seed(0)
    hf = (CLIPVisionModelWithProjection if with_projection else CLIPVisionModel)(hf_cfg).eval()
    folder = tmp_path / "image_encoder"
    hf.save_pretrained(folder)
    if with_projection:  # ComfyUI clip_vision_h.safetensors: vision_model.* + visual_projection, no config.json
        (folder / "config.json").unlink()
    enc = load_image_encoder(tmp_path, dtype="fp32")  # diffusers pipeline root
    assert enc.config == VIT
    images = torch.rand(1, 3, 20, 33) * 2 - 1
    with torch.no_grad():
        want = hf(pixel_values=enc.preprocess(images), output_hidden_states=True).hidden_states[-2]
    assert rel_err(enc.encode(images), want) <= 1e-6


def test_full_size_clip_conversion_and_config():
    """ViT-H/14 at full size, on meta tensors: Wan keys map onto exactly the 31-block transformers tower."""
    from transformers import CLIPVisionModel

    cfg = IMAGE_ENCODER_CONFIGS["vit-h-14"]
    sd = wan_clip_state(cfg, shape_only=True)
    assert sd["visual.pos_embedding"].shape == (1, 257, 1280)
    names = image_encoder_key_map(list(sd))
    shapes = {n: tuple(t.shape) for n, t in convert_to_tower((names[k], v) for k, v in sd.items() if k in names)}
    assert infer_image_config(shapes) == cfg
    hf = cfg.to_hf()
    assert (hf.hidden_size, hf.num_hidden_layers, hf.num_attention_heads, hf.intermediate_size) == (1280, 31, 16, 5120)
    assert (hf.patch_size, hf.image_size, hf.hidden_act, hf.layer_norm_eps) == (14, 224, "gelu", 1e-5)
    with torch.device("meta"):
        model = CLIPVisionModel(hf)
    tower = getattr(model, "vision_model", model)
    expected = {k: tuple(v.shape) for k, v in tower.state_dict().items()}
    assert {k: v for k, v in shapes.items() if not k.startswith("encoder.layers.31.")} == expected


# --- safety and mismatches -------------------------------------------------------------------------------------------


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("loader", [load_text_encoder, load_image_encoder])
def test_malicious_pickle_is_refused(loader, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "models_t5_umt5-xxl-enc-bf16.pth"
    torch.save({"token_embedding.weight": torch.zeros(2, 2), "evil": _Payload(marker)}, path)
    with pytest.raises(WeightsError, match="refusing"):
        loader(path)
    assert not marker.exists()


def test_t5_mismatched_keys_are_named():
    sd = wan_t5_state(T5)
    del sd["blocks.1.ffn.fc2.weight"]
    sd["blocks.0.attn.extra.weight"] = torch.zeros(2)
    with pytest.raises(WeightsError) as info:
        load_text_encoder(sd)
    msg = str(info.value)
    assert "\n" not in msg and "1 missing" in msg and "encoder.block.1.layer.1.DenseReluDense.wo.weight" in msg
    assert "1 unexpected" in msg and "blocks.0.attn.extra.weight" in msg


def test_clip_wrong_shape_and_foreign_file():
    sd = wan_clip_state(VIT)
    sd["visual.transformer.0.mlp.0.bias"] = torch.zeros(7)
    with pytest.raises(WeightsError, match="wrong shape.*encoder.layers.0.mlp.fc1.bias"):
        load_image_encoder(sd)
    with pytest.raises(WeightsError, match="no CLIP vision tower"):
        load_image_encoder(wan_t5_state(T5))
    with pytest.raises(WeightsError, match="no umT5 encoder"):
        load_text_encoder({"visual.cls_embedding": torch.zeros(1)})


# --- head count: config first, assumptions said ------------------------------------------------------------------
def other_tower(dim=48, heads=2, layers=3):
    """A CLIP tower matching no named config (width 48: dim/64 would give 1 head, the truth is 2)."""
    from dataclasses import replace

    return replace(VIT, dim=dim, num_heads=heads, dim_mlp=2 * dim, num_layers=layers)


@pytest.mark.parametrize("config_file", ["config.json", "open_clip_config.json"])
def test_clip_head_count_comes_from_a_config_when_shapes_cannot_tell(config_file, tmp_path):
    import json

    cfg = other_tower()
    sd = wan_clip_state(cfg)
    path = save(sd, tmp_path / "clip.pth")
    config = ({"num_attention_heads": 2} if config_file == "config.json"  # partial: only what shapes cannot say
              else {"model_cfg": {"vision_cfg": {"width": 48, "head_width": 24, "layers": 3, "patch_size": 7}}})
    (tmp_path / config_file).write_text(json.dumps(config))
    enc = load_image_encoder(path, dtype="fp32")
    assert enc.config.num_heads == 2 and not enc.config.assumed
    images = torch.rand(1, 3, 30, 40, generator=torch.Generator().manual_seed(1)) * 2 - 1
    assert rel_err(enc.encode(images), ref_clip(sd, images, cfg)) <= TOL


def test_clip_head_count_guesses_are_said(tmp_path, caplog):
    # another depth of a known width: that tower's head count, said in a warning
    pruned = wan_clip_state(other_tower(dim=VIT.dim, heads=VIT.num_heads, layers=VIT.num_layers + 2))
    with caplog.at_level("WARNING", logger="cinecli"):
        enc = load_image_encoder(pruned, dtype="fp32")
    assert enc.config.num_heads == VIT.num_heads and "as tiny of the same width" in enc.config.assumed
    assert any("assumed 4 heads" in r.getMessage() for r in caplog.records)
    # ViT-H/14's width at another depth: 16 heads as ViT-H, not 1280/64 = 20
    vit_h = IMAGE_ENCODER_CONFIGS["vit-h-14"]
    shapes = {"embeddings.patch_embedding.weight": (1280, 3, 14, 14), "embeddings.position_embedding.weight": (257, 1280),
              **{f"encoder.layers.{i}.mlp.fc1.weight": (5120, 1280) for i in range(20)}}
    guessed = infer_image_config(shapes)
    assert guessed.num_heads == vit_h.num_heads and guessed.num_layers == 20 and "vit-h-14" in guessed.assumed
    # nothing to go by and the guess cannot even be built: the error says what was assumed
    odd = wan_clip_state(other_tower(dim=200, heads=5))
    with pytest.raises(WeightsError, match=r"width 200 does not split into 3 heads \(assumed 3 heads \(width 200 / 64"):
        load_image_encoder(odd, dtype="fp32")


def test_clip_with_16bit_weights_and_fp32_compute_matches_fp32_weights(tmp_path):
    """CPUs that emulate bf16: CLIP keeps its linear weights bf16 (memory-mapped) and multiplies in fp32."""
    from safetensors.torch import save_file

    from cinecli.models.image_encoder import load_image_encoder
    from cinecli.models.layers import Linear

    sd = {k: v.to(torch.bfloat16).contiguous() for k, v in wan_clip_state(VIT).items()}
    save_file(sd, tmp_path / "clip.safetensors")
    full = load_image_encoder(tmp_path / "clip.safetensors", dtype=torch.float32, config=VIT)
    lean = load_image_encoder(tmp_path / "clip.safetensors", dtype=torch.float32, config=VIT, weight_dtype=torch.bfloat16)
    linears = [m for m in lean.tower.modules() if isinstance(m, torch.nn.Linear)]
    assert linears and all(isinstance(m, Linear) and m.weight.dtype == torch.bfloat16 for m in linears)
    image = torch.rand(1, 3, 40, 48) * 2 - 1
    assert lean.dtype == torch.float32 and torch.allclose(lean.encode(image), full.encode(image), atol=1e-5, rtol=1e-5)
