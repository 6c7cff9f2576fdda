"""The memory plan: choices for a table of machines and jobs, the one-line refusal (exit 7) and --dry-run sizes.

Expected plans below were worked out by hand from the sizes the planner uses (GiB): 14B DiT hybrid 12.82
(streamed: 0.86 = outside the blocks + two blocks), compact 10.07, none 30.54 (streamed 1.95); 1.3B none 2.92;
umT5-XXL 10.58 + 0.5 activations = 11.08; CLIP ViT-H 1.14 + VAE 0.47 = 1.61 resident next to the DiT on a GPU.
Activations of one step (16-bit, token-chunked blocks): 14B 480p 17/49/81 frames 0.94/1.68/2.49, 720p 81 frames
5.26; 1.3B 480p 49/81 frames 0.60/0.88, 720p 81 frames 1.84. VAE (480p): encode 6.76 (49 f) / 6.90 (81 f) whole,
1.29 / 1.43 in 256-px tiles; decode 7.87 / 8.01 whole, 1.47 / 1.62 tiled; 720p 81 frames: encode 15.9, decode
18.5 whole, 1.9 / 2.1 tiled. On a CPU each stage holds only its own component's pages plus the process (0.25).
GPUs are given their size less 0.4 GiB the driver and display keep.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from cinecli.cli.app import app
from cinecli.core.sizes import parse_size
from cinecli.generate.selftest import sample_image
from cinecli.plan import memory as mp
from cinecli.plan.inputs import dit_sizes, image_encoder_params, text_encoder_params, vae_params
from cinecli.plan.memory import GiB, Job, Machine, NoFit, advice, make_plan

SIZES = {"480p": (832, 480), "720p": (1280, 720)}


def job(model: str, frames: int, size: str = "480p", **kw) -> Job:
    width, height = SIZES[size]
    big = model == "14b"
    base = dict(dit=dit_sizes("wan2.1-i2v-14b" if big else "wan2.1-fun-1.3b-inp"), frames=frames, width=width,
                height=height, steps=4, text_encoder_bytes=text_encoder_params(None) * 2,
                image_encoder_bytes=image_encoder_params(None) * 2, vae_bytes=vae_params(None) * 4,
                default_recipe="hybrid" if big else "none")
    return Job(**{**base, **kw})


def gpu(size_gb: float, host_gb: float = 64) -> Machine:
    return Machine("cuda", int((size_gb - 0.4) * GiB), int(host_gb * GiB))


def cpu(host_gb: float) -> Machine:
    return Machine("cpu", int(host_gb * GiB), int(host_gb * GiB))


# (job, machine) → (dit, quantize, text_encoder, vae_decode)
TABLE = [
    # 14B default (hybrid first), 480p 49 frames, on the GPUs people have
    (("14b", 49), gpu(80), ("resident", "hybrid", "device", "whole")),  # 22.3 at decode
    (("14b", 49), gpu(24), ("resident", "hybrid", "device", "whole")),  # 22.3 ≤ 23.6
    (("14b", 49), gpu(16), ("streamed", "hybrid", "device", "whole")),  # resident step 17.6 > 15.6; streamed 10.3
    (("14b", 49), gpu(12), ("streamed", "hybrid", "device", "whole")),  # decode 10.3, umT5 11.08 ≤ 11.6
    (("14b", 49), gpu(8), ("streamed", "hybrid", "cpu", "tiled")),  # encode whole 9.2 > 7.6; umT5 to the CPU
    (("14b", 49), gpu(8, host_gb=16), ("streamed", "hybrid", "cpu", "tiled")),  # host: 12.8 of blocks, 11.1 umT5
    (("14b", 17), gpu(8), ("streamed", "hybrid", "cpu", "tiled")),
    (("14b", 81), gpu(8), ("streamed", "hybrid", "cpu", "tiled")),  # step 0.86 + 1.61 + 4.95 = 7.43 ≤ 7.6
    (("14b", 81, "720p"), gpu(24), ("resident", "hybrid", "device", "tiled")),  # step 12.82+1.61+5.26; whole decode 32.9
    (("14b", 49, "480p", {"prompt_cached": True}), gpu(8), ("streamed", "hybrid", "cached", "tiled")),
    (("14b", 49, "480p", {"pinned_recipe": "none"}), gpu(24), ("streamed", "none", "device", "whole")),  # 30.5 resident
    (("14b", 49, "480p", {"offload": "blocks"}), gpu(80), ("streamed", "hybrid", "device", "whole")),  # --offload blocks
    # CPU boxes: the device is host RAM
    (("14b", 49), cpu(64), ("resident", "hybrid", "cpu", "whole")),
    (("14b", 49), cpu(32), ("resident", "hybrid", "cpu", "whole")),  # decode 22.3 ≤ 32
    (("14b", 49), cpu(16), ("resident", "hybrid", "cpu", "whole")),  # step 0.25+12.82+1.68 = 14.8 ≤ 16; no CLIP/VAE
    (("1.3b", 49), cpu(16), ("resident", "none", "cpu", "whole")),  # decode 0.25 + 0.27 (decoder) + 7.87 = 8.4
    (("1.3b", 49, "480p", {"prompt_cached": True}), cpu(2), ("streamed", "none", "cached", "tiled")),  # paged: 1 block
    # 1.3B (no recipe by default: none first)
    (("1.3b", 81), gpu(8), ("resident", "none", "cpu", "tiled")),  # encode whole 11.4 > 7.6
    (("1.3b", 49), gpu(12), ("resident", "none", "device", "tiled")),  # decode whole 12.4 > 11.6
    (("1.3b", 81, "720p"), gpu(16), ("resident", "none", "device", "tiled")),  # encode whole 20.4 > 15.6; tiled 7.5
    (("1.3b", 81, "720p"), gpu(80), ("resident", "none", "device", "whole")),
]


@pytest.mark.parametrize("case, machine, expected", TABLE, ids=[f"{c[0]}-{c[1]}f-{m.device}{round(m.device_bytes / GiB)}"
                                                               f"-host{round(m.host_bytes / GiB)}-{i}" for i, (c, m, _) in enumerate(TABLE)])
def test_planner_table(case, machine, expected):
    model, frames, *rest = case
    size = rest[0] if rest else "480p"
    extra = rest[1] if len(rest) > 1 else {}
    plan = make_plan(job(model, frames, size, **extra), machine)
    assert (plan.dit, plan.quantize, plan.text_encoder, plan.vae_decode) == expected
    assert max(s.device_peak_bytes for s in plan.stages) <= machine.device_cap
    assert [s.stage for s in plan.stages][-1] == "vae decode" and "denoise step 4/4" in [s.stage for s in plan.stages]


def test_nothing_fits_names_what_would():
    j, m = job("14b", 81, "720p"), gpu(6)  # streamed: 0.86 of blocks + 1.61 CLIP and VAE + a 5.26 step > 5.6
    with pytest.raises(NoFit) as err:
        make_plan(j, m)
    line = advice(j, m, err.value)
    assert "denoise step" in line and "--frames " in line and "smaller size" in line and "--memory-budget" in line
    frames = int(line.split("--frames ")[1].split(",")[0])
    make_plan(job("14b", frames, "720p"), m)  # the advice is true: that many frames fit
    assert frames < 81


def test_estimates_track_frames_size_and_recipe():
    peak = lambda j, m=gpu(80): make_plan(j, m).peak()  # noqa: E731
    assert peak(job("14b", 17)) < peak(job("14b", 49)) < peak(job("14b", 81)) < peak(job("14b", 81, "720p"))
    pinned = {r: peak(job("14b", 49, pinned_recipe=r)) for r in ("none", "fp8", "hybrid", "compact")}
    assert pinned["none"] > pinned["fp8"] > pinned["hybrid"] > pinned["compact"]
    assert dit_sizes("wan2.1-i2v-14b")["hybrid"].total / 1e9 == pytest.approx(13.8, abs=0.1)  # ~13 GB hybrid DiT
    bf16 = dit_sizes("wan2.1-i2v-14b")["none"].total  # 16.39 B parameters in bf16, norms and modulation in fp32
    assert 2 * 16_394_878_784 < bf16 < 2 * 16_394_878_784 * 1.001


def test_parse_size():
    assert parse_size("8GB") == 8 * 10**9 and parse_size("8G") == parse_size("8GiB") == 8 * GiB
    assert parse_size("512M") == 512 << 20 and parse_size("1000") == 1000 and parse_size("eight") is None


# --- through the CLI ---------------------------------------------------------------------------------------------------
def cine(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def photo(tmp_path):
    path = tmp_path / "portrait.png"
    sample_image(96, 64).save(path)
    return path


@pytest.fixture
def roomy(monkeypatch):
    """A CPU box with 64 GiB free, whatever this machine has."""
    import cinecli.core.devices as devices

    monkeypatch.setattr(devices, "device_memory", lambda device: (64 * GiB, 64 * GiB))


def test_too_small_budget_exits_7_before_anything_loads(backbone, env, photo, tmp_path, monkeypatch, roomy):
    import cinecli.models as models
    import cinecli.weights.hub as hub

    def boom(*a, **k):
        raise AssertionError("a download or a model load was attempted")

    for mod, name in ((models, "load_dit"), (hub, "resolve_all"), (hub, "download")):
        monkeypatch.setattr(mod, name, boom)
    out = tmp_path / "x.mp4"
    r = cine("run", photo, "--preset", backbone, "-o", out, "--memory-budget", "2MB")
    assert r.exit_code == 7, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cine: error: this job does not fit on cpu") and "would fit with" in lines[0]
    assert not out.exists()
    monkeypatch.setenv("CINE_MEMORY_BUDGET", "2MB")  # the environment variable caps the same way
    assert cine("run", photo, "--preset", backbone, "-o", out).exit_code == 7
    r = cine("run", photo, "--preset", backbone, "-o", out, "--dry-run", "--json")  # a script asking "would it fit?"
    doc = json.loads(r.stdout)
    assert r.exit_code == 7 and doc["exit_code"] == 7 and doc["plan"] is None and "does not fit" in doc["error"]
    assert doc["frames"] and doc["weights"] and len(r.stderr.strip().splitlines()) == 1


def test_batch_follows_the_memory_plan(backbone, env, photo, tmp_path, monkeypatch):
    """cine batch plans once per backbone: a budget that fits nothing fails each item with the plan's advice, and a
    budget that needs tiles gets the plan's tile side."""
    import cinecli.generate.pipeline as pipeline

    monkeypatch.setenv("CINE_MEMORY_BUDGET", "2MB")
    r = cine("batch", photo, "--preset", backbone, "-o", tmp_path / "out")
    assert r.exit_code == 8, r.output
    manifest = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert manifest and all(rec["status"] == "failed" and "does not fit" in rec["error"] for rec in manifest)
    monkeypatch.delenv("CINE_MEMORY_BUDGET")
    seen = []
    original = pipeline.Generator.generate
    monkeypatch.setattr(pipeline.Generator, "generate", lambda self, *a: seen.append(self.vae_tile) or original(self, *a))
    r = cine("batch", photo, "--preset", backbone, "-o", tmp_path / "out2")
    assert r.exit_code == 0, r.output
    assert seen == [None]  # the tiny self-test clip fits whole (the Generator's own default is 256-px tiles)


def test_dry_run_with_missing_weights_shows_real_sizes(env, photo, roomy):
    r = cine("bullet-time", photo, "--dry-run", "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    w = doc["weights"]
    assert not w["dit"]["present"] and w["dit"]["bytes"] > 30e9  # the 4-step bf16 single file, declared size
    assert "lightx2v/Wan2.1-Distill-Models" in w["dit"]["ref"] and "lora:lightx2v-i2v-480p-4step" not in w
    assert 40e9 < doc["download_bytes"] < 60e9  # tens of GB, not 0 B
    assert doc["plan"]["quantize"] == "hybrid" and 12e9 < doc["dit_bytes"] < 14.5e9  # ~13 GB hybrid DiT
    assert set(doc["plan"]) == {"dit", "quantize", "text_encoder", "vae_decode", "vae_tile", "chunking", "stages",
                                "frames", "delivered_frames", "output_frames"}
    assert doc["plan"]["frames"] == doc["plan"]["delivered_frames"] == doc["plan"]["output_frames"] == 49
    stages = {s["stage"]: s for s in doc["plan"]["stages"]}
    assert {"text encode", "load dit", "vae encode", "denoise step 1/4", "vae decode"} <= set(stages)
    # first run: converted layer by layer as it is written (the largest layer, 5120×13824, and its temporaries),
    # not the 32.8 GB source mapped next to a 13.8 GB converted copy
    assert 0.5e9 < stages["load dit"]["host_peak_bytes"] < 3e9
    text = cine("bullet-time", photo, "--dry-run")
    assert "MISSING    32.8 GB" in text.stderr and "memory plan on cpu: DiT hybrid (13.8 GB)" in text.stderr  # GB = 10⁹
    chunking = doc["plan"]["chunking"]  # the plan says how attention splits its queries, and why
    assert f"chunking {chunking} ({mp.CHUNKING_SAYS[chunking]})" in text.stderr


def test_official_backbone_stays_available(env, photo, roomy):
    doc = json.loads(cine("bullet-time", photo, "--dry-run", "--json", "--backbone", "wan2.1-i2v-14b-480p-official").stdout)
    assert "Wan-AI/Wan2.1-I2V-14B-480P/diffusion_pytorch_model.safetensors.index.json" in doc["weights"]["dit"]["ref"]
    assert "lora:lightx2v-i2v-480p-4step" in doc["weights"] and doc["plan"]["quantize"] == "none"
    assert doc["download_bytes"] > 80e9  # before: ~83 GB with the encoders and the distill LoRA
    # Quantized at load, its first run holds the whole merged bf16 model before converting it: the plan says so.
    doc = json.loads(cine("bullet-time", photo, "--dry-run", "--json", "--backbone", "wan2.1-i2v-14b-480p-official",
                          "--quantize", "hybrid").stdout)
    assert {s["stage"]: s for s in doc["plan"]["stages"]}["load dit"]["host_peak_bytes"] > 32e9


def test_a_cast_or_merged_dit_is_counted_whole(backbone):
    """A load that casts its file (fp32 shards → bf16) or merges a LoRA holds private pages: the first run's
    conversion starts from the whole 16-bit model, and CPU streaming cannot drop blocks that are not file pages."""
    bf16 = dit_sizes("wan2.1-i2v-14b")["none"].total
    load = lambda j: {s.stage: s for s in make_plan(j, cpu(64)).stages}["load dit"].host_peak_bytes  # noqa: E731
    assert load(job("14b", 49)) < 3 * GiB  # zero-copy source: one layer at a time
    assert load(job("14b", 49, dit_private_bytes=bf16)) > bf16
    assert load(job("14b", 49, dit_private_bytes=bf16, quant_cached=frozenset({"hybrid"}))) < 1 * GiB  # cached
    from cinecli.effects.preset import Catalog
    from cinecli.plan.inputs import dit_header, dit_private_bytes

    preset = Catalog(extra_preset=backbone).resolve(None)  # the self-test stack: a bf16 DiT file, no backbone LoRA
    sizes = {"none": dit_sizes("wan2.1-fun-1.3b-inp")["none"]}
    header = dit_header(backbone.parent / "dit")
    assert dit_private_bytes(preset, header, sizes, torch.bfloat16) == 0  # zero-copy
    assert dit_private_bytes(preset, header, sizes, torch.float32) == sizes["none"].total  # cast on load
    small = job("1.3b", 49, prompt_cached=True)
    assert make_plan(small, cpu(2)).dit == "streamed"  # mapped pages: one block resident at a time
    with pytest.raises(NoFit):
        make_plan(job("1.3b", 49, prompt_cached=True, dit_private_bytes=dit_sizes("wan2.1-fun-1.3b-inp")["none"].total), cpu(2))


def test_quantize_once_then_memory_map(backbone, env, photo, tmp_path, monkeypatch):
    """First run converts and caches the DiT; the next run loads the cached file; another recipe gets its own file."""
    import cinecli.models.recipes as recipes
    from cinecli.core.dirs import cache_dir

    r = cine("run", photo, "--preset", backbone, "-o", tmp_path / "a.mp4", "--frames", "5", "--seed", "1", "--quantize", "hybrid", "--json")
    assert r.exit_code == 0, r.output
    files = sorted((cache_dir() / "dit").glob("*.hybrid.*.safetensors"))
    assert len(files) == 1 and recipes.read_metadata(files[0])["recipe"] == "hybrid"
    assert not list((cache_dir() / "dit").glob(".*.part"))  # written atomically: no temp file left

    def boom(*a, **k):
        raise AssertionError("quantized again instead of loading the cached file")

    original = recipes.quantize_dit, recipes.write_quantized
    monkeypatch.setattr(recipes, "quantize_dit", boom)
    monkeypatch.setattr(recipes, "write_quantized", boom)
    r2 = cine("run", photo, "--preset", backbone, "-o", tmp_path / "b.mp4", "--frames", "5", "--seed", "1", "--quantize", "hybrid", "--json")
    assert r2.exit_code == 0, r2.output
    assert json.loads(r2.stdout)["plan"]["quantize"] == "hybrid" and json.loads(r2.stdout)["quantization"] == "hybrid"
    monkeypatch.setattr(recipes, "quantize_dit", original[0])
    monkeypatch.setattr(recipes, "write_quantized", original[1])
    assert cine("run", photo, "--preset", backbone, "-o", tmp_path / "c.mp4", "--frames", "5", "--quantize", "fp8").exit_code == 0
    assert len(list((cache_dir() / "dit").glob("*.safetensors"))) == 2  # a different recipe never reuses a stale file


# --- the constants are the model code's: re-traced here, so a change to the models that moves them fails -------------
class LiveBytes:
    """Peak bytes of live tensors created inside the block (meta tensors: shapes only, no memory, no compute)."""

    def __enter__(self):
        import weakref

        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        tracker = self
        self.refs, self.sizes, self.live, self.peak = {}, {}, 0, 0

        def drop(key):
            tracker.refs[key] -= 1
            if not tracker.refs[key]:
                tracker.live -= tracker.sizes.pop(key)
                del tracker.refs[key]

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_flatten(out)[0]:
                    if isinstance(t, torch.Tensor):
                        key = t.untyped_storage()._cdata
                        if key not in tracker.refs:
                            tracker.refs[key], tracker.sizes[key] = 0, t.untyped_storage().nbytes()
                            tracker.live += tracker.sizes[key]
                            tracker.peak = max(tracker.peak, tracker.live)
                        tracker.refs[key] += 1
                        weakref.finalize(t, drop, key)
                return out

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def test_activation_constants_match_a_trace_of_the_models(monkeypatch):
    from dataclasses import replace

    import torch

    import cinecli.models.wan_dit as wan_dit
    import cinecli.plan.memory as mp
    from cinecli.models.load import build_empty
    from cinecli.models.wan_vae import WanVAE

    vae = build_empty(WanVAE)  # the real Wan VAE (96 base channels) on meta
    with LiveBytes() as enc:
        vae.encode(torch.zeros(1, 3, 9, 128, 128, device="meta"))
    with LiveBytes() as dec:
        vae.decode(torch.zeros(1, 16, 3, 16, 16, device="meta"))
    pixels = 128 * 128
    assert (enc.peak / pixels - 12 * 9) == pytest.approx(mp.VAE_ENCODE_PER_PIXEL, rel=0.03)
    assert (dec.peak / pixels - 12 * 9) == pytest.approx(mp.VAE_DECODE_PER_PIXEL, rel=0.03)

    # attention as a flash / memory-efficient kernel would run it: O(L) memory (meta SDPA would build L×L scores)
    monkeypatch.setattr(wan_dit, "attention", lambda q, k, v, bias=None: torch.empty_like(q))
    for name in ("wan2.1-fun-1.3b-inp", "wan2.1-i2v-14b"):
        cfg = replace(wan_dit.DIT_CONFIGS[name], num_layers=1)
        dit = build_empty(lambda: wan_dit.WanDiT(cfg)).to(torch.bfloat16)
        for act, dtype in ((2, torch.bfloat16), (4, torch.float32)):
            dit.compute_dtype = dtype
            ctx = dit.prepare_context(torch.zeros(1, 64, 4096, device="meta"), torch.zeros(1, 257, 1280, device="meta"))
            for frames in (5, 13):  # 7.8k and 20k tokens at 480p
                x, y = torch.zeros(1, 16, frames, 60, 104, device="meta"), torch.zeros(1, 20, frames, 60, 104, device="meta")
                with torch.no_grad(), LiveBytes() as step:
                    dit(x, torch.tensor([1000.0], device="meta"), ctx, y=y)
                held = 4 if dtype == torch.float32 else 0  # bf16 FFN weights upcast for fp32 activations
                want = mp.dit_block_bytes(frames * 30 * 52, cfg.dim, cfg.ffn_dim, act, held)
                assert step.peak == pytest.approx(want, rel=0.12), (name, dtype, frames)


def test_bad_budget_is_a_usage_error(env, photo, monkeypatch):
    r = cine("bullet-time", photo, "--dry-run", "--memory-budget", "lots")
    assert r.exit_code == 2 and "--memory-budget" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    monkeypatch.setenv("CINE_MEMORY_BUDGET", "0")
    assert cine("bullet-time", photo, "--dry-run").exit_code == 2
