"""LoRA files in every style change the DiT exactly as merging their delta does; effects switch cleanly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from test_dit import inputs, rel_err
from wan_fixtures import random_state_dict, tiny_config, to_diffusers_key

from cinecli.errors import WeightsError
from cinecli.models import load_dit
from cinecli.models.adapters import Effects, merge_into
from cinecli.weights.lora_file import read_lora

RANK, ALPHA = 4, 2.0
TARGETS = ["blocks.0.self_attn.q", "blocks.0.self_attn.o", "blocks.1.cross_attn.k", "blocks.1.cross_attn.v_img",
           "blocks.0.ffn.0", "blocks.1.ffn.2", "text_embedding.0", "time_projection.1", "head.head", "img_emb.proj.1"]


def known_delta(cfg, seed=0, targets=TARGETS):
    """{module: (down [r,in], up [out,r])} with delta = ALPHA/RANK · up @ down."""
    g = torch.Generator().manual_seed(seed)
    shapes = {k[:-len(".weight")]: v.shape for k, v in random_state_dict(cfg).items() if k.endswith(".weight")}
    return {m: (torch.randn(RANK, shapes[m][1], generator=g) * 0.3, torch.randn(shapes[m][0], RANK, generator=g) * 0.3)
            for m in targets}


def write_style(style: str, pairs: dict, path) -> None:
    sd = {}
    scale = ALPHA / RANK
    for m, (down, up) in pairs.items():
        if style == "original":
            sd |= {f"diffusion_model.{m}.lora_down.weight": down, f"diffusion_model.{m}.lora_up.weight": up,
                   f"diffusion_model.{m}.alpha": torch.tensor(ALPHA)}
        elif style == "original-peft":  # no alpha stored: the scale lives in B
            sd |= {f"diffusion_model.{m}.lora_A.weight": down, f"diffusion_model.{m}.lora_B.weight": up * scale}
        elif style == "kohya":
            flat = "lora_unet_" + m.replace(".", "_")
            sd |= {f"{flat}.lora_down.weight": down, f"{flat}.lora_up.weight": up, f"{flat}.alpha": torch.tensor(ALPHA)}
        elif style == "diffusers":
            name = "transformer." + to_diffusers_key(m + ".weight")[: -len(".weight")]
            sd |= {f"{name}.lora_A.weight": down, f"{name}.lora_B.weight": up * scale}
        elif style == "diff":
            sd[f"diffusion_model.{m}.diff"] = scale * up @ down
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


def reference(cfg, base_sd, pairs, extra=None):
    sd = {k: v.clone() for k, v in base_sd.items()}
    for m, (down, up) in pairs.items():
        sd[f"{m}.weight"] += ALPHA / RANK * up @ down
    for name, delta in (extra or {}).items():
        sd[name] += delta
    return load_dit(sd, dtype="fp32")


@pytest.mark.parametrize("style", ["original", "original-peft", "kohya", "diffusers", "diff"])
def test_every_style_equals_merging_the_delta(style, tmp_path):
    cfg = tiny_config("i2v")
    base_sd = random_state_dict(cfg)
    pairs = known_delta(cfg)
    write_style(style, pairs, tmp_path / "lora.safetensors")
    lora = read_lora(tmp_path / "lora.safetensors")
    assert lora.format == style and len(lora.targets()) == len(TARGETS)
    args = inputs(cfg)
    with torch.no_grad():
        expected = reference(cfg, base_sd, pairs)(*args)
        base_out = load_dit(base_sd, dtype="fp32")(*args)
        merged = load_dit(base_sd, dtype="fp32")
        merge_into(merged, tmp_path / "lora.safetensors")
        unmerged = load_dit(base_sd, dtype="fp32")
        effects = Effects(unmerged)
        effects.load("fx", tmp_path / "lora.safetensors")
        effects.use("fx")
        assert rel_err(base_out, expected) > 1e-3  # the delta matters
        assert rel_err(merged(*args), expected) <= 1e-5
        assert rel_err(unmerged(*args), expected) <= 1e-5


def test_full_deltas_bias_and_modulation(tmp_path):
    cfg = tiny_config("i2v")
    base_sd = random_state_dict(cfg)
    g = torch.Generator().manual_seed(5)
    extra = {"blocks.0.self_attn.q.bias": torch.randn(cfg.dim, generator=g) * 0.1,
             "blocks.1.modulation": torch.randn(1, 6, cfg.dim, generator=g) * 0.1,
             "blocks.0.norm3.weight": torch.randn(cfg.dim, generator=g) * 0.1,
             "blocks.0.self_attn.norm_q.weight": torch.randn(cfg.dim, generator=g) * 0.1}
    save_file({"diffusion_model.blocks.0.self_attn.q.diff_b": extra["blocks.0.self_attn.q.bias"],
               "diffusion_model.blocks.1.diff_m": extra["blocks.1.modulation"],
               "diffusion_model.blocks.0.norm3.diff": extra["blocks.0.norm3.weight"],
               "diffusion_model.blocks.0.self_attn.norm_q.diff": extra["blocks.0.self_attn.norm_q.weight"]}, str(tmp_path / "d.safetensors"))
    args = inputs(cfg)
    with torch.no_grad():
        expected = reference(cfg, base_sd, {}, extra)(*args)
        model = load_dit(base_sd, dtype="fp32")
        effects = Effects(model)
        effects.load("d", tmp_path / "d.safetensors")
        effects.use("d")
        assert rel_err(model(*args), expected) <= 1e-5
        effects.use(None)
        assert torch.equal(model(*args), load_dit(base_sd, dtype="fp32")(*args))


def test_switching_a_b_a_equals_a_alone_and_restores_the_backbone(tmp_path):
    cfg = tiny_config("i2v")
    base_sd = random_state_dict(cfg)
    write_style("original", known_delta(cfg, seed=1), tmp_path / "a.safetensors")
    write_style("diff", known_delta(cfg, seed=2, targets=TARGETS[:4]), tmp_path / "b.safetensors")
    args = inputs(cfg)
    with torch.no_grad():
        alone = load_dit(base_sd, dtype="fp32")
        only_a = Effects(alone)
        only_a.load("a", tmp_path / "a.safetensors")
        only_a.use("a")
        out_a = alone(*args)

        model = load_dit(base_sd, dtype="fp32")
        effects = Effects(model)
        effects.load("a", tmp_path / "a.safetensors")
        effects.load("b", tmp_path / "b.safetensors", strength=0.7)
        for name in ("a", "b", "a"):
            effects.use(name)
            out = model(*args)
        assert torch.equal(out, out_a)
        effects.use("b")
        effects.use(None)
        assert torch.equal(model(*args), load_dit(base_sd, dtype="fp32")(*args))
        weights = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}
        assert all(torch.equal(weights[k], v) for k, v in load_dit(base_sd, dtype="fp32").state_dict().items())


def test_misfit_loras_are_refused(tmp_path):
    big = tiny_config("i2v", dim=512, num_heads=4)
    write_style("original", known_delta(big, targets=TARGETS[:3]), tmp_path / "big.safetensors")
    model = load_dit(random_state_dict(tiny_config("i2v")), dtype="fp32")
    with pytest.raises(WeightsError, match="another shape"):
        Effects(model).load("big", tmp_path / "big.safetensors")
    i2v = tiny_config("i2v")
    write_style("kohya", known_delta(i2v, targets=["blocks.0.cross_attn.k_img", "blocks.0.self_attn.q"]), tmp_path / "i2v.safetensors")
    t2v_model = load_dit(random_state_dict(tiny_config("t2v")), dtype="fp32")
    with pytest.raises(WeightsError, match="do not exist"):
        merge_into(t2v_model, tmp_path / "i2v.safetensors")
    save_file({"some.random.tensor": torch.zeros(2)}, str(tmp_path / "junk.safetensors"))
    with pytest.raises(WeightsError, match="no LoRA tensors"):
        read_lora(tmp_path / "junk.safetensors")
