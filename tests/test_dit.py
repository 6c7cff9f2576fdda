"""The DiT against diffusers' WanTransformer3DModel, number for number, loaded from every on-disk layout."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from wan_fixtures import LAYOUTS, diffusers_model, random_state_dict, tiny_config, write_layout

from cinecli.core.errors import WeightsError
from cinecli.models import load_dit
from cinecli.models.dit_loader import cast_dit

TOL = 1e-4  # max |Δ| ≤ TOL · max |reference|, fp32


def inputs(cfg, batch=2, frames=3, h=6, w=10, seed=1):
    """Odd token grid (3×3×5), fractional timesteps, and a second prompt shorter than the first."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 16, frames, h, w, generator=g)
    t = torch.tensor([937.5, 250.0][:batch])
    context = torch.randn(batch, 7, cfg.text_dim, generator=g)
    context[1:, 5:] = 0  # prompt 2 has 5 real tokens
    n_img = 514 if cfg.model_type == "flf2v" else 257
    clip = torch.randn(batch, n_img, cfg.image_dim, generator=g) if cfg.has_image_input else None
    y = torch.randn(batch, 20, frames, h, w, generator=g) if cfg.has_image_input else None
    return x, t, context, clip, y


def diffusers_forward(ref, cfg, x, t, context, clip, y):
    padded = torch.zeros(context.shape[0], 512, context.shape[2])
    padded[:, : context.shape[1]] = context  # diffusers' pipeline pads the text; the model does not
    hidden = torch.cat([x, y], 1) if y is not None else x
    image = clip.reshape(-1, 257, clip.shape[-1]) if clip is not None else None  # flf2v: [2B,257,C], viewed back inside
    with torch.no_grad():
        return ref(hidden, t, padded, encoder_hidden_states_image=image, return_dict=False)[0]


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("model_type", ["t2v", "i2v", "flf2v"])
def test_matches_diffusers(model_type, tmp_path):
    cfg = tiny_config(model_type)
    sd = random_state_dict(cfg)
    ref = diffusers_model(cfg, sd)
    args = inputs(cfg)
    expected = diffusers_forward(ref, cfg, *args)
    ours = load_dit(write_layout("safetensors", sd, tmp_path, cfg), dtype="fp32")
    assert ours.config == cfg
    with torch.no_grad():
        got = ours(*args)
    assert got.shape == expected.shape and got.dtype == torch.float32
    err = rel_err(got, expected)
    print(f"{model_type}: max|Δ|/max|ref| = {err:.2e}")
    assert err <= TOL


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_layout_loads_and_matches(layout, tmp_path):
    cfg = tiny_config("i2v")
    sd = random_state_dict(cfg, seed=3)
    args = inputs(cfg)
    expected = diffusers_forward(diffusers_model(cfg, sd), cfg, *args)
    model = load_dit(write_layout(layout, sd, tmp_path, cfg), dtype="fp32")
    with torch.no_grad():
        assert rel_err(model(*args), expected) <= TOL


def test_state_dict_source_and_config_inference():
    cfg = tiny_config("flf2v")
    model = load_dit(random_state_dict(cfg), dtype="fp32")
    assert model.config.model_type == "flf2v" and model.config.num_layers == cfg.num_layers


def test_prepared_context_is_reused_and_equal():
    cfg = tiny_config("i2v")
    model = load_dit(random_state_dict(cfg), dtype="fp32")
    x, t, context, clip, y = inputs(cfg)
    with torch.no_grad():
        ctx = model.prepare_context(context, clip)
        kv_first = ctx.kv[0][0]
        a = model(x, t, ctx, y=y)
        b = model(x, t, ctx, y=y)
        assert ctx.kv[0][0] is kv_first and len(ctx.kv) == cfg.num_layers  # cross-attention K/V once per video
        assert torch.equal(a, b) and torch.equal(a, model(x, t, context, clip, y))


@pytest.mark.parametrize("activations", [torch.bfloat16, torch.float32])
def test_bf16_weights_close_to_fp32(activations):
    """bf16 weights with bf16 activations (GPUs, CPUs with AVX512-BF16/AMX) or fp32 activations (other CPUs)."""
    cfg = tiny_config("i2v")
    sd = random_state_dict(cfg)
    args = inputs(cfg)
    with torch.no_grad():
        full = load_dit(sd, dtype="fp32")(*args)
        model = load_dit(sd, dtype="bf16")
        model.compute_dtype = activations
        half = model(*args)
    assert model.blocks[0].ffn[0].weight.dtype == torch.bfloat16
    assert torch.isfinite(half).all()
    err = rel_err(half, full)
    print(f"bf16 weights, {activations} activations vs fp32: max|Δ|/max|ref| = {err:.3e}")
    assert err < 3e-2


def test_fp32_policy_keeps_norms_and_modulation():
    cfg = tiny_config("i2v")
    model = load_dit(random_state_dict(cfg), dtype="bf16")
    assert model.blocks[0].modulation.dtype == torch.float32
    assert model.blocks[0].norm3.weight.dtype == torch.float32
    assert model.time_embedding[0].weight.dtype == torch.bfloat16  # stored 16-bit, computed in fp32
    assert model.blocks[0].ffn[0].weight.dtype == torch.bfloat16
    assert cast_dit(model, torch.float32).blocks[0].ffn[0].weight.dtype == torch.float32


def test_missing_and_unexpected_keys_are_named(tmp_path):
    cfg = tiny_config("i2v")
    sd = random_state_dict(cfg)
    del sd["blocks.1.ffn.2.weight"]
    with pytest.raises(WeightsError, match=r"missing: blocks\.1\.ffn\.2\.weight"):
        load_dit(sd)
    sd = random_state_dict(cfg)
    sd["blocks.0.self_attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError, match=r"unexpected: blocks\.0\.self_attn\.extra\.weight"):
        load_dit(sd)
    sd = random_state_dict(cfg)
    sd["blocks.0.ffn.0.weight"] = torch.zeros(3, 3)
    with pytest.raises(WeightsError, match="wrong shape"):
        load_dit(sd)


def test_not_a_dit(tmp_path):
    from safetensors.torch import save_file

    save_file({"encoder.conv1.weight": torch.zeros(2)}, tmp_path / "vae.safetensors")
    with pytest.raises(WeightsError, match="no Wan2.1 DiT"):
        load_dit(tmp_path / "vae.safetensors")
    with pytest.raises(WeightsError, match="not found"):
        load_dit(tmp_path / "nope.safetensors")


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pth_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"patch_embedding.weight": torch.zeros(1), "evil": _Payload(marker)}, tmp_path / "evil.pth")
    with pytest.raises(WeightsError, match="refusing to load evil.pth"):
        load_dit(tmp_path / "evil.pth")
    assert not marker.exists()
    # and an unpickler without the weights-only guard would indeed have run it (the test can fail):
    subprocess.run([sys.executable, "-c", f"import torch; torch.load({str(tmp_path / 'evil.pth')!r}, weights_only=False)"], check=True)
    assert marker.exists()


@pytest.mark.parametrize("knob", ["ffn_elements", "token_elements", "score_bytes"])
def test_token_chunks_give_the_same_output(knob):
    import cinecli.models.wan_dit as wan_dit

    cfg = tiny_config("i2v")
    model = load_dit(random_state_dict(cfg), dtype="fp32")
    args = inputs(cfg)
    with torch.no_grad():
        model.chunking = wan_dit.Chunking.whole()  # one chunk, every weight held (a GPU with room)
        whole = model(*args)
        width = {"ffn_elements": cfg.ffn_dim, "token_elements": cfg.dim, "score_bytes": cfg.num_heads * 45 * 4}[knob]
        chunking = wan_dit.Chunking(**{knob: 7 * width})  # 7-token chunks (of queries, for scores) over 45 tokens
        model.chunking = chunking
        chunked = model(*args)
        # the chunked block against the reference order of work: whole-sequence attention, out-of-place residual
        blk, x = model.blocks[0], torch.randn(1, 45, cfg.dim)
        e0, kv = torch.randn(1, 6, cfg.dim) * 0.1, [torch.randn(1, cfg.num_heads, 9, cfg.head_dim) for _ in range(4)]
        rope = model.rope((5, 3, 3), x.device)
        s1, c1, g1, s2, c2, g2 = (blk.modulation + e0).unsqueeze(2).unbind(1)
        ref = x + blk.self_attn(blk.norm1(x) * (1 + c1) + s1, *rope) * g1
        ref = ref + blk.cross_attn(blk.norm3(ref), kv)
        ref = ref + blk.ffn(blk.norm2(ref) * (1 + c2) + s2) * g2
        got = blk(x.clone(), e0, kv, rope, torch.float32, None, chunking)
    assert rel_err(chunked, whole) <= 1e-6
    assert rel_err(got, ref) <= 1e-6


def test_attention_backends_used_are_recorded():
    from cinecli.models.attention import attention, used_backends

    q = torch.randn(1, 5, 2, 8)
    attention(q, q, q)
    assert "sdpa" in used_backends()
