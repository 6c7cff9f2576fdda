"""LoRA files in every style change the DiT exactly as merging their delta does; effects switch cleanly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from test_dit import inputs, rel_err
from wan_fixtures import random_state_dict, tiny_config, to_diffusers_key

from cinecli.core.errors import WeightsError
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


# --- DoRA and keys that do not load ----------------------------------------------------------------------------------
def dora_reference(base_sd, pairs, mags, strength):
    """peft's DoRA, written out: W ← m ⊙ (W + s·ΔW) / ‖W + s·ΔW‖ per output row."""
    sd = {k: v.clone() for k, v in base_sd.items()}
    for m, (down, up) in pairs.items():
        merged = sd[f"{m}.weight"] + strength * ALPHA / RANK * up @ down
        sd[f"{m}.weight"] = mags[m][:, None] * merged / merged.norm(dim=1, keepdim=True) if m in mags else merged
    return load_dit(sd, dtype="fp32")


@pytest.mark.parametrize("style,strength", [("original", 1.0), ("diffusers", 0.6)])
def test_dora_is_applied_merged_and_unmerged(style, strength, tmp_path):
    from safetensors.torch import load_file

    cfg = tiny_config("i2v")
    base_sd = random_state_dict(cfg)
    pairs = known_delta(cfg, seed=3, targets=TARGETS[:6])
    g = torch.Generator().manual_seed(4)
    mags = {m: base_sd[f"{m}.weight"].norm(dim=1) * (1 + 0.5 * torch.rand(base_sd[f"{m}.weight"].shape[0], generator=g))
            for m in list(pairs)[: 6 if style == "diffusers" else 3]}  # original: DoRA and plain modules in one file
    path = tmp_path / "dora.safetensors"
    write_style(style, pairs, path)
    sd = load_file(str(path))
    for m, mag in mags.items():  # LyCORIS/ComfyUI dora_scale [out, 1]; peft/diffusers lora_magnitude_vector [out]
        if style == "original":
            sd[f"diffusion_model.{m}.dora_scale"] = mag[:, None].contiguous()
        else:
            sd["transformer." + to_diffusers_key(m + ".weight")[: -len(".weight")] + ".lora_magnitude_vector"] = mag
    save_file(sd, str(path))
    assert read_lora(path).summary()["dora_modules"] == len(mags) and not read_lora(path).ignored
    args = inputs(cfg)
    with torch.no_grad():
        expected = dora_reference(base_sd, pairs, mags, strength)(*args)
        plain = reference(cfg, base_sd, {m: (d, u * strength) for m, (d, u) in pairs.items()})(*args)
        assert rel_err(plain, expected) > 1e-3  # the magnitudes matter
        merged = load_dit(base_sd, dtype="fp32")
        merge_into(merged, path, strength=strength)
        assert rel_err(merged(*args), expected) <= 1e-5
        model = load_dit(base_sd, dtype="fp32")
        effects = Effects(model)
        effects.load("d", path, strength=strength)
        effects.use("d")
        assert rel_err(model(*args), expected) <= 1e-5
        effects.use(None)
        assert torch.equal(model(*args), load_dit(base_sd, dtype="fp32")(*args))


def lycoris_extras(cfg, modules_loha, module_mid):
    """LoHa modules (hada_* + alpha) and one LoCon Tucker module (down/up/mid/alpha), kohya-named."""
    g = torch.Generator().manual_seed(8)
    shapes = {k[:-len(".weight")]: v.shape for k, v in random_state_dict(cfg).items() if k.endswith(".weight")}
    sd = {}
    for m in modules_loha:
        out, inp = shapes[m]
        flat = "lora_unet_" + m.replace(".", "_")
        sd |= {f"{flat}.hada_w1_a": torch.randn(out, 2, generator=g), f"{flat}.hada_w1_b": torch.randn(2, inp, generator=g),
               f"{flat}.hada_w2_a": torch.randn(out, 2, generator=g), f"{flat}.hada_w2_b": torch.randn(2, inp, generator=g),
               f"{flat}.alpha": torch.tensor(2.0)}
    out, inp = shapes[module_mid]
    flat = "lora_unet_" + module_mid.replace(".", "_")
    sd |= {f"{flat}.lora_down.weight": torch.randn(2, inp, generator=g), f"{flat}.lora_up.weight": torch.randn(out, 2, generator=g),
           f"{flat}.lora_mid.weight": torch.randn(2, 2, generator=g), f"{flat}.alpha": torch.tensor(2.0)}
    return sd


def test_keys_not_loaded_are_counted_on_every_load_and_mostly_unloaded_files_refused(tmp_path, caplog):
    from safetensors.torch import load_file

    cfg = tiny_config("i2v")
    base_sd = random_state_dict(cfg)
    pairs = known_delta(cfg, seed=6)
    path = tmp_path / "mixed.safetensors"
    write_style("original", pairs, path)  # 10 modules × (down, up, alpha) = 30 tensors
    extras = lycoris_extras(cfg, ["blocks.0.self_attn.k", "blocks.0.self_attn.v"], "blocks.1.self_attn.q")
    save_file({**load_file(str(path)), **extras}, str(path))  # + 10 LoHa + 4 lora_mid tensors
    args = inputs(cfg)
    with torch.no_grad(), caplog.at_level("WARNING", logger="cinecli"):
        merged = load_dit(base_sd, dtype="fp32")
        merge_into(merged, path)
        assert rel_err(merged(*args), reference(cfg, base_sd, pairs)(*args)) <= 1e-5  # the LoRA part is applied
        Effects(load_dit(base_sd, dtype="fp32")).load("fx", path)
    warnings = [r.getMessage() for r in caplog.records if "not loaded" in r.getMessage()]
    assert len(warnings) == 2  # every load says so
    assert "14 of 44 tensors not loaded" in warnings[0] and "LoHa 10" in warnings[0] and "lora_mid 4" in warnings[0]

    mostly = tmp_path / "loha.safetensors"
    write_style("original", known_delta(cfg, targets=TARGETS[:2]), mostly)  # 6 loadable tensors
    extras = lycoris_extras(cfg, ["blocks.0.self_attn.k", "blocks.0.self_attn.v", "blocks.1.self_attn.k"], "blocks.1.self_attn.q")
    save_file({**load_file(str(mostly)), **extras}, str(mostly))  # 19 of 25 ignored
    assert read_lora(mostly).summary()["ignored"] == {"LoHa": 15, "lora_mid": 4}  # inspect still reads it
    for load in (lambda: Effects(load_dit(base_sd, dtype="fp32")).load("x", mostly),
                 lambda: merge_into(load_dit(base_sd, dtype="fp32"), mostly)):
        with pytest.raises(WeightsError, match="19 of 25 tensors would be ignored") as info:
            load()
        assert "\n" not in str(info.value) and info.value.exit_code == 4
