"""Wan2.1 VAE and TAEW2.1 tiny decoder: number-for-number against independent implementations, every layout.

The Wan VAE reference is diffusers' ``AutoencoderKLWan`` (tiny config, random weights), saved in each on-disk
layout and loaded through ``load_vae``. TAEHV has no installable implementation (no ``taehv`` package on PyPI,
no tiny-Wan class in diffusers), so the tiny decoder is checked against a frame-by-frame functional
re-statement of the TAEHV graph written below straight from the checkpoint layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from cinecli.core.devices import vae_dtype
from cinecli.core.errors import WeightsError
from cinecli.models.tiny_vae import TinyVAE
from cinecli.models.vae_loader import load_tiny_vae, load_vae, normalize_vae_keys
from cinecli.models.wan_vae import LATENTS_MEAN, LATENTS_STD, VAE_CONFIGS, WanVAE, _tile_starts, _tiled
from cinecli.models.wan_vae_blocks import REP, CausalCache

diffusers = pytest.importorskip("diffusers")

MEAN = torch.tensor(LATENTS_MEAN).view(1, 16, 1, 1, 1)
STD = torch.tensor(LATENTS_STD).view(1, 16, 1, 1, 1)
CLIPS = [(1, 1, 40, 40), (2, 5, 24, 40), (1, 9, 40, 40)]  # (B, T, H, W): latents 5×5, 3×5 (odd sizes)
LAYOUTS = ["diffusers", "pipeline", "original_pth", "comfy_fp16", "wan_repo"]


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def perturb_(model: torch.nn.Module, seed: int) -> None:
    """Randomise every parameter (diffusers inits gamma to 1), rounded to fp16 so a 16-bit copy is lossless."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith("gamma"):
                p.copy_(1 + 0.3 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.mul_(1 + 0.3 * noise)
            p.copy_(p.half().float())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """A random tiny diffusers AutoencoderKLWan, written in every layout, with its outputs on CLIPS."""
    torch.manual_seed(0)  # diffusers' own init draws from the global generator
    ref = diffusers.AutoencoderKLWan(base_dim=8).eval()
    perturb_(ref, seed=0)
    root = tmp_path_factory.mktemp("vae")
    paths = {"diffusers": root / "diffusers_vae", "pipeline": root / "pipeline"}
    ref.save_pretrained(paths["diffusers"])
    ref.save_pretrained(paths["pipeline"] / "vae")
    (paths["pipeline"] / "model_index.json").write_text(json.dumps({"_class_name": "WanImageToVideoPipeline"}))
    names = normalize_vae_keys(list(ref.state_dict()))
    original = {names[k]: v.clone() for k, v in ref.state_dict().items()}
    paths["original_pth"] = root / "Wan2.1_VAE.pth"
    torch.save(original, paths["original_pth"])
    paths["comfy_fp16"] = root / "wan_2.1_vae.safetensors"
    save_file({k: v.half().contiguous() for k, v in original.items()}, paths["comfy_fp16"])
    repo = root / "Wan2.1-I2V-14B-480P"  # original repo: DiT shards + config.json beside the VAE
    repo.mkdir()
    torch.save(original, repo / "Wan2.1_VAE.pth")
    save_file({"patch_embedding.weight": torch.zeros(4, 36, 1, 2, 2)}, repo / "diffusion_pytorch_model.safetensors")
    (repo / "config.json").write_text(json.dumps({"_class_name": "WanModel", "dim": 4, "num_layers": 1}))
    paths["wan_repo"] = repo

    gen = torch.Generator().manual_seed(1)
    outputs = []
    with torch.no_grad():
        for b, t, h, w in CLIPS:
            video = torch.rand(b, 3, t, h, w, generator=gen) * 2 - 1
            mu = ref.encode(video).latent_dist.mean  # un-normalised: normalise for comparison
            latents = torch.randn(mu.shape, generator=gen)
            pixels = ref.decode(latents * STD + MEAN).sample  # diffusers takes un-normalised latents
            outputs.append((video, (mu - MEAN) / STD, latents, pixels))
    return ref, paths, original, outputs


# --- key names ------------------------------------------------------------------------------------------------------


def test_diffusers_names_map_to_original_names():
    # Hand-written pairs from wan2.1-reference.md §C.4: a wrong rule table cannot pass these by symmetry.
    pairs = {
        "encoder.conv_in.weight": "encoder.conv1.weight",
        "encoder.down_blocks.0.norm1.gamma": "encoder.downsamples.0.residual.0.gamma",
        "encoder.down_blocks.0.conv1.weight": "encoder.downsamples.0.residual.2.weight",
        "encoder.down_blocks.3.norm2.gamma": "encoder.downsamples.3.residual.3.gamma",
        "encoder.down_blocks.3.conv2.bias": "encoder.downsamples.3.residual.6.bias",
        "encoder.down_blocks.3.conv_shortcut.weight": "encoder.downsamples.3.shortcut.weight",
        "encoder.down_blocks.5.time_conv.weight": "encoder.downsamples.5.time_conv.weight",
        "encoder.down_blocks.2.resample.1.weight": "encoder.downsamples.2.resample.1.weight",
        "encoder.mid_block.resnets.0.norm1.gamma": "encoder.middle.0.residual.0.gamma",
        "encoder.mid_block.attentions.0.to_qkv.weight": "encoder.middle.1.to_qkv.weight",
        "encoder.mid_block.attentions.0.norm.gamma": "encoder.middle.1.norm.gamma",
        "encoder.mid_block.resnets.1.conv2.weight": "encoder.middle.2.residual.6.weight",
        "encoder.norm_out.gamma": "encoder.head.0.gamma",
        "encoder.conv_out.weight": "encoder.head.2.weight",
        "quant_conv.weight": "conv1.weight",
        "post_quant_conv.bias": "conv2.bias",
        "decoder.conv_in.bias": "decoder.conv1.bias",
        "decoder.up_blocks.0.resnets.2.conv1.weight": "decoder.upsamples.2.residual.2.weight",
        "decoder.up_blocks.0.upsamplers.0.time_conv.weight": "decoder.upsamples.3.time_conv.weight",
        "decoder.up_blocks.1.resnets.0.conv_shortcut.weight": "decoder.upsamples.4.shortcut.weight",
        "decoder.up_blocks.1.upsamplers.0.resample.1.weight": "decoder.upsamples.7.resample.1.weight",
        "decoder.up_blocks.2.upsamplers.0.resample.1.bias": "decoder.upsamples.11.resample.1.bias",
        "decoder.up_blocks.3.resnets.2.conv2.weight": "decoder.upsamples.14.residual.6.weight",
        "decoder.norm_out.gamma": "decoder.head.0.gamma",
        "decoder.conv_out.weight": "decoder.head.2.weight",
    }
    assert {k: v for k, v in normalize_vae_keys(list(pairs)).items()} == pairs
    # ComfyUI all-in-one prefixes are stripped; original names pass through unchanged.
    assert normalize_vae_keys(["first_stage_model.encoder.conv1.weight", "model.x"]) == {
        "first_stage_model.encoder.conv1.weight": "encoder.conv1.weight"}


def test_full_size_module_tree_has_checkpoint_names():
    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in WanVAE(VAE_CONFIGS["wan2.1"]).state_dict().items()}
    expect = {
        "encoder.conv1.weight": (96, 3, 3, 3, 3),
        "encoder.downsamples.0.residual.0.gamma": (96, 1, 1, 1),
        "encoder.downsamples.3.shortcut.weight": (192, 96, 1, 1, 1),
        "encoder.downsamples.5.resample.1.weight": (192, 192, 3, 3),
        "encoder.downsamples.5.time_conv.weight": (192, 192, 3, 1, 1),
        "encoder.middle.1.norm.gamma": (384, 1, 1),
        "encoder.middle.1.to_qkv.weight": (1152, 384, 1, 1),
        "encoder.head.2.weight": (32, 384, 3, 3, 3),
        "conv1.weight": (32, 32, 1, 1, 1),
        "conv2.weight": (16, 16, 1, 1, 1),
        "decoder.conv1.weight": (384, 16, 3, 3, 3),
        "decoder.upsamples.3.time_conv.weight": (768, 384, 3, 1, 1),
        "decoder.upsamples.3.resample.1.weight": (192, 384, 3, 3),
        "decoder.upsamples.4.residual.2.weight": (384, 192, 3, 3, 3),
        "decoder.upsamples.11.resample.1.weight": (96, 192, 3, 3),
        "decoder.upsamples.14.residual.6.weight": (96, 96, 3, 3, 3),
        "decoder.head.2.weight": (3, 96, 3, 3, 3),
    }
    assert {k: shapes.get(k) for k in expect} == expect
    assert len(shapes) == 194


# --- equivalence with diffusers --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def loaded_from_diffusers(reference):
    return load_vae(reference[1]["diffusers"], dtype="fp32")  # number for number: the reference's precision


@pytest.mark.parametrize("layout", LAYOUTS)
def test_matches_diffusers_fp32(reference, loaded_from_diffusers, layout):
    _, paths, _, outputs = reference
    vae = load_vae(paths[layout], dtype="fp32")
    assert vae.dtype == torch.float32 and vae.cfg == loaded_from_diffusers.cfg and vae.cfg.base_dim == 8
    # Every layout must give the very same weights; all clips run on the diffusers folder, one on the others.
    first = loaded_from_diffusers.state_dict()
    assert all(torch.equal(v, first[k]) for k, v in vae.state_dict().items())
    cases = list(zip(outputs, CLIPS)) if layout == "diffusers" else [(outputs[-1], CLIPS[-1])]
    for (video, ref_latents, latents, ref_pixels), (b, t, h, w) in cases:
        got = vae.encode(video)
        assert got.shape == (b, 16, 1 + (t - 1) // 4, h // 8, w // 8) == ref_latents.shape
        enc = rel_err(got, ref_latents)
        pixels = vae.decode(latents)
        assert pixels.shape == (b, 3, t, h, w) == ref_pixels.shape
        dec = rel_err(pixels, ref_pixels)
        print(f"[vae fp32 {layout} B={b} T={t} {h}x{w}] encode rel {enc:.2e}  decode rel {dec:.2e}")
        assert enc <= 1e-4 and dec <= 1e-4
        assert pixels.abs().max() <= 1 and (pixels.abs() < 1).float().mean() > 0.9  # mostly unclamped: a real test


def test_state_dict_source_and_bf16(reference):
    ref, _, original, outputs = reference
    vae32 = load_vae(original, dtype="fp32")
    assert load_vae(original).dtype == vae_dtype("cpu")  # no dtype: the device's choice (bf16 where native)
    vae16 = load_vae(ref.state_dict(), dtype="bf16")  # diffusers names, straight from memory
    assert vae16.dtype == torch.bfloat16
    video, _, latents, _ = outputs[2]
    z32, z16 = vae32.encode(video), vae16.encode(video)
    x32, x16 = vae32.decode(latents), vae16.decode(latents)
    assert z16.dtype == x16.dtype == torch.float32 and torch.isfinite(z16).all() and torch.isfinite(x16).all()
    enc, dec = rel_err(z16, z32), rel_err(x16, x32)
    mean_dec = (x16 - x32).abs().mean().item()
    print(f"[vae bf16 vs fp32, random tiny weights] encode max rel {enc:.3e}, decode max rel {dec:.3e}, "
          f"decode mean |Δ| {mean_dec:.3e}")
    assert enc <= 0.02 and dec <= 0.08 and mean_dec <= 0.01


def test_fp16_file_loads_lean_into_bf16(reference):
    _, paths, _, _ = reference
    vae = load_vae(paths["comfy_fp16"], dtype=torch.bfloat16)
    assert {p.dtype for p in vae.parameters()} == {torch.bfloat16}
    assert {p.device.type for p in vae.parameters()} == {"cpu"}
    assert not any(p.requires_grad for p in vae.parameters())


def test_causal_cache_stays_bounded():
    """Chunked caching keeps ≤ 2 frames per slot: memory does not grow with the number of chunks."""
    torch.manual_seed(0)
    vae = WanVAE(VAE_CONFIGS["tiny"]).eval()
    for part, chunks in ((vae.decoder, torch.randn(1, 16, 6, 3, 3).split(1, dim=2)),
                         (vae.encoder, torch.randn(1, 3, 21, 24, 24).tensor_split([1, 5, 9, 13, 17], dim=2))):
        cache, sizes, reps = CausalCache(), [], []
        with torch.no_grad():
            for chunk in chunks:
                cache.start_chunk()
                part(chunk, cache)
                tensors = [s for s in cache.slots if isinstance(s, torch.Tensor)]
                assert all(s.shape[2] <= 2 for s in tensors)
                sizes.append(sum(s.numel() for s in tensors))
                reps.append(cache.slots.count(REP))
        assert sizes[2] == sizes[-1] and cache.pos == len(cache.slots)  # every slot visited every chunk
        # The decoder's two upsample3d mark 'Rep' after chunk 1 only; the encoder has none.
        assert reps == ([2, 0, 0, 0, 0, 0] if part is vae.decoder else [0] * 6)


# --- tiling --------------------------------------------------------------------------------------------------------


def test_tile_blending_is_exact_for_local_maps():
    x = torch.randn(1, 2, 3, 24, 40)

    def local(t):  # a position-wise map: any correct blend reproduces it exactly
        return F.interpolate(t.flatten(1, 2), scale_factor=8.0, mode="nearest").unflatten(1, (2, 3)) * 3 + 1

    for tile, overlap in [(8, 4), (16, 8), (16, 0), (24, 8)]:
        torch.testing.assert_close(_tiled(x, local, tile, overlap, scale=8), local(x), rtol=1e-6, atol=1e-6)


def test_tiles_spread_evenly_and_blend_exactly_when_downsampling():
    assert _tile_starts(480, 256, 32, 8) == [0, 224] and _tile_starts(832, 256, 32, 8) == [0, 192, 384, 576]
    for size, tile, overlap, align in [(480, 256, 32, 8), (832, 256, 32, 8), (60, 32, 4, 1), (200, 64, 8, 8), (33, 32, 0, 1)]:
        starts = _tile_starts(size, tile, overlap, align)
        assert starts[0] == 0 and starts[-1] == size - tile and all(s % align == 0 for s in starts[:-1])
        assert all(overlap <= a + tile - b for a, b in zip(starts, starts[1:]))  # every seam overlaps enough
    x = torch.randn(1, 3, 2, 48, 104)

    def local(t):  # position-wise at the 8x8-block level, like an encoder's downsampling: blends exactly
        return F.avg_pool2d(t.flatten(1, 2), 8).unflatten(1, (3, 2)) * 2 - 1

    torch.testing.assert_close(_tiled(x, local, 32, 8, scale=1 / 8), local(x), rtol=1e-6, atol=1e-6)


def test_tiled_close_to_untiled():
    torch.manual_seed(0)
    vae = WanVAE(VAE_CONFIGS["tiny"]).eval()
    perturb_(vae, seed=3)
    # Random weights make the network global (attention, huge receptive field), so a seam test needs a model
    # whose output is mostly local, as trained VAEs are: no attention mixing, damped residual branches.
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if ".proj." in name:
                p.zero_()
            if "residual.6" in name:
                p.mul_(0.1)
    for h, w in [(80, 80), (80, 136)]:  # 2x2 tiles; 2x4 tiles spread evenly (uneven overlaps, as at 480x832)
        video = torch.rand(1, 3, 5, h, w, generator=torch.Generator().manual_seed(4)) * 2 - 1
        latents = vae.encode(video)
        pixels = vae.decode(latents)
        enc_t = vae.encode(video, tile_size=64, tile_overlap=32)
        dec_t = vae.decode(latents, tile_size=64, tile_overlap=32)
        assert enc_t.shape == latents.shape and dec_t.shape == pixels.shape
        assert dec_t.abs().max() <= 1 and torch.isfinite(enc_t).all()
        enc, dec = rel_err(enc_t, latents), rel_err(dec_t, pixels)
        enc_mean = ((enc_t - latents).abs().mean() / latents.abs().mean()).item()
        dec_mean = ((dec_t - pixels).abs().mean() / pixels.abs().mean()).item()
        print(f"[vae tiling 64px/32px on {h}x{w}] encode max rel {enc:.3e} mean rel {enc_mean:.3e}; "
              f"decode max rel {dec:.3e} mean rel {dec_mean:.3e}")
        assert enc <= 0.08 and dec <= 0.08 and enc_mean <= 0.02 and dec_mean <= 0.02


def test_float16_clip_gives_the_same_8bit_frames():
    """The pipeline decodes into a float16 clip (half the clip-sized buffer): its uint8 frames match float32's."""
    from cinecli.output.video import frames_to_uint8

    torch.manual_seed(0)
    vae = WanVAE(VAE_CONFIGS["tiny"]).eval()
    perturb_(vae, seed=5)
    latents = torch.randn(1, vae.cfg.z_dim, 2, 10, 17, generator=torch.Generator().manual_seed(6))
    for tile in (None, 64):  # whole frames, and 2x3 blended tiles accumulated in float16
        full = vae.decode(latents, tile_size=tile, tile_overlap=32)
        half = vae.decode(latents, tile_size=tile, tile_overlap=32, dtype=torch.float16)
        assert half.dtype == torch.float16 and half.shape == full.shape
        assert (half.float() - full).abs().max() <= 2e-3  # float16 steps are 1/2048 near ±1
        levels = np.abs(frames_to_uint8(half[0]).astype(np.int16) - frames_to_uint8(full[0]).astype(np.int16))
        assert levels.max() <= 1 and (levels > 0).mean() < 0.01  # a rounding tie at most, on a few pixels


# --- mismatches ----------------------------------------------------------------------------------------------------


def test_mismatched_checkpoint_names_keys(reference):
    _, _, original, _ = reference
    broken = dict(original)
    del broken["decoder.head.2.bias"]
    broken["encoder.middle.1.to_qkv.weight"] = torch.zeros(5, 32, 1, 1)
    broken["decoder.extra.weight"] = torch.zeros(1)
    with pytest.raises(WeightsError) as err:
        load_vae(broken)
    msg = str(err.value)
    assert "\n" not in msg
    assert "decoder.head.2.bias" in msg and "encoder.middle.1.to_qkv.weight" in msg and "1 missing" in msg
    assert "decoder.extra.weight" in msg and "1 unexpected" in msg
    with pytest.raises(WeightsError, match="no Wan VAE"):
        load_vae({"blocks.0.weight": torch.zeros(1)})
    with pytest.raises(WeightsError, match="not found"):
        load_vae("/nonexistent/Wan2.1_VAE.pth")


# --- tiny VAE (TAEW2.1) ----------------------------------------------------------------------------------------------

# taew2_1 layout, written from the TAEHV graph: (kind, argument) per Sequential index.
DEC = [("clamp", None), ("conv", (256, 16)), ("relu", None), ("mem", 256), ("mem", 256), ("mem", 256), ("up", None),
       ("grow", (256, 1)), ("conv_nb", (128, 256)), ("mem", 128), ("mem", 128), ("mem", 128), ("up", None),
       ("grow", (128, 2)), ("conv_nb", (64, 128)), ("mem", 64), ("mem", 64), ("mem", 64), ("up", None),
       ("grow", (64, 2)), ("conv_nb", (64, 64)), ("relu", None), ("conv", (3, 64))]
ENC = [("conv", (64, 3)), ("relu", None), ("pool", (64, 2)), ("conv_s2", (64, 64)), ("mem", 64), ("mem", 64),
       ("mem", 64), ("pool", (64, 2)), ("conv_s2", (64, 64)), ("mem", 64), ("mem", 64), ("mem", 64),
       ("pool", (64, 1)), ("conv_s2", (64, 64)), ("mem", 64), ("mem", 64), ("mem", 64), ("conv", (16, 64))]


def synthetic_taew(seed: int = 0, tgrow7_rows: int = 512) -> dict[str, torch.Tensor]:
    """Random weights in the taew2_1.pth layout (decoder.7 stored with extra rows, as TAEHV's patch expects)."""
    gen = torch.Generator().manual_seed(seed)

    def w(*shape):
        fan_in = shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1)
        return torch.randn(*shape, generator=gen) * (0.8 / fan_in**0.5)

    sd = {}
    for part, layout in (("decoder", DEC), ("encoder", ENC)):
        for i, (kind, arg) in enumerate(layout):
            p = f"{part}.{i}."
            if kind == "conv":
                sd[p + "weight"], sd[p + "bias"] = w(arg[0], arg[1], 3, 3), 0.1 * torch.randn(arg[0], generator=gen)
            elif kind in ("conv_nb", "conv_s2"):
                sd[p + "weight"] = w(arg[0], arg[1], 3, 3)
            elif kind == "mem":
                for j, cin in ((0, 2 * arg), (2, arg), (4, arg)):
                    sd[f"{p}conv.{j}.weight"] = w(arg, cin, 3, 3)
                    sd[f"{p}conv.{j}.bias"] = 0.05 * torch.randn(arg, generator=gen)
            elif kind == "grow":
                rows = tgrow7_rows if i == 7 else arg[0] * arg[1]
                sd[p + "conv.weight"] = w(rows, arg[0], 1, 1)
            elif kind == "pool":
                sd[p + "conv.weight"] = w(arg[0], arg[0] * arg[1], 1, 1)
    return sd


def taehv_frame_by_frame(sd, part, layout, frames):
    """TAEHV semantics one frame at a time: MemBlock sees the previous frame's input, TGrow emits frames in
    order, TPool waits for ``stride`` frames. ``frames``: list of [B, C, H, W]; returns the list of outputs."""
    memory, pools, outs = {}, {}, []

    def run(i, x):
        while i < len(layout):
            kind, arg = layout[i]
            p = f"{part}.{i}."
            if kind == "clamp":
                x = torch.tanh(x / 3) * 3
            elif kind == "relu":
                x = F.relu(x)
            elif kind == "up":
                x = F.interpolate(x, scale_factor=2, mode="nearest")
            elif kind in ("conv", "conv_nb", "conv_s2"):
                x = F.conv2d(x, sd[p + "weight"], sd.get(p + "bias"), stride=2 if kind == "conv_s2" else 1, padding=1)
            elif kind == "mem":
                past = memory.get(i, torch.zeros_like(x))
                memory[i] = x
                h = torch.cat([x, past], 1)
                for j in (0, 2, 4):
                    h = F.conv2d(h, sd[f"{p}conv.{j}.weight"], sd[f"{p}conv.{j}.bias"], padding=1)
                    h = F.relu(h) if j < 4 else h
                x = F.relu(h + x)
            elif kind == "grow":
                c, stride = arg
                y = F.conv2d(x, sd[p + "conv.weight"][-c * stride:])  # last-timestep rows, as patch_tgrow_layers
                for j in range(stride):
                    run(i + 1, y[:, j * c : (j + 1) * c])
                return
            elif kind == "pool":
                c, stride = arg
                pools.setdefault(i, []).append(x)
                if len(pools[i]) < stride:
                    return
                x = F.conv2d(torch.cat(pools.pop(i), 1), sd[p + "conv.weight"])
            i += 1
        outs.append(x)

    for f in frames:
        run(0, f)
    return outs


def test_tiny_vae_decode_matches_frame_by_frame_reference(tmp_path):
    sd = synthetic_taew()
    torch.save(sd, tmp_path / "taew2_1.pth")
    save_file({k: (v[-256:] if k == "decoder.7.conv.weight" else v).contiguous() for k, v in sd.items()},
              tmp_path / "taew2_1.safetensors")
    latents = torch.randn(1, 16, 3, 4, 5, generator=torch.Generator().manual_seed(5))
    frames = taehv_frame_by_frame(sd, "decoder", DEC, list(latents.unbind(2)))
    expect = torch.stack(frames, 2)[:, :, 3:].clamp(0, 1) * 2 - 1  # drop 3 warm-up frames, [0,1] → [-1,1]
    assert (expect.abs() < 1).float().mean() > 0.3  # not saturated: the comparison means something
    errs = []
    for path, chunk in ((tmp_path / "taew2_1.pth", 1), (tmp_path / "taew2_1.safetensors", 2), (tmp_path, 3)):
        tiny = load_tiny_vae(path)  # a folder picks taew2_1.safetensors
        assert isinstance(tiny, TinyVAE) and tiny.cfg.with_encoder and tiny.dtype == torch.float32
        video = tiny.decode(latents, chunk=chunk)  # chunking must not change the result
        assert video.shape == (1, 3, 1 + 4 * (3 - 1), 32, 40)
        assert torch.isfinite(video).all() and video.min() >= -1 and video.max() <= 1
        errs.append(rel_err(video, expect))
    print(f"[tiny vae decode vs frame-by-frame reference] max rel {max(errs):.2e}")
    assert max(errs) <= 1e-5
    half = load_tiny_vae(sd, dtype="bf16").decode(latents)
    assert half.shape == expect.shape and torch.isfinite(half).all()
    print(f"[tiny vae bf16 vs reference] max |Δ| {(half - expect).abs().max().item():.3e}")
    assert (half - expect).abs().mean() < 0.05


def test_tiny_vae_encode_and_decoder_only(tmp_path):
    sd = synthetic_taew(seed=1)
    video = torch.rand(1, 3, 9, 32, 40, generator=torch.Generator().manual_seed(2)) * 2 - 1
    tiny = load_tiny_vae(sd)
    latents = tiny.encode(video, chunk=1)
    assert latents.shape == (1, 16, 3, 4, 5)
    x01 = (video + 1) / 2
    padded = list(x01.unbind(2)) + [x01[:, :, -1]] * 3  # TAEHV pads the end with the last frame to 4·n
    expect = torch.stack(taehv_frame_by_frame(sd, "encoder", ENC, padded), 2)
    assert rel_err(latents, expect) <= 1e-5 and rel_err(tiny.encode(video, chunk=8), latents) <= 1e-5
    decoder_only = {k: v for k, v in sd.items() if k.startswith("decoder.")}
    save_file({"taesd." + k: v for k, v in decoder_only.items()}, tmp_path / "tiny.safetensors")  # any prefix
    tiny = load_tiny_vae(tmp_path / "tiny.safetensors")
    assert not tiny.cfg.with_encoder and tiny.decode(latents).shape == (1, 3, 9, 32, 40)
    with pytest.raises(ValueError, match="without an encoder"):
        tiny.encode(video)
    del decoder_only["decoder.22.bias"]
    with pytest.raises(WeightsError, match="decoder.22.bias"):
        load_tiny_vae(decoder_only)


def test_a_16bit_vae_on_the_cpu_is_cast_once_and_memory_mapped(reference):
    """The official fp32 VAE run in bf16 on the CPU: converted once into cine's cache and mapped from there, so its
    pages can be dropped after each stage like the original's (not a private copy for the whole run)."""
    import os

    from cinecli.models.load import _file_mappings

    ref, paths, original, _ = reference
    a = load_vae(paths["original_pth"], dtype="bf16")
    cached = list((Path(os.environ["CINE_CACHE_DIR"]) / "vae").glob("*.bfloat16.*.safetensors"))
    assert len(cached) == 1
    stamp = cached[0].stat().st_mtime_ns
    b = load_vae(paths["original_pth"], dtype="bf16")
    assert cached[0].stat().st_mtime_ns == stamp  # reused, not rewritten
    direct = load_vae(ref.state_dict(), dtype="bf16")  # an in-memory cast: the same numbers
    assert all(torch.equal(v, direct.state_dict()[k]) for k, v in b.state_dict().items())
    maps = _file_mappings()
    big = [p for p in a.parameters() if p.numel() > 1000]
    assert big and all(any(lo <= p.data_ptr() < hi for lo, hi in maps) for p in big)
