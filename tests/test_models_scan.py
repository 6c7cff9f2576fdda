"""A fake ComfyUI models folder (the self-test stack's tiny weights in ComfyUI's names and layouts, the DiT as a
city96 GGUF) is identified by content, and a run of a preset whose backbone points at the hub finds and uses it:
no download, no flag beyond --models-dir; hashes land in the lock, nothing is copied."""

from __future__ import annotations

import json
import os
from pathlib import Path

import av
import pytest
import torch
from gguf_fixtures import write_city96_gguf
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from cinecli.cli.app import app
from cinecli.generate.selftest import sample_image

FP8 = torch.float8_e4m3fn
HUB = "Comfy-Org/Wan_2.1_ComfyUI_repackaged"


def cine(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def comfy_folder(stack: Path, root: Path) -> Path:
    """ComfyUI's models/ tree from the self-test stack; returns models/."""
    models = root / "ComfyUI" / "models"
    for sub in ("diffusion_models", "text_encoders", "clip_vision", "vae", "loras", "upscale_models"):
        (models / sub).mkdir(parents=True, exist_ok=True)
    dit = {k: v.float() for k, v in load_file(stack / "dit" / "diffusion_pytorch_model.safetensors").items()}
    write_city96_gguf(dit, models / "diffusion_models" / "wan2.1-i2v-14b-480p-Q8_0.gguf", "Q8_0")
    t5 = {"scaled_fp8": torch.empty(0, dtype=FP8)}
    for k, v in load_file(stack / "text_encoder" / "model.safetensors").items():
        if v.ndim == 2 and ".layer." in k and "relative_attention_bias" not in k:
            scale = v.float().abs().max() / 448
            t5[k], t5[k.replace(".weight", ".scale_weight")] = (v.float() / scale).to(FP8), scale.reshape(())
        else:
            t5[k] = v.half()
    save_file(t5, models / "text_encoders" / "umt5_xxl_fp8_e4m3fn_scaled.safetensors")
    clip = load_file(stack / "image_encoder" / "model.safetensors")
    save_file({(k if k.startswith("vision_model.") else "vision_model." + k): v.half() for k, v in clip.items()},
              models / "clip_vision" / "clip_vision_h.safetensors")
    vae = torch.load(stack / "Wan2.1_VAE.pth", weights_only=True)
    save_file({k: v.half().contiguous() for k, v in vae.items()}, models / "vae" / "wan_2.1_vae.safetensors")
    lora = {f"diffusion_model.blocks.{i}.self_attn.{m}.lora_{d}.weight": torch.zeros(*((4, 256) if d == "down" else (256, 4)))
            for i in range(2) for m in ("q", "k_img") for d in ("down", "up")}
    save_file({k.replace("self_attn.k_img", "cross_attn.k_img"): v for k, v in lora.items()}, models / "loras" / "my_effect.safetensors")
    save_file({"conv_first.weight": torch.zeros(8, 3, 3, 3)}, models / "upscale_models" / "4x_upscaler.safetensors")
    return models


def write_preset(env: dict, stack: Path) -> None:
    """A user preset whose backbone names hub files (not cached); only the tokenizer is local (ComfyUI has none)."""
    presets = Path(env["XDG_CONFIG_HOME"]) / "cine" / "presets"
    presets.mkdir(parents=True, exist_ok=True)
    (presets / "tiny-comfy.toml").write_text(
        'name = "tiny-comfy"\nprompt = "the camera orbits around the frozen subject"\nframes = 9\nfps = 8\nmax_area = 4096\n\n'
        '[backbone]\nname = "tiny-comfy"\nmodel_type = "i2v"\n'
        f'dit = {{ repo = "{HUB}", file = "split_files/diffusion_models/wan2.1_i2v_480p_14B_fp8_scaled.safetensors" }}\n'
        f'vae = {{ repo = "{HUB}", file = "split_files/vae/wan_2.1_vae.safetensors" }}\n'
        f'text_encoder = {{ repo = "{HUB}", file = "split_files/text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors" }}\n'
        f'image_encoder = {{ repo = "{HUB}", file = "split_files/clip_vision/clip_vision_h.safetensors" }}\n'
        f'tokenizer = {{ path = "{stack / "tokenizer"}" }}\n'
        'sampler = { kind = "distill", timesteps = [1000, 750, 500, 250], shift = 5.0 }\n'
    )


def test_scan_identifies_by_content(backbone, env, tmp_path):
    models = comfy_folder(backbone.parent, tmp_path)
    renamed = models / "diffusion_models" / "whatever.bin.gguf"  # the name says nothing; the header does
    (models / "diffusion_models" / "wan2.1-i2v-14b-480p-Q8_0.gguf").rename(renamed)
    result = cine("models", "scan", models, "--json")
    assert result.exit_code == 0, result.output
    got = {Path(d["path"]).relative_to(models).as_posix(): (d["kind"], d["label"]) for d in json.loads(result.stdout)}
    assert got == {
        "diffusion_models/whatever.bin.gguf": ("dit", "DiT i2v dim 256 GGUF Q8_0"),
        "text_encoders/umt5_xxl_fp8_e4m3fn_scaled.safetensors": ("text_encoder", "umT5 dim 32 fp8 scaled"),
        "clip_vision/clip_vision_h.safetensors": ("image_encoder", "CLIP vision dim 32 fp16"),
        "vae/wan_2.1_vae.safetensors": ("vae", "Wan2.1 VAE"),
        "loras/my_effect.safetensors": ("lora", "LoRA for dim 256 i2v"),
        "upscale_models/4x_upscaler.safetensors": ("unknown", "unknown"),
    }
    text = cine("models", "scan", models).stdout
    assert "DiT i2v dim 256 GGUF Q8_0" in text and "clip_vision/clip_vision_h.safetensors" in text


def test_run_uses_the_comfyui_folder_without_download(backbone, env, tmp_path, monkeypatch):
    models = comfy_folder(backbone.parent, tmp_path)
    write_preset(env, backbone.parent)
    before = sorted((p.relative_to(models), p.stat().st_size, p.stat().st_mtime) for p in models.rglob("*") if p.is_file())
    monkeypatch.setenv("CINE_DATA_DIR", str(tmp_path / "data"))

    def no_network(*a, **k):
        raise AssertionError("network access")

    monkeypatch.setattr("socket.create_connection", no_network)
    missing = cine("models", "list", "tiny-comfy")
    assert missing.exit_code == 0 and missing.stdout.count("missing") == 4
    listed = cine("models", "list", "tiny-comfy", "--models-dir", models)
    assert listed.exit_code == 0, listed.output
    assert listed.stdout.count("(models dir)") == 4 and "wan2.1-i2v-14b-480p-Q8_0.gguf" in listed.stdout

    photo = tmp_path / "photo.png"
    sample_image(96, 64).save(photo)
    out = tmp_path / "clip.mp4"
    result = cine("tiny-comfy", photo, "-o", out, "--seed", 3, "--models-dir", models, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["quantization"] == "gguf"
    with av.open(str(out)) as c:
        assert sum(1 for _ in c.decode(video=0)) == 9
    local = json.loads((tmp_path / "data" / "weights.lock.json").read_text())["local"]
    assert {Path(p).name for p in local} == {"wan2.1-i2v-14b-480p-Q8_0.gguf", "umt5_xxl_fp8_e4m3fn_scaled.safetensors",
                                              "clip_vision_h.safetensors", "wan_2.1_vae.safetensors"}
    assert all(len(e["sha256"]) == 64 for e in local.values())
    after = sorted((p.relative_to(models), p.stat().st_size, p.stat().st_mtime) for p in models.rglob("*") if p.is_file())
    assert after == before  # nothing copied, moved or touched


@pytest.mark.parametrize("how", ["env", "config"])
def test_models_dir_persists(how, backbone, env, tmp_path, monkeypatch):
    models = comfy_folder(backbone.parent, tmp_path)
    write_preset(env, backbone.parent)
    if how == "env":
        (tmp_path / "elsewhere").mkdir(exist_ok=True)  # a folder that is not there is an error now (issue 22)
        monkeypatch.setenv("CINE_MODELS_DIR", os.pathsep.join([str(tmp_path / "elsewhere"), str(models)]))
    else:
        assert cine("models", "scan", models, "--remember").exit_code == 0
        assert str(models.resolve()) in (Path(env["XDG_CONFIG_HOME"]) / "cine" / "config.toml").read_text()
    listed = cine("models", "list", "tiny-comfy")
    assert listed.stdout.count("(models dir)") == 4, listed.output


def test_bad_models_dir_is_one_line(env, tmp_path):
    result = cine("models", "list", "--models-dir", tmp_path / "nope")
    assert result.exit_code == 2 and "no such folder" in result.stderr and len(result.stderr.strip().splitlines()) == 1
