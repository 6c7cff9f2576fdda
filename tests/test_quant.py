"""Weight-only quantization: formats, recipes, `cine quantize`, checkpoints from the wild, guards."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from test_dit import inputs, rel_err
from test_lora import ALPHA, RANK, known_delta, write_style
from typer.testing import CliRunner
from wan_fixtures import random_state_dict, tiny_config

from cinecli.cli.app import app
from cinecli.generate.selftest import sample_image, write_backbone
from cinecli.models import load_dit
from cinecli.models.quant import FP8, QuantLinear, dequantize, quantize
from cinecli.models.recipes import RECIPES, quantize_dit

TARGETS = {"fp8": 0.03, "int8": 0.01, "int4g64": 0.12}


def cine(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.mark.parametrize("fmt", list(TARGETS))
def test_round_trip_error_on_gaussian_weights(fmt, monkeypatch):
    w = torch.randn(1536, 1536, generator=torch.Generator().manual_seed(0))
    q, scale = quantize(w, fmt)
    back = dequantize(q, scale, fmt, torch.float32)
    err = ((w - back).pow(2).mean().sqrt() / w.pow(2).mean().sqrt()).item()
    print(f"{fmt}: relative RMS error {err:.4f}")
    assert err <= TARGETS[fmt]
    expected_bytes = {"fp8": w.numel(), "int8": w.numel(), "int4g64": w.numel() // 2}[fmt]
    assert q.numel() * q.element_size() == expected_bytes
    layer = QuantLinear.from_linear(torch.nn.Linear(1536, 1536), fmt)
    x = torch.randn(3, 1536)
    expected = F.linear(x, layer.dequantized(), layer.bias)
    assert torch.allclose(layer(x), expected, atol=1e-5)
    import cinecli.models.layers as layers

    monkeypatch.setattr(layers, "UPCAST_CHUNK_ELEMENTS", 100 * 1536)  # dequantize 100 rows at a time
    assert torch.allclose(layer(x), expected, atol=1e-5)


def test_int4_packing_is_exact_on_grid_values():
    q = torch.randint(-7, 8, (4, 128))
    w = q.float() * 0.5
    w[:, 0::64] = 3.5  # every group's absmax is 7 steps of 0.5: the grid is representable exactly
    packed, scale = quantize(w, "int4g64")
    assert packed.dtype == torch.uint8 and packed.shape == (4, 64)
    assert torch.equal(dequantize(packed, scale, "int4g64", torch.float32), w)


def test_recipes_choose_formats_and_keep_sensitive_layers():
    cfg = tiny_config("i2v")
    model = load_dit(random_state_dict(cfg), dtype="bf16")
    args = inputs(cfg)
    with torch.no_grad():
        ref = model(*args)
        layers = quantize_dit(model, RECIPES["hybrid"], measure=True)
        out = model(*args)
    fmt = {k: v["format"] for k, v in layers.items()}
    assert fmt["blocks.0.self_attn.q"] == "fp8" and fmt["blocks.1.cross_attn.v_img"] == "fp8"
    assert fmt["blocks.0.ffn.0"] == "int4g64" and fmt["text_embedding.0"] == "fp8" and fmt["time_projection.1"] == "fp8"
    for kept in ("head.head", "img_emb.proj.1", "patch_embedding"):
        assert kept not in fmt and not isinstance(model.get_submodule(kept), QuantLinear)
    assert model.blocks[0].modulation.dtype == torch.float32 and model.blocks[0].norm3.weight.dtype == torch.float32
    assert torch.isfinite(out).all()
    print(f"hybrid vs bf16 output: {rel_err(out, ref):.3e}")
    assert rel_err(out, ref) < 0.25
    compact = load_dit(random_state_dict(cfg), dtype="bf16")
    cfmt = {k: v["format"] for k, v in quantize_dit(compact, RECIPES["compact"]).items()}
    assert cfmt["blocks.0.cross_attn.k"] == "int4g64" and cfmt["blocks.0.self_attn.k"] == "fp8"


def test_cine_quantize_writes_a_self_describing_file(tmp_path):
    cfg = tiny_config("i2v")
    sd = random_state_dict(cfg)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}, str(tmp_path / "dit.safetensors"))
    out = tmp_path / "dit.hybrid.safetensors"
    r = cine("quantize", tmp_path / "dit.safetensors", "-o", out, "--recipe", "hybrid", "--override", "blocks.0.*=int8", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["per_layer"]["blocks.0.ffn.0"]["format"] == "int8" and doc["per_layer"]["blocks.1.ffn.0"]["format"] == "int4g64"
    assert doc["bytes_after"] < 0.6 * doc["bytes_before"] and doc["error_by_format"]["fp8"]["max_rel_rms"] < 0.05
    loaded = load_dit(out, dtype="bf16")
    assert loaded.quant_recipe == "hybrid" and loaded.blocks[1].ffn[0].weight.dtype == torch.uint8
    assert loaded.blocks[1].self_attn.q.weight.dtype == FP8 and loaded.blocks[0].self_attn.q.weight.dtype == torch.int8
    assert loaded.config == cfg
    expected = load_dit(tmp_path / "dit.safetensors", dtype="bf16")
    quantize_dit(expected, RECIPES["hybrid"].__class__("hybrid", RECIPES["hybrid"].rules, overrides={"blocks.0.*": "int8"}))
    args = inputs(cfg)
    with torch.no_grad():
        assert torch.equal(loaded(*args), expected(*args))
    again = cine("quantize", tmp_path / "dit.safetensors", "-o", out)
    assert again.exit_code == 6  # never overwritten without --overwrite
    assert cine("quantize", out, "-o", tmp_path / "twice.safetensors").exit_code == 2


def test_checkpoints_from_the_wild(tmp_path):
    cfg = tiny_config("i2v")
    sd = random_state_dict(cfg)
    linear = [k for k in sd if k.endswith(".weight") and sd[k].ndim == 2 and k.startswith("blocks.")]
    args = inputs(cfg)

    def expect(weights):
        with torch.no_grad():
            return load_dit({**sd, **weights}, dtype="fp32")(*args)

    # ComfyUI fp8_scaled: fp8 weights, a scalar scale_weight per layer, a scaled_fp8 marker, scale_input
    comfy, ref = {"model.diffusion_model." + k: v for k, v in sd.items()}, {}
    comfy["scaled_fp8"] = torch.zeros(2, dtype=FP8)
    for k in linear:
        s = sd[k].abs().max() / 448
        q = (sd[k] / s).to(FP8)
        comfy["model.diffusion_model." + k] = q
        comfy["model.diffusion_model." + k.replace(".weight", ".scale_weight")] = s.reshape(())
        comfy["model.diffusion_model." + k.replace(".weight", ".scale_input")] = torch.ones(())
        ref[k] = q.float() * s
    save_file(comfy, str(tmp_path / "comfy_scaled.safetensors"))
    # lightx2v int8: per-output-channel weight_scale [out, 1]
    lx, lref = dict(sd), {}
    for k in linear:
        s = sd[k].abs().amax(1, keepdim=True) / 127
        q = (sd[k] / s).round().clamp(-128, 127).to(torch.int8)
        lx[k], lx[k.replace(".weight", ".weight_scale")] = q, s
        lref[k] = q.float() * s
    save_file(lx, str(tmp_path / "lightx2v_int8.safetensors"))
    # plain ComfyUI fp8: a cast, no scales
    plain = {k: (v.to(FP8) if k in linear else v) for k, v in sd.items()}
    save_file(plain, str(tmp_path / "plain_fp8.safetensors"))
    for name, weights in (("comfy_scaled", ref), ("lightx2v_int8", lref), ("plain_fp8", {k: plain[k].float() for k in linear})):
        model = load_dit(tmp_path / f"{name}.safetensors", dtype="fp32")
        assert isinstance(model.blocks[0].self_attn.q, QuantLinear)
        with torch.no_grad():
            assert rel_err(model(*args), expect(weights)) <= 1e-5, name
    broken = dict(comfy)
    broken["model.diffusion_model.blocks.0.self_attn.q.scale_weight"] = torch.zeros(0)
    save_file(broken, str(tmp_path / "broken.safetensors"))
    with pytest.raises(Exception, match="empty"):
        load_dit(tmp_path / "broken.safetensors")


@pytest.fixture
def stack(tmp_path, env):
    """A private copy of the self-test stack: these tests write quantized and broken files beside it."""
    preset = write_backbone(tmp_path / "stack")
    photo = tmp_path / "p.png"
    sample_image().save(photo)
    return preset.parent, photo


def test_prequantized_backbone_with_effect_lora_end_to_end(stack, tmp_path):
    root, photo = stack
    q = cine("quantize", root / "dit", "-o", root / "dit.hybrid.safetensors", "--recipe", "hybrid", "--check", "--json")
    assert q.exit_code == 0, q.output
    psnr = json.loads(q.stdout)["check_psnr_db"]
    print(f"--check PSNR (tiny random model): {psnr:.2f} dB")
    assert 5 < psnr < 200
    write_style("original", known_delta(tiny_config("i2v"), seed=9), root / "fx.safetensors")
    preset = root / "quantized.toml"
    preset.write_text(root.joinpath("selftest.toml").read_text().replace('name = "selftest"', 'name = "qtest"')
                      .replace('dit = { path = "dit" }', 'dit = { path = "dit.hybrid.safetensors" }')
                      .replace("[backbone]", 'effect = { name = "fx", source = { path = "fx.safetensors" }, trigger = "rw360xz" }\n\n[backbone]'))
    out = tmp_path / "q.mp4"
    r = cine("run", photo, "--preset", preset, "-o", out, "--seed", "1", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["quantization"] == "hybrid" and "load effect fx" in report["stages"]
    assert json.loads(cine("info", out, "--json").stdout)["cine"]["quantization"] == "hybrid"


def test_nan_latents_stop_with_the_recipe_named(stack, tmp_path):
    root, photo = stack
    assert cine("quantize", root / "dit", "-o", root / "bad.safetensors", "--recipe", "fp8").exit_code == 0
    from safetensors.torch import load_file

    sd = load_file(str(root / "bad.safetensors"))
    from safetensors import safe_open

    with safe_open(str(root / "bad.safetensors"), "pt") as f:
        meta = f.metadata()
    sd["blocks.0.ffn.0.weight_scale"] = torch.full_like(sd["blocks.0.ffn.0.weight_scale"], float("inf"))
    save_file(sd, str(root / "bad.safetensors"), metadata=meta)
    preset = root / "bad.toml"
    preset.write_text(root.joinpath("selftest.toml").read_text().replace('dit = { path = "dit" }', 'dit = { path = "bad.safetensors" }'))
    r = cine("run", photo, "--preset", preset, "-o", tmp_path / "nan.mp4")
    assert r.exit_code == 5, r.output
    assert "NaN/Inf" in r.stderr and "'fp8'" in r.stderr and "--quantize int8" in r.stderr
    assert not (tmp_path / "nan.mp4").exists()


def test_backbone_lora_merged_into_quantized_layers_is_requantized(tmp_path):
    from cinecli.models.adapters import merge_into

    cfg = tiny_config("i2v")
    sd = random_state_dict(cfg)
    pairs = known_delta(cfg, targets=["blocks.0.ffn.0", "blocks.1.self_attn.q"])
    write_style("diff", pairs, tmp_path / "distill.safetensors")  # full .diff weight deltas, as lightx2v ships
    model = load_dit(sd, dtype="fp32")
    quantize_dit(model, RECIPES["hybrid"])
    merge_into(model, tmp_path / "distill.safetensors")
    for module, fmt in (("blocks.0.ffn.0", "int4g64"), ("blocks.1.self_attn.q", "fp8")):
        down, up = pairs[module]
        w = sd[f"{module}.weight"]
        q = QuantLinear.from_linear(torch.nn.Linear(w.shape[1], w.shape[0]), fmt)
        merged = dequantize(*quantize(w, fmt), fmt, torch.float32) + ALPHA / RANK * up @ down  # dequantize, add, requantize
        q.weight.data, q.weight_scale.data = quantize(merged, fmt)
        assert torch.equal(model.get_submodule(module).dequantized(), q.dequantized()), module


def test_fp8_bit_decoding_is_exact_for_every_code():
    from cinecli.models.quant import fp8_bits_to_half

    codes = torch.arange(256, dtype=torch.uint8).view(FP8)
    expected = codes.float()
    finite = ~torch.isnan(expected)
    assert torch.equal(fp8_bits_to_half(codes).float()[finite] * 256, expected[finite])


@pytest.mark.parametrize("activations", [torch.bfloat16, torch.float32])
def test_ffn_weights_are_converted_once_per_block_call_with_identical_output(activations, monkeypatch):
    """Weight-stationary FFN (layers.weights_held): over many token chunks each quantized (or upcast) FFN weight is
    dequantized once per block call, and the output is bit-identical to converting it per chunk."""
    from cinecli.models import layers, wan_dit

    cfg = tiny_config("i2v")
    model = load_dit(random_state_dict(cfg), dtype="bf16")
    model.compute_dtype = activations  # fp32: the path of CPUs without native bf16 (bf16 weights upcast)
    quantize_dit(model, RECIPES["hybrid"])
    x, t, context, clip, y = inputs(cfg, batch=1)
    model.chunking = wan_dit.Chunking(ffn_elements=8 * cfg.ffn_dim)  # 8 tokens a chunk: 45 tokens → 6 chunks
    calls = []
    rows = QuantLinear.rows
    monkeypatch.setattr(QuantLinear, "rows", lambda self, r0, r1, dtype: calls.append(self) or rows(self, r0, r1, dtype))
    with torch.no_grad():
        held = model(x, t, context, clip, y)
        ffn_calls = [c for c in calls if c in {m for b in model.blocks for m in b.ffn}]
        assert len(ffn_calls) == 2 * cfg.num_layers  # once per FFN layer per block call, not once per chunk
        original = layers.weights_held
        monkeypatch.setattr(wan_dit, "weights_held", lambda module, enabled=True: original(module, False))
        calls.clear()
        per_chunk = model(x, t, context, clip, y)
    assert len([c for c in calls if c in {m for b in model.blocks for m in b.ffn}]) == 2 * cfg.num_layers * 6
    assert torch.equal(held, per_chunk)
    assert all(m._held is None for m in model.modules() if isinstance(m, layers.Linear))  # copies freed after the block


def test_fp8_gemm_path_matches_dequantized_linear():
    """quant.fp8_linear (FP8 x FP8 GEMM with per-token activation scales, the CUDA sm90+ path behind
    CINE_FP8_MATMUL=1) checked through torch's CPU kernel: within FP8 activation rounding of the bf16 path."""
    from cinecli.models.quant import fp8_linear, fp8_matmul_supported

    g = torch.Generator().manual_seed(0)
    layer = torch.nn.Linear(64, 48)
    layer.weight.data = torch.randn(48, 64, generator=g) / 8
    q = QuantLinear.from_linear(layer, "fp8")
    x = (torch.randn(2, 10, 64, generator=g) * torch.linspace(0.1, 10, 10)[:, None]).bfloat16()  # rows of varied scale
    ref = F.linear(x.float(), q.dequantized(torch.float32), q.bias.float())
    out = fp8_linear(x, q.weight, q.weight_scale, q.bias)
    assert out.shape == (2, 10, 48) and out.dtype == torch.bfloat16
    err = ((out.float() - ref).pow(2).mean() / ref.pow(2).mean()).sqrt().item()
    assert err < 0.04, err
    assert not fp8_matmul_supported(x)  # never taken on the CPU: there it is not faster than dequantize + bf16 GEMM


def test_converting_while_writing_equals_quantize_then_write(tmp_path):
    """The first-run conversion (write_quantized with a recipe: layer by layer from the memory-mapped 16-bit file)
    writes exactly the file of quantizing the whole model first, and drops the source pages it read."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from cinecli.models.recipes import read_metadata, write_quantized

    cfg = tiny_config("i2v")
    save_file({k: v.to(torch.bfloat16) for k, v in random_state_dict(cfg).items()}, tmp_path / "dit.safetensors")
    whole = load_dit(tmp_path / "dit.safetensors", dtype="bf16")
    quantize_dit(whole, RECIPES["hybrid"])
    write_quantized(whole, tmp_path / "whole.safetensors")
    write_quantized(load_dit(tmp_path / "dit.safetensors", dtype="bf16"), tmp_path / "streamed.safetensors", RECIPES["hybrid"])
    a, b = load_file(tmp_path / "whole.safetensors"), load_file(tmp_path / "streamed.safetensors")
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)) for k in a)
    assert read_metadata(tmp_path / "whole.safetensors") == read_metadata(tmp_path / "streamed.safetensors")
    with safe_open(str(tmp_path / "streamed.safetensors"), "pt") as f:
        assert list(f.keys()) == sorted(a)  # a valid file safetensors itself reads
    loaded = load_dit(tmp_path / "streamed.safetensors", dtype="bf16")
    x = inputs(cfg, batch=1)
    with torch.no_grad():
        assert torch.equal(loaded(*x), whole(*x))
