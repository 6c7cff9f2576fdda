"""The reference pipelines' settings, end to end on the tiny stack: the default negative prompt of CFG backbones,
Wan2.1-Fun-InP's published shift, the distill step and sampler run options, CLIP precision per device."""

from __future__ import annotations

import json
from pathlib import Path

import av
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from cinecli.cli.app import app
from cinecli.generate.selftest import sample_image

# Wan2.1 wan/configs/shared_config.py sample_neg_prompt (the text VideoX-Fun's predict_i2v.py uses too)
WAN_NEG = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
           "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
           "三条腿，背景人很多，倒着走")


def cine(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "portrait.png"
    sample_image(96, 64).save(path)
    return path


@pytest.fixture
def cfg_preset(backbone, tmp_path):
    """The tiny stack as a CFG backbone (2-step flow Euler, guidance 4) with its own default negative prompt."""

    def write(preset_negative: str | None = None, sampler: str = 'kind = "euler", steps = 2, shift = 5.0, guidance = 4.0'):
        text = backbone.read_text().replace('{ path = "', '{ path = "' + str(backbone.parent) + "/")
        text = text.replace('name = "selftest"', 'name = "cfg-test"')
        start = text.index("sampler = {")
        text = text[:start] + f"sampler = {{ {sampler} }}\nnegative_prompt = \"backbone default negative\"\n"
        if preset_negative is not None:
            text = f'negative_prompt = "{preset_negative}"\n' + text
        path = tmp_path / f"cfg{abs(hash((preset_negative, sampler)))}.toml"
        path.write_text(text)
        return path

    return write


def meta(path: Path) -> dict:
    return json.loads(cine("info", path, "--json").stdout)["cine"]


def frames(path: Path) -> np.ndarray:
    with av.open(str(path)) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]).astype(np.int16)


# --- 1. negative prompt -------------------------------------------------------------------------------------------
def test_cfg_backbone_encodes_its_default_negative_prompt_and_records_it(cfg_preset, env, photo, tmp_path):
    preset = cfg_preset()
    a, b = tmp_path / "a.mp4", tmp_path / "b.mp4"
    assert cine("run", photo, "--preset", preset, "-o", a, "--seed", "3").exit_code == 0
    assert meta(a)["negative_prompt"] == "backbone default negative" and meta(a)["guidance"] == 4.0
    r = cine("run", photo, "--preset", preset, "-o", b, "--seed", "3", "--negative-prompt", "blurry")
    assert r.exit_code == 0 and meta(b)["negative_prompt"] == "blurry"
    assert np.abs(frames(a) - frames(b)).max() > 0  # the negative text reaches the model
    dry = cine("run", photo, "--preset", cfg_preset("from the preset"), "--dry-run", "--json")
    assert json.loads(dry.stdout)["negative_prompt"] == "from the preset"


def test_shipped_cfg_backbone_uses_the_reference_negative_prompt_and_shift(env, photo):
    r = cine("bullet-time", photo, "--backbone", "wan2.1-fun-1.3b-inp", "--dry-run", "--json")
    doc = json.loads(r.stdout)
    assert doc["negative_prompt"] == WAN_NEG
    distilled = json.loads(cine("bullet-time", photo, "--dry-run", "--json", "--negative-prompt", "x").stdout)
    assert distilled["negative_prompt"] == ""  # no CFG pass: nothing encodes it, and the file says so
    i2v = cine("bullet-time", photo, "--dry-run", "--json", "--sampler", "euler").stdout
    assert json.loads(i2v)["sampler"]["kind"] == "euler"


# --- 2. Wan2.1-Fun-1.3B-InP's shift ------------------------------------------------------------------------------
def test_fun_inp_samples_with_its_authors_settings(env, photo):
    """VideoX-Fun examples/wan2.1_fun/predict_i2v.py: sampler "Flow" from config/wan2.1/wan_civitai.yaml (shift 5.0),
    50 steps, guidance 6.0."""
    doc = json.loads(cine("slowmo", photo, "--backbone", "wan2.1-fun-1.3b-inp", "--dry-run", "--json").stdout)
    assert doc["sampler"] == {"kind": "euler", "steps": 50, "shift": 5.0, "guidance": 6.0}


# --- 3. distill step ----------------------------------------------------------------------------------------------
def test_distill_step_option_is_recorded_and_changes_the_video(backbone, env, photo, tmp_path):
    a, b = tmp_path / "renoise.mp4", tmp_path / "euler.mp4"
    assert cine("run", photo, "--preset", backbone, "-o", a, "--seed", "4").exit_code == 0
    r = cine("run", photo, "--preset", backbone, "-o", b, "--seed", "4", "--distill-step", "euler", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["job"]["distill_step"] == "euler"
    assert meta(a)["distill_step"] == "renoise" and meta(b)["distill_step"] == "euler"
    assert np.abs(frames(a) - frames(b)).max() > 0


def test_bad_sampler_options_are_one_line_usage_errors(backbone, cfg_preset, env, photo, tmp_path):
    for preset, args, text in [(cfg_preset(), ("--distill-step", "euler"), "applies to the distill sampler"),
                               (backbone, ("--sampler", "heun"), "--sampler heun: must be one of distill, euler, unipc"),
                               (cfg_preset(), ("--sampler", "distill"), "not step-distilled")]:
        r = cine("run", photo, "--preset", preset, "-o", tmp_path / "x.mp4", *args)
        assert r.exit_code == 2 and text in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.output


# --- 4. UniPC -----------------------------------------------------------------------------------------------------
def test_unipc_run_option_end_to_end(cfg_preset, env, photo, tmp_path):
    a, b = tmp_path / "unipc.mp4", tmp_path / "euler.mp4"
    r = cine("run", photo, "--preset", cfg_preset(sampler='kind = "euler", steps = 3, shift = 3.0, guidance = 4.0'),
             "-o", a, "--seed", "2", "--sampler", "unipc", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["job"]["sampler"] == "unipc" and meta(a)["sampler"] == "unipc"
    assert "denoise step 3/3" in json.loads(r.stdout)["stages"]
    assert cine("run", photo, "--preset", cfg_preset(sampler='kind = "unipc", steps = 3, shift = 3.0, guidance = 4.0'),
                "-o", b, "--seed", "2", "--sampler", "euler").exit_code == 0
    assert meta(b)["sampler"] == "euler" and np.abs(frames(a) - frames(b)).max() > 0


# --- 5. CLIP precision --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("device,dtype,want", [
    ("cuda", torch.bfloat16, torch.float16),  # the official I2V config: clip_dtype = torch.float16
    ("cuda", torch.float16, torch.float16),
    ("cuda", torch.float32, torch.float32),  # --dtype fp32 asks for full precision everywhere
    ("mps", torch.float16, torch.float16),
    ("cpu", torch.float32, torch.float32),
])
def test_clip_dtype_follows_the_reference_on_cuda(device, dtype, want, monkeypatch):
    import cinecli.models.image_encoder as image_encoder
    from cinecli.core.devices import activation_dtype
    from cinecli.generate.pipeline import Generator

    seen = {}
    monkeypatch.setattr(image_encoder, "load_image_encoder", lambda path, device, dtype, weight_dtype=None: seen.update(dtype=dtype))
    gen = Generator(backbone=None, paths={"image_encoder": Path("clip.pth")}, device=torch.device(device), dtype=dtype)
    gen.clip  # noqa: B018
    assert seen["dtype"] == want
    cpu = Generator(backbone=None, paths={"image_encoder": Path("clip.pth")}, device=torch.device("cpu"), dtype=torch.bfloat16)
    cpu.clip  # noqa: B018
    assert seen["dtype"] == activation_dtype("cpu", torch.bfloat16)  # what works on this CPU, as before
