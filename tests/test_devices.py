"""MPS and CUDA rules proven on the CPU: the device-limits table, the emulation that enforces it, and one test per
device problem of issue 21 (each fails on the code before it: float8 and float64 on MPS, out-of-memory errors, the
4 GiB tensor cap, bicubic resize, fp16, the text encoder's size, the attention backend, the decode retry)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cinecli.cli.app import app
from cinecli.core import devices, emulate
from cinecli.core.limits import LIMITS, is_out_of_memory
from cinecli.generate.selftest import sample_image

GiB = 1 << 30


@pytest.fixture
def mps(monkeypatch):
    monkeypatch.setenv("CINE_EMULATE_DEVICE", "mps")
    monkeypatch.delenv("CINE_EMULATE_DEVICE_MEMORY", raising=False)
    return devices.choose_device("mps")


def cine(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]).astype(np.int16)


def gguf_preset(backbone: Path, tmp_path: Path) -> Path:
    """The self-test stack with its DiT as a city96-style Q8_0 GGUF file."""
    from gguf_fixtures import write_city96_gguf
    from safetensors.torch import load_file

    root = backbone.parent
    sd = load_file(root / "dit" / "diffusion_pytorch_model.safetensors")
    write_city96_gguf({k: v.float() for k, v in sd.items()}, tmp_path / "dit-Q8_0.gguf", "Q8_0")
    text = backbone.read_text().replace('name = "selftest"', 'name = "selftest-gguf"')
    text = text.replace('dit = { path = "dit" }', f'dit = {{ path = "{tmp_path / "dit-Q8_0.gguf"}" }}')
    for part in ("Wan2.1_VAE.pth", "text_encoder", "tokenizer", "image_encoder", "taew2_1.pth"):
        text = text.replace(f'path = "{part}"', f'path = "{root / part}"')
    preset = tmp_path / "gguf.toml"
    preset.write_text(text)
    return preset


# --- the emulated self-test: every recipe, resident and streamed ----------------------------------------------------
@pytest.mark.parametrize("recipe", ["none", "fp8", "hybrid", "compact", "gguf"])
def test_emulated_mps_selftest_every_recipe_resident_and_streamed(recipe, backbone, env, photo, tmp_path, monkeypatch):
    preset = gguf_preset(backbone, tmp_path) if recipe == "gguf" else backbone
    quantize = ["--quantize", recipe] if recipe not in ("none", "gguf") else []
    ref = tmp_path / "cpu.mp4"
    assert cine("run", photo, "--preset", preset, "-o", ref, "--seed", "3", "-q", *quantize).exit_code == 0
    monkeypatch.setenv("CINE_EMULATE_DEVICE", "mps")
    for offload in ("none", "blocks"):
        out = tmp_path / f"mps-{offload}.mp4"
        r = cine("run", photo, "--preset", preset, "-o", out, "--seed", "3", "-q", "--device", "mps",
                 "--offload", offload, *quantize)
        assert r.exit_code == 0, r.output
        # bf16 activations on the emulated Mac against the CPU's own choice (fp32 where it emulates bf16)
        assert np.abs(frames(out) - frames(ref)).mean() < 6.0, (recipe, offload)


def test_emulated_mps_first_and_last_frame(backbone, env, photo, tmp_path, mps):
    end = tmp_path / "end.png"
    sample_image(96, 64).transpose(0).save(end)
    r = cine("run", photo, "--preset", backbone, "-o", tmp_path / "pair.mp4", "--last-frame", end, "--device", "mps",
             "--quantize", "hybrid", "--offload", "blocks", "-q")
    assert r.exit_code == 0, r.output


def test_emulated_cuda_selftest_streamed(backbone, env, photo, tmp_path, monkeypatch):
    monkeypatch.setenv("CINE_EMULATE_DEVICE", "cuda")
    r = cine("run", photo, "--preset", backbone, "-o", tmp_path / "cuda.mp4", "--device", "cuda", "--offload", "blocks",
             "--quantize", "hybrid", "-q")
    assert r.exit_code == 0, r.output


# --- the emulation itself -----------------------------------------------------------------------------------------
def test_emulation_enforces_the_table(mps):
    lim = devices.limits(mps)
    assert devices.kind(mps) == "mps" and lim is LIMITS["mps"] and devices.kind("cpu") == "cpu"
    with pytest.raises(TypeError, match="Float8"):
        emulate.place(torch.zeros(4, dtype=torch.float8_e4m3fn), lim)
    with devices.device_rules(mps):
        with pytest.raises(TypeError, match="float64"):
            torch.arange(3, dtype=torch.float64)
        with devices.on_host():
            torch.arange(3, dtype=torch.float64)  # deliberate host work passes
    with pytest.raises(emulate.EmulatedAbort):
        emulate.check(torch.empty(4 * GiB + 8, dtype=torch.uint8, device="meta"), lim, "a test")


def test_emulated_memory_raises_the_devices_own_out_of_memory(monkeypatch):
    for name, kind in (("mps", RuntimeError), ("cuda", torch.OutOfMemoryError)):
        monkeypatch.setenv("CINE_EMULATE_DEVICE", name)
        monkeypatch.setenv("CINE_EMULATE_DEVICE_MEMORY", "64MiB")
        device = devices.choose_device(name)
        assert devices.device_memory(device)[0] <= 64 << 20
        with devices.device_rules(device), pytest.raises(kind) as caught:
            keep = [torch.empty(16 << 20, dtype=torch.uint8) for _ in range(8)]  # 128 MiB live
            del keep
        assert is_out_of_memory(caught.value), caught.value


# --- 1. float8 weights reach MPS as their bits ---------------------------------------------------------------------
def test_fp8_weights_are_stored_as_bits_on_mps_and_compute_the_same(tmp_path, mps):
    from wan_fixtures import random_state_dict, tiny_config, write_layout

    from cinecli.models import load_dit
    from cinecli.models.quant_cache import load_quantized
    from cinecli.models.recipes import get_recipe

    cfg = tiny_config()
    src = write_layout("safetensors", random_state_dict(cfg, seed=2), tmp_path / "dit", cfg)
    host = load_quantized(src, get_recipe("fp8"), [], device="cpu", dtype=torch.bfloat16)
    on_mps = load_quantized(src, get_recipe("fp8"), [], device=mps, dtype=torch.bfloat16)
    dtypes = {p.dtype for p in on_mps.parameters()}
    assert torch.float8_e4m3fn in {p.dtype for p in host.parameters()}
    assert torch.float8_e4m3fn not in dtypes and torch.uint8 in dtypes
    x, y = torch.randn(1, 16, 2, 8, 8), torch.randn(1, 20, 2, 8, 8)
    ctx, clip = torch.randn(1, 6, cfg.text_dim), torch.randn(1, 257, cfg.image_dim)
    with torch.no_grad(), devices.device_rules(mps):
        got = on_mps(x, torch.tensor([500.0]), ctx, clip, y)
    assert torch.equal(got, host(x, torch.tensor([500.0]), ctx, clip, y))
    assert load_dit(src, device=mps, dtype=torch.bfloat16) is not None


# --- 2. float64 tables are built on the host ------------------------------------------------------------------------
def test_time_embedding_and_rope_make_no_float64_on_mps(mps):
    from cinecli.models.wan_dit import rope_tables, sinusoidal_embedding

    t = torch.tensor([999.0, 250.5])
    with devices.device_rules(mps):
        emb = sinusoidal_embedding(t, 256)
        cos, sin = rope_tables(128, (3, 4, 5), mps)
    half = torch.arange(128, dtype=torch.float64) / 128
    args = t.double()[:, None] * torch.pow(10000.0, -half)[None]
    assert torch.equal(emb, torch.cat([args.cos(), args.sin()], 1).float())
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (60, 1, 64)


# --- 3. every device's out-of-memory error is exit 7 --------------------------------------------------------------
@pytest.mark.parametrize("error", [
    RuntimeError("MPS backend out of memory (MPS allocated: 17.9 GB, other allocations: 1.2 GB, max allowed: 18.1 GB)"),
    RuntimeError("CUDA error: out of memory"),  # a failed pinned host allocation
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
])
def test_out_of_memory_of_any_device_is_exit_7(error, backbone, env, photo, tmp_path, monkeypatch):
    import cinecli.generate.pipeline as pipeline

    def boom(*a, **k):
        raise error

    monkeypatch.setattr(pipeline.Generator, "generate", boom)
    r = cine("run", photo, "--preset", backbone, "-o", tmp_path / "o.mp4", "-q")
    assert r.exit_code == 7, r.output
    assert r.stderr.startswith("cine: error: the device ran out of memory") and len(r.stderr.strip().splitlines()) == 1


# --- 4. no tensor over 4 GiB on MPS, at real size (14B, 81 frames 720p), and the plan counts the scores ----------
def test_14b_block_at_81_frames_720p_keeps_every_mps_tensor_under_4gib():
    from cinecli.models.load import build_empty
    from cinecli.models.wan_dit import DIT_CONFIGS, Block, Chunking

    cfg = DIT_CONFIGS["wan2.1-i2v-14b"]
    block = build_empty(lambda: Block(cfg)).to(torch.bfloat16)
    n = 21 * 45 * 80  # latent frames × (720/16) × (1280/16) = 75,600 tokens
    x = torch.empty(1, n, cfg.dim, device="meta")
    e0 = torch.empty(1, 6, cfg.dim, device="meta")
    kv = tuple(torch.empty(1, cfg.num_heads, rows, 128, device="meta", dtype=torch.bfloat16) for rows in (65, 65, 257, 257))
    rope = (torch.empty(n, 1, 64, device="meta"), torch.empty(n, 1, 64, device="meta"))
    lim = LIMITS["mps"]
    with torch.no_grad(), emulate.DeviceRules(lim, meta=True) as rules:
        block(x, e0, kv, rope, torch.bfloat16, None, Chunking.for_device(lim))
    assert 1 * GiB < rules.largest <= lim.max_tensor_bytes
    with torch.no_grad(), emulate.DeviceRules(lim, meta=True), pytest.raises(emulate.EmulatedAbort):
        block(x, e0, kv, rope, torch.bfloat16, None, Chunking())  # the CPU's chunks: 9.9 GB of fp32 scores


def test_plan_counts_mps_attention_scores():
    from cinecli.models.wan_dit import TOKEN_CHUNK_ELEMENTS
    from cinecli.plan import memory as mp

    assert mp.TOKEN_CHUNK_ELEMENTS == TOKEN_CHUNK_ELEMENTS
    tokens, dim = 21 * 30 * 52, 5120  # 81 frames 480p, 14B
    assert mp.attention_scores_bytes(tokens, dim, LIMITS["cuda"]) == 0
    scores = mp.attention_scores_bytes(tokens, dim, LIMITS["mps"])
    assert scores == 2 * min(40 * 819 * tokens * 4, 2 * GiB)  # scores and their softmax, 2.1 GB each here


# --- 5. bicubic resize where MPS lacks it ------------------------------------------------------------------------
def test_clip_resizes_on_the_host_where_mps_lacks_bicubic(backbone, mps, monkeypatch):
    from cinecli.models.image_encoder import load_image_encoder

    enc = load_image_encoder(backbone.parent / "image_encoder", device=mps, dtype=torch.float32)
    images = torch.rand(1, 3, 64, 96) * 2 - 1
    with devices.device_rules(mps):
        want = enc.preprocess(images)
    monkeypatch.setattr(emulate, "torch_version", lambda: (2, 5))
    assert not devices.has_op(mps, "upsample_bicubic2d") and devices.has_op("cpu", "upsample_bicubic2d")
    with devices.device_rules(mps):
        assert torch.equal(enc.preprocess(images), want)
        with pytest.raises(NotImplementedError, match="upsample_bicubic2d"):
            torch.nn.functional.interpolate(images, size=(8, 8), mode="bicubic")


# --- 6. precision: bf16 by default, fp16 guarded -------------------------------------------------------------------
def test_mps_defaults_to_bf16_and_the_cpu_text_encoder_never_runs_fp16(mps):
    assert devices.choose_dtype("auto", mps) == torch.bfloat16
    assert devices.text_encoder_dtype("cpu", mps, torch.float16) == torch.bfloat16
    assert devices.text_encoder_dtype(mps, mps, torch.float16) == torch.float16
    assert devices.text_encoder_dtype("cpu", mps, torch.float32) == torch.float32


def test_fp16_ffn_output_past_65504_stays_finite():
    from cinecli.models.wan_dit import DIT_CONFIGS, Block

    block = Block(DIT_CONFIGS["tiny-i2v"])  # dim 256, FFN 512
    with torch.no_grad():
        block.ffn[0].weight.fill_(0.1), block.ffn[0].bias.zero_()  # hidden 25.6 (fine in fp16)
        block.ffn[2].weight.fill_(10.0), block.ffn[2].bias.zero_()  # output 512 × 25.6 × 10 = 131,072
    h = torch.ones(1, 4, 256)
    full = block.ffn(h)
    assert full.abs().max() > 65504  # the value fp16 cannot hold
    block.half()
    with torch.no_grad():
        got = block._ffn(h.half())
    assert torch.isfinite(got).all() and torch.allclose(got.float(), full, rtol=1e-2)


# --- 10. the text encoder's dequantized wo counted at its real size --------------------------------------------
def test_fp8_text_encoder_counts_its_dequantized_wo(tmp_path):
    from safetensors.torch import save_file

    from cinecli.plan.inputs import text_encoder_bytes

    f8 = torch.float8_e4m3fn
    save_file({"encoder.block.0.layer.1.DenseReluDense.wo.weight": torch.zeros(64, 256).to(f8),
               "encoder.block.0.layer.1.DenseReluDense.wi_0.weight": torch.zeros(256, 64).to(f8),
               "shared.weight": torch.zeros(100, 64, dtype=torch.bfloat16)}, tmp_path / "umt5.safetensors")
    path = tmp_path / "umt5.safetensors"
    assert text_encoder_bytes(path, None, 2) == 64 * 256 * 2 + 256 * 64 + 100 * 64 * 2
    assert text_encoder_bytes(path, None, 2, wo_bytes=4) == 64 * 256 * 4 + 256 * 64 + 100 * 64 * 2


# --- 11. the attention backend is settled before loading ---------------------------------------------------------
def test_attention_backend_is_checked_before_anything_loads(backbone, env, photo, tmp_path, monkeypatch):
    from cinecli.models import attention

    monkeypatch.setenv("CINE_ATTENTION", "bogus")
    r = cine("run", photo, "--preset", backbone, "-o", tmp_path / "o.mp4")
    assert r.exit_code == 2 and "CINE_ATTENTION" in r.stderr
    monkeypatch.setattr(attention, "_IMPORTABLE", {"flash": False})
    assert attention.choose_backend(torch.device("cpu"), {"CINE_ATTENTION": "flash"})
    assert attention.backend_for(torch.zeros(1, 1, 1, 8)) == "sdpa"
    monkeypatch.setenv("CINE_EMULATE_DEVICE", "cuda")
    notices = attention.choose_backend(devices.choose_device("cuda"), {"CINE_ATTENTION": "flash"})
    assert notices and "does not import" in notices[0] and attention.backend_for(torch.zeros(1, 1, 1, 8)) == "sdpa"
    attention.choose_backend("cpu", {})


# --- 9. an out-of-memory decode is retried in smaller tiles from the same latents -------------------------------
def test_decode_out_of_memory_retries_tiled(backbone, env, photo, tmp_path, monkeypatch):
    from cinecli.models.wan_vae import WanVAE

    tiles = []
    real = WanVAE.decode

    def decode(self, latents, tile_size=None, **kw):
        tiles.append(tile_size)
        if tile_size is None:
            raise RuntimeError("MPS backend out of memory (MPS allocated: 9 GB) [test]")
        return real(self, latents, tile_size=tile_size, **kw)

    monkeypatch.setattr(WanVAE, "decode", decode)
    r = cine("run", photo, "--preset", backbone, "-o", tmp_path / "o.mp4", "-q")
    assert r.exit_code == 0, r.output
    assert tiles[0] is None and tiles[1] == 256 and "retrying in 256-px tiles" in r.stderr


def test_cuda_and_mps_plans_keep_headroom(monkeypatch):
    from cinecli.plan.inputs import machine

    monkeypatch.setenv("CINE_EMULATE_DEVICE", "cuda")
    monkeypatch.setenv("CINE_EMULATE_DEVICE_MEMORY", "12GiB")
    m = machine(devices.choose_device("cuda"))
    assert m.device == "cuda" and m.device_bytes <= int(12 * GiB * 0.9) + 1


def test_the_table_has_every_kind_and_rule():
    assert set(LIMITS) == {"cpu", "cuda", "mps"}
    assert LIMITS["mps"] == replace(LIMITS["mps"])  # frozen rows
    assert not LIMITS["mps"].float8 and not LIMITS["mps"].float64 and LIMITS["mps"].max_tensor_bytes == 4 * GiB
    assert LIMITS["cuda"].pins_host and LIMITS["cuda"].headroom > 0 and LIMITS["cpu"].headroom == 0


# --- 7. GPU chunking: the whole sequence when it fits, every quantized weight decoded once per block call ---------
def test_whole_block_estimate_matches_a_trace_of_the_model(monkeypatch):
    from test_memory_plan import LiveBytes

    import cinecli.models.wan_dit as wan_dit
    from cinecli.models.load import build_empty
    from cinecli.plan import memory as mp

    monkeypatch.setattr(wan_dit, "attention", lambda q, k, v, bias=None: torch.empty_like(q))  # fused: O(L)
    for name in ("wan2.1-fun-1.3b-inp", "wan2.1-i2v-14b"):
        cfg = replace(wan_dit.DIT_CONFIGS[name], num_layers=1)
        dit = build_empty(lambda: wan_dit.WanDiT(cfg)).to(torch.bfloat16)
        dit.chunking = wan_dit.Chunking.whole()
        ctx = dit.prepare_context(torch.zeros(1, 64, 4096, device="meta"), torch.zeros(1, 257, 1280, device="meta"))
        x, y = torch.zeros(1, 16, 13, 60, 104, device="meta"), torch.zeros(1, 20, 13, 60, 104, device="meta")
        with torch.no_grad(), LiveBytes() as step:
            dit(x, torch.tensor([1000.0], device="meta"), ctx, y=y)
        want = mp.dit_whole_block_bytes(13 * 30 * 52, cfg.dim, cfg.ffn_dim, 2)
        assert step.peak == pytest.approx(want, rel=0.15), name


def test_held_and_whole_chunking_decode_each_quantized_weight_once_per_block_call(monkeypatch):
    from wan_fixtures import random_state_dict, tiny_config

    from cinecli.models import load_dit
    from cinecli.models.quant import QuantLinear
    from cinecli.models.recipes import RECIPES, quantize_dit
    from cinecli.models.wan_dit import Chunking

    cfg = tiny_config()
    model = load_dit(random_state_dict(cfg), dtype="bf16")
    quantize_dit(model, RECIPES["hybrid"])
    quantized = [m for b in model.blocks for m in b.modules() if isinstance(m, QuantLinear)]
    x, y = torch.randn(1, 16, 5, 6, 6), torch.randn(1, 20, 5, 6, 6)  # 45 tokens
    ctx = model.prepare_context(torch.randn(1, 6, cfg.text_dim), torch.randn(1, 257, cfg.image_dim))
    calls = []
    rows = QuantLinear.rows
    monkeypatch.setattr(QuantLinear, "rows", lambda self, r0, r1, dtype: calls.append(self) or rows(self, r0, r1, dtype))
    outputs = {}
    for name, chunking in (("chunked", Chunking(token_elements=7 * cfg.dim, ffn_elements=7 * cfg.ffn_dim)),
                           ("held", Chunking(token_elements=7 * cfg.dim, ffn_elements=7 * cfg.ffn_dim, hold_weights=True)),
                           ("whole", Chunking.whole())):
        model.chunking, calls[:] = chunking, []
        with torch.no_grad():
            outputs[name] = model(x, torch.tensor([500.0]), ctx, y=y)
        per_layer = [sum(c is m for c in calls) for m in quantized]
        if name == "chunked":
            assert max(per_layer) > 1  # per token chunk
        else:  # (cross-attention keys/values are made once per video, in prepare_context: 0 calls here)
            assert max(per_layer) == 1 and sum(per_layer) >= len(quantized) // 2, (name, per_layer)
    assert torch.equal(outputs["held"], outputs["chunked"])
    assert (outputs["whole"] - outputs["chunked"]).abs().max() <= 1e-2 * outputs["chunked"].abs().max()


def test_cuda_plan_runs_the_whole_sequence_when_it_fits():
    from test_memory_plan import cpu, gpu, job

    from cinecli.plan.memory import make_plan

    assert make_plan(job("14b", 81), gpu(80)).chunking == "whole"  # 21k tokens: ~4 GB of activations, weights held
    assert make_plan(job("1.3b", 81), gpu(24)).chunking == "whole"
    small = make_plan(job("14b", 81), gpu(8))
    assert small.chunking in ("held", "chunked") and small.dit == "streamed"
    assert make_plan(job("1.3b", 49), cpu(64)).chunking == "held"  # the CPU: bounded chunks, weights held per block


# --- 8 and 12. streamed blocks: exactly pinned slabs, a device pool of two blocks ------------------------------
def test_streamed_blocks_pin_exact_slabs_and_use_two_device_slots(monkeypatch):
    from test_dit import inputs
    from wan_fixtures import random_state_dict

    import cinecli.models.streaming as streaming
    from cinecli.models import load_dit
    from cinecli.models.wan_dit import DIT_CONFIGS

    cfg = replace(DIT_CONFIGS["tiny-i2v"], num_layers=5)
    pinned = []
    monkeypatch.setattr(streaming, "pin_exactly", lambda buffer: pinned.append(buffer.numel()) or buffer.numel())
    sd = random_state_dict(cfg)
    args = inputs(cfg)
    with torch.no_grad():
        want = load_dit(sd, dtype="bf16")(*args)
        model = load_dit(sd, dtype="bf16")
        sizes = [[p.numel() * p.element_size() for p in b.parameters()] for b in model.blocks]
        model = streaming.stream_blocks(model, "cpu", force=True)
        model.block_stream.pin = True  # what CUDA does: check the bytes it would page-lock, block by block
        model.block_stream.slabs = [streaming.Slab(b, True) for b in model.blocks]
        bases = []
        for blk in model.blocks:
            blk.register_forward_pre_hook(lambda m, a: bases.append(next(m.parameters()).untyped_storage().data_ptr()))
        got = model(*args)
    assert torch.equal(got, want)
    for block, size in zip(sizes, pinned):  # one exact slab per block: its bytes plus < 256 B alignment per tensor
        assert sum(block) <= size < sum(block) + 256 * len(block)
    per_tensor_pow2 = sum(1 << (n - 1).bit_length() for block in sizes for n in block)  # what pin_memory() held
    assert sum(pinned) < per_tensor_pow2
    assert len(set(bases)) == 2 and len(bases) == cfg.num_layers  # five blocks, two device slots in turn
