"""Wan2.2-I2V-A14B: two experts (high noise, then low noise), no CLIP, on tiny random two-expert models on disk.

Facts checked against: LightX2V ``MultiDistillModelStruct`` (steps before ``boundary_step_index`` run the high-noise
expert) and ``configs/distill/wan22/wan_moe_i2v_distill_model.json``; Wan-Video/Wan2.2 ``wan/image2video.py`` (the
high-noise expert while the timestep t >= boundary·1000; ``y`` = the 4-channel mask ‖ the VAE latent of the photo
followed by zero frames; no ``clip_fea``) and ``wan/configs/wan_i2v_A14B.py`` (boundary 0.900, shift 5.0).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from typer.testing import CliRunner
from wan_fixtures import random_state_dict

from cinecli.cli.app import app
from cinecli.effects.preset import Catalog, SamplerSpec
from cinecli.generate.sampler import expert_schedule, rescale_boundary, sample
from cinecli.models.wan_dit import DIT_CONFIGS

CFG = replace(DIT_CONFIGS["tiny-i2v"], model_type="i2v-noclip")  # Wan2.2's expert shape, tiny: no img_emb, no k_img


def cine(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def write_expert(path: Path, seed: int, metadata: dict | None = None) -> Path:
    """A tiny expert as ComfyUI stores one (``model.diffusion_model.`` keys, bf16)."""
    sd = random_state_dict(CFG, seed)
    assert not any("img_emb" in k or "k_img" in k for k in sd)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({f"model.diffusion_model.{k}": v.to(torch.bfloat16).contiguous() for k, v in sd.items()}, path, metadata)
    return path


def write_lora(path: Path, seed: int, module: str = "blocks.0.self_attn.q", rank: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    sd = {f"diffusion_model.{module}.lora_down.weight": torch.randn(rank, CFG.dim, generator=g) * 0.1,
          f"diffusion_model.{module}.lora_up.weight": torch.randn(CFG.dim, rank, generator=g) * 0.1}
    save_file(sd, path)
    return sd


@pytest.fixture(scope="module")
def stack(tmp_path_factory) -> Path:
    """The self-test's VAE, umT5 and tokenizer beside two tiny experts named as ComfyUI names them."""
    from cinecli.generate.selftest import write_backbone

    root = tmp_path_factory.mktemp("wan22")
    write_backbone(root / "selftest")
    write_expert(root / "experts" / "wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors", seed=1)
    write_expert(root / "experts" / "wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors", seed=2)
    return root


def preset_file(root: Path, tmp_path: Path, sampler: str = "", effect: str = "") -> Path:
    s = root / "selftest"
    path = tmp_path / "w22.toml"
    path.write_text(
        'name = "w22"\nprompt = "the camera orbits around the frozen subject"\nframes = 9\nfps = 8\nmax_area = 4096\n'
        + (f"effect = {effect}\n" if effect else "") + "\n"
        '[backbone]\nname = "tiny-wan22"\nmodel_type = "i2v-noclip"\n'
        f'dit = {{ path = "{root}/experts/wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors" }}\n'
        f'dit_low_noise = {{ path = "{root}/experts/wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors" }}\n'
        f'vae = {{ path = "{s}/Wan2.1_VAE.pth" }}\ntext_encoder = {{ path = "{s}/text_encoder" }}\n'
        f'tokenizer = {{ path = "{s}/tokenizer" }}\ntiny_vae = {{ path = "{s}/taew2_1.pth" }}\n'
        + (sampler or 'sampler = { kind = "distill", timesteps = [1000, 750, 500, 250], shift = 5.0, boundary_step_index = 2 }\n'))
    return path


def generator(preset, **kw):
    from cinecli.generate.pipeline import Generator
    from cinecli.weights.hub import resolve_all

    return Generator(preset.backbone, resolve_all(preset.weights(), "test"), torch.device("cpu"), torch.bfloat16,
                     vae_tile=None, **kw)


def run(gen, preset, seed: int = 3):
    from cinecli.generate.pipeline import Request, plan
    from cinecli.generate.selftest import sample_image

    image = sample_image(96, 64)
    request = Request(image="photo.png", preset=preset, seed=seed)
    return gen.generate(request, plan(request, image.size), image)


def record_experts(gen, monkeypatch) -> list[tuple[str, float]]:
    """(expert, timestep) of every DiT forward the generator makes."""
    from cinecli.models.wan_dit import WanDiT

    calls, forward = [], WanDiT.forward

    def spy(self, x, t, *a, **kw):
        name = next(n for n, m in gen._experts.models.items() if m is self)
        calls.append((name, float(t.reshape(-1)[0])))
        return forward(self, x, t, *a, **kw)

    monkeypatch.setattr(WanDiT, "forward", spy)
    return calls


# --- the switch ---------------------------------------------------------------------------------------------------
def recorded(spec: SamplerSpec) -> list[tuple[str, float]]:
    calls = []

    def model(name):
        return lambda x, t, cond: calls.append((name, float(t[0]))) or torch.zeros_like(x)

    sample(model("high_noise"), spec, (1, 16, 1, 2, 2), torch.Generator().manual_seed(0), torch.device("cpu"),
           low_noise=model("low_noise"))
    return calls


def test_distilled_list_switches_at_boundary_step_index():
    """LightX2V's 4-step experts: steps 1-2 on the high-noise expert, 3-4 on the low-noise one, one call each."""
    spec = SamplerSpec(kind="distill", timesteps=(1000, 750, 500, 250), shift=5.0, boundary_step_index=2)
    calls = recorded(spec)
    assert [name for name, _ in calls] == ["high_noise", "high_noise", "low_noise", "low_noise"]
    assert expert_schedule(spec) == [name for name, _ in calls]
    # the model sees the shifted timesteps σ'·1000 (σ' = 5σ/(1 + 4σ)), σ = t/1000 of the list
    assert [round(t, 1) for _, t in calls] == [1000.0, 937.5, 833.3, 625.0]
    # --steps 8 on the distilled list keeps the switch at the same share of the schedule
    eight = replace(rescale_boundary(spec, 8), timesteps=tuple(1000 * (1 - i / 8) for i in range(8)))  # as plan() does
    assert expert_schedule(eight) == ["high_noise"] * 4 + ["low_noise"] * 4
    # a preset's own sampler table without a switch keeps the backbone's, at the same share
    orbit = Catalog().resolve("orbit")
    assert orbit.effective_sampler.boundary_step_index == 2
    assert replace(orbit, sampler=SamplerSpec(kind="euler", steps=40)).effective_sampler.boundary_step_index == 20


def test_timestep_boundary_0900_as_wan22_image2video():
    """Wan2.2's rule: high noise while t >= 0.900·1000. Flow Euler, 40 steps, shift 5: σ' = 5σ/(1 + 4σ) ≥ 0.9
    ⟺ σ ≥ 0.9/1.4, and σ_i = 1 − i/40, so steps i = 0…14 (15 of them) are high noise."""
    spec = SamplerSpec(kind="euler", steps=40, shift=5.0, guidance=1.0, boundary=0.9)
    calls = recorded(spec)
    assert [name for name, _ in calls] == ["high_noise"] * 15 + ["low_noise"] * 25
    assert all((t >= 900) == (name == "high_noise") for name, t in calls)
    # a step exactly at the boundary stays high noise (>=): shift 1 feeds the listed timesteps as they are
    exact = SamplerSpec(kind="distill", timesteps=(1000, 900, 899.9, 500), shift=1.0, boundary=0.9)
    assert [name for name, _ in recorded(exact)] == ["high_noise", "high_noise", "low_noise", "low_noise"]


def test_unipc_boundary_uses_its_integer_timesteps():
    pytest.importorskip("diffusers")
    from cinecli.generate.sampler import unipc_scheduler

    spec = SamplerSpec(kind="unipc", steps=40, shift=5.0, guidance=3.5, boundary=0.9)  # wan_i2v_A14B.py's settings
    timesteps = [int(t) for t in unipc_scheduler(spec).timesteps]
    calls = recorded(spec)
    assert [t for _, t in calls[::2]] == timesteps  # CFG: two calls a step, both on the step's expert
    assert [name for name, _ in calls[::2]] == ["high_noise" if t >= 900 else "low_noise" for t in timesteps]
    assert [name for name, _ in calls[::2]] == [name for name, _ in calls[1::2]]
    assert 0 < [name for name, _ in calls].count("high_noise") < len(calls)


def test_pipeline_runs_each_expert_on_its_steps_and_parks_the_other(stack, tmp_path, monkeypatch):
    from cinecli.models.experts import Experts

    preset = Catalog(extra_preset=preset_file(stack, tmp_path)).resolve(None)
    assert preset.backbone.experts == ("high_noise", "low_noise") and preset.backbone.image_encoder is None
    gen = generator(preset)
    gen.experts  # noqa: B018 - loads both
    parked, park = [], Experts.park
    monkeypatch.setattr(Experts, "park", lambda self, name: parked.append(name) or park(self, name))
    calls = record_experts(gen, monkeypatch)
    run(gen, preset)
    assert [name for name, _ in calls] == ["high_noise", "high_noise", "low_noise", "low_noise"]
    assert parked == ["high_noise"]  # the high-noise expert's pages leave at the switch (CPU)
    run(gen, preset)  # a second video in the same process starts on the high-noise expert again
    assert [name for name, _ in calls[4:]] == ["high_noise", "high_noise", "low_noise", "low_noise"]


# --- conditioning without CLIP --------------------------------------------------------------------------------------
def test_conditioning_is_the_reference_y_and_no_clip(stack, tmp_path, monkeypatch):
    """wan/image2video.py: msk = ones(1, F, h, w) with frames 1… zeroed, frame 0 repeated 4×, viewed [1, F_lat, 4, h,
    w] and transposed to [4, F_lat, h, w]; y = msk ‖ vae.encode([photo, zeros(3, F−1, H, W)]); no clip_fea."""
    from cinecli.generate.image import fit_image, to_tensor
    from cinecli.generate.selftest import sample_image
    from cinecli.models.wan_dit import WanDiT

    preset = Catalog(extra_preset=preset_file(stack, tmp_path)).resolve(None)
    gen = generator(preset)
    seen = {}
    prepare, forward = WanDiT.prepare_context, WanDiT.forward
    monkeypatch.setattr(WanDiT, "prepare_context", lambda self, c, clip_fea=None: seen.setdefault("clip", []).append(clip_fea)
                        or prepare(self, c, clip_fea))
    monkeypatch.setattr(WanDiT, "forward", lambda self, x, t, ctx, clip_fea=None, y=None: (seen.setdefault("y", y),
                                                                                         forward(self, x, t, ctx, clip_fea, y))[1])
    run(gen, preset)
    assert gen._clip is None and all(c is None for c in seen["clip"])  # no image encoder loaded, no CLIP features
    assert not hasattr(gen.dit, "img_emb") and not hasattr(gen.dit.blocks[0].cross_attn, "k_img")

    frames, height, width = 9, seen["y"].shape[-2] * 8, seen["y"].shape[-1] * 8  # the plan's frame (its own tests)
    photo = to_tensor(fit_image(sample_image(96, 64), (width, height), "crop"))  # [3, H, W] in [-1, 1]
    video = torch.cat([photo[:, None], torch.zeros(3, frames - 1, height, width)], dim=1)
    with torch.no_grad():
        latent = gen.vae.encode(video[None], tile_size=None)[0].float()  # [16, F_lat, h, w]
    lat_h, lat_w = height // 8, width // 8
    msk = torch.ones(1, frames, lat_h, lat_w)
    msk[:, 1:] = 0
    msk = torch.cat([msk[:, :1].repeat_interleave(4, dim=1), msk[:, 1:]], dim=1)
    msk = msk.view(1, msk.shape[1] // 4, 4, lat_h, lat_w).transpose(1, 2)[0]
    want = torch.cat([msk, latent])  # [20, F_lat, h, w]
    assert seen["y"].shape == (1, 20, 3, lat_h, lat_w) and torch.equal(seen["y"][0].float(), want)


# --- memory: streamed = resident, one expert at a time, quantized once each -----------------------------------------
def test_streamed_and_resident_experts_are_bit_identical_on_the_cpu(stack, tmp_path):
    preset = Catalog(extra_preset=preset_file(stack, tmp_path)).resolve(None)
    resident = run(generator(preset), preset)
    gen = generator(preset, stream_blocks=True)
    streamed = run(gen, preset)
    assert all(m.block_stream is not None for m in gen.experts.models.values())  # PagedBlocks: pages per block
    assert torch.equal(resident, streamed)


def test_quantize_once_caches_each_expert(stack, tmp_path, monkeypatch):
    monkeypatch.setenv("CINE_CACHE_DIR", str(tmp_path / "cache"))
    preset = Catalog(extra_preset=preset_file(stack, tmp_path)).resolve(None)
    first = run(generator(preset, quantize="int8"), preset)
    files = sorted(p.name for p in (tmp_path / "cache" / "dit").glob("*.safetensors"))
    assert len(files) == 2 and "high_noise" in files[0] and "low_noise" in files[1]
    mtimes = [p.stat().st_mtime_ns for p in (tmp_path / "cache" / "dit").glob("*.safetensors")]
    assert torch.equal(run(generator(preset, quantize="int8"), preset), first)  # the second run maps the cache
    assert [p.stat().st_mtime_ns for p in (tmp_path / "cache" / "dit").glob("*.safetensors")] == mtimes


def test_plan_holds_one_expert_not_two():
    """Peak = one expert + the rest: on the CPU and resident on a GPU the denoise steps of two experts need what
    one expert's do on the device; the idle expert waits on the host (GPU) or is not in memory at all (CPU)."""
    from cinecli.plan.inputs import dit_sizes, text_encoder_params, vae_params
    from cinecli.plan.memory import GiB, Job, Machine, make_plan

    base = Job(dit=dit_sizes("wan2.2-i2v-a14b"), frames=81, width=832, height=480, steps=4,
               text_encoder_bytes=text_encoder_params(None), image_encoder_bytes=0, vae_bytes=vae_params(None) * 4,
               default_recipe="hybrid", prompt_cached=True)
    two = replace(base, experts=2)
    for m in (Machine("cpu", 64 * GiB, 64 * GiB), Machine("cuda", 40 * GiB, 128 * GiB), Machine("cuda", 12 * GiB, 128 * GiB)):
        one_plan, two_plan = make_plan(base, m), make_plan(two, m)
        assert (one_plan.dit, one_plan.quantize) == (two_plan.dit, two_plan.quantize)
        step = lambda p: next(s for s in p.stages if s.stage == "denoise step 3/4")  # noqa: E731
        expert = two_plan.dit_bytes
        assert step(two_plan).device_peak_bytes - step(one_plan).device_peak_bytes < 0.1 * expert  # not + one expert
        if m.device == "cuda":  # the idle expert: its blocks (streamed) or all of it (resident) in host memory
            assert step(two_plan).host_peak_bytes - step(one_plan).host_peak_bytes >= 0.95 * expert
        assert two_plan.to_json()["experts"] == 2 and "image encode" not in {s.stage for s in two_plan.stages}


# --- LoRAs ------------------------------------------------------------------------------------------------------------
def test_pair_lora_reaches_its_expert_and_a_single_file_only_the_named_ones(stack, tmp_path):
    high = write_lora(tmp_path / "fx_high_noise.safetensors", seed=10)
    low = write_lora(tmp_path / "fx_low_noise.safetensors", seed=11)
    card = ('{ name = "fx", high_noise = { path = "fx_high_noise.safetensors" }, low_noise = { path = '
            '"fx_low_noise.safetensors" }, fits_dims = [256], model_types = ["i2v-noclip"] }')
    preset = Catalog(extra_preset=preset_file(stack, tmp_path, effect=card)).resolve(None)
    assert set(preset.weights()) >= {"effect:fx", "effect:fx:low_noise"}
    gen = generator(preset)
    gen.use_effect(preset)
    key = "blocks.0.self_attn.q"
    for expert, sd in (("high_noise", high), ("low_noise", low)):
        effects = gen._effects[expert]
        assert effects.active == "fx@1"
        layer = gen.experts.models[expert].get_submodule(key)
        assert torch.allclose(layer.lora_A["fx@1"].weight.float(), sd[f"diffusion_model.{key}.lora_down.weight"], atol=1e-2)
    a = gen.experts.models["high_noise"].get_submodule(key).lora_A["fx@1"].weight
    b = gen.experts.models["low_noise"].get_submodule(key).lora_A["fx@1"].weight
    assert not torch.allclose(a, b)  # each expert got its own file

    write_lora(tmp_path / "late.safetensors", seed=12)
    single = ('{ name = "late", source = { path = "late.safetensors" }, experts = ["low_noise"], fits_dims = [256], '
              'model_types = ["i2v-noclip"] }')
    preset = Catalog(extra_preset=preset_file(stack, tmp_path, effect=single)).resolve(None)
    gen = generator(preset)
    gen.use_effect(preset)
    assert gen._effects["low_noise"].active == "late@1" and gen._effects["high_noise"].active is None
    assert not gen._effects["high_noise"].loaded  # the high-noise expert runs bare: nothing attached to it
    assert not hasattr(gen.experts.models["high_noise"].get_submodule(key), "lora_A")


def test_a_half_pair_card_is_refused(stack, tmp_path):
    card = '{ name = "half", high_noise = { path = "a.safetensors" } }'
    r = cine("run", tmp_path / "x.png", "--preset", preset_file(stack, tmp_path, effect=card), "--dry-run")
    assert r.exit_code == 2 and "names both files" in r.stderr and len(r.stderr.strip().splitlines()) == 1


# --- --dry-run and models scan ----------------------------------------------------------------------------------------
def test_dry_run_offline_names_both_experts(env, photo):
    r = cine("orbit", photo, "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    w = doc["weights"]
    assert doc["backbone"] == "wan2.2-i2v-a14b-4step-720p" and "image_encoder" not in w
    assert "high_noise_lightx2v_4step_720p" in w["dit"]["ref"] and "low_noise_lightx2v_4step_720p" in w["dit_low_noise"]["ref"]
    assert not w["dit"]["present"] and not w["dit_low_noise"]["present"] and w["dit_low_noise"]["bytes"] > 28e9
    assert doc["experts"] == {"high_noise": [1, 2], "low_noise": [3, 4]} and doc["sampler"]["boundary_step_index"] == 2
    assert doc["plan"]["experts"] == 2 and doc["plan"]["quantize"] == "hybrid" and doc["dit_bytes"] < 13e9  # one expert
    assert "image encode" not in {s["stage"] for s in doc["plan"]["stages"]}
    text = cine("slowmo", photo, "--backbone", "wan2.2-i2v-a14b-4step", "--dry-run")
    assert text.exit_code == 0
    assert "dit (high noise)" in text.stderr and "dit (low noise)" in text.stderr
    assert "wan2.2_i2v_A14b_high_noise_lightx2v_4step.safetensors" in text.stderr
    assert "wan2.2_i2v_A14b_low_noise_lightx2v_4step.safetensors" in text.stderr
    assert "high noise steps 1-2, low noise steps 3-4" in text.stderr and "no CLIP" in text.stderr
    wan21 = cine("bullet-time", photo, "--backbone", "wan2.2-i2v-a14b-4step", "--dry-run")  # a Wan2.1 effect LoRA
    assert wan21.exit_code == 2 and "do not carry over" in wan21.stderr and len(wan21.stderr.strip().splitlines()) == 1


def test_scan_tells_the_experts_apart_and_a_comfyui_folder_serves_them(env, stack, photo, tmp_path):
    from cinecli.models.scan import identify

    found = {p.name: identify(p) for p in (stack / "experts").iterdir()}
    assert {f.info["expert"] for f in found.values()} == {"high_noise", "low_noise"}
    assert all(f.kind == "dit" and "Wan2.2 i2v" in f.label for f in found.values())
    plain = write_expert(tmp_path / "unnamed" / "model.safetensors", seed=3)
    assert identify(plain).info["expert"] is None and "high_noise or low_noise" in identify(plain).label
    tagged = write_expert(tmp_path / "unnamed" / "other.safetensors", seed=4, metadata={"expert": "low_noise"})
    assert identify(tagged).info["expert"] == "low_noise"  # the metadata tells, whatever the name

    r = cine("orbit", photo, "--dry-run", "--json", "--models-dir", stack / "experts")
    doc = json.loads(r.stdout)
    assert r.exit_code == 0 and doc["weights"]["dit"]["source"] == "models dir"
    assert doc["weights"]["dit"]["path"].endswith("wan2.2_i2v_high_noise_14B_fp8_scaled.safetensors")
    assert doc["weights"]["dit_low_noise"]["path"].endswith("wan2.2_i2v_low_noise_14B_fp8_scaled.safetensors")
    listing = cine("models", "scan", stack / "experts")
    assert listing.exit_code == 0 and "high-noise expert" in listing.stdout and "low-noise expert" in listing.stdout


@pytest.mark.parametrize("streamed", [False, True])
def test_an_emulated_gpu_holds_one_expert_at_a_time(streamed, stack, tmp_path, monkeypatch):
    """CUDA (emulated): at every DiT call exactly one expert is on the device. Resident experts trade places at
    the switch (the idle one's weights go to the host); streamed ones keep their blocks on the host and the idle
    one's two device slots are given back."""
    from cinecli.core.devices import choose_device
    from cinecli.generate.pipeline import Generator
    from cinecli.models import experts as experts_module
    from cinecli.models.wan_dit import WanDiT
    from cinecli.weights.hub import resolve_all

    monkeypatch.setenv("CINE_EMULATE_DEVICE", "cuda")
    device = choose_device("cuda")  # the emulated device: CPU memory under CUDA's rules, a device of its own
    preset = Catalog(extra_preset=preset_file(stack, tmp_path)).resolve(None)
    gen = Generator(preset.backbone, resolve_all(preset.weights(), "test"), device, torch.bfloat16, vae_tile=None,
                    stream_blocks=streamed)
    seen, forward = [], WanDiT.forward

    def where(model) -> tuple[str, str]:
        """(the block weights' device, the blocks' slots: "slots" when a streamed expert holds device slots)"""
        stream = model.block_stream
        slots = "slots" if stream is not None and any(s is not None for s in getattr(stream, "slots", [])) else "-"
        return str(model.blocks[0].ffn[0].weight.device), slots

    def spy(self, *a, **kw):
        seen.append({name: where(m) for name, m in gen._experts.models.items()})
        return forward(self, *a, **kw)

    monkeypatch.setattr(WanDiT, "forward", spy)
    moves, move = [], experts_module._move  # whole-expert copies between the host and the device
    monkeypatch.setattr(experts_module, "_move", lambda model, to: moves.append(
        (next(n for n, m in gen._experts.models.items() if m is model), "host" if to.type == "cpu" and to.index is None
         else "device")) or move(model, to))
    run(gen, preset)
    run(gen, preset)  # the next video: the high-noise expert comes back
    assert len(seen) == 8 and gen.experts.switches == 3
    order = ["high_noise", "high_noise", "low_noise", "low_noise"] * 2
    for active, state in zip(order, seen):
        idle = "low_noise" if active == "high_noise" else "high_noise"
        if streamed:  # blocks wait on the host; only the expert that runs may hold device slots
            assert state[idle][1] == "-", state
    if streamed:
        assert moves == []
    else:  # one expert on the device at a time: the idle one leaves before the other arrives
        assert moves == [("high_noise", "device"), ("high_noise", "host"), ("low_noise", "device"),
                         ("low_noise", "host"), ("high_noise", "device"), ("high_noise", "host"), ("low_noise", "device")]
