"""Nothing the user has is lost or overwritten, and every setting that shapes a clip is recorded (issue 22, items
1-8): batch outputs, reports and inputs are never replaced without --overwrite (inputs never), the output is an
MP4 by name, symlinked photos are photos, tests keep to their own folders, and diffusers' LoRA alphas count."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cinecli.cli.app import app
from cinecli.generate.selftest import sample_image


def cine(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "portrait.png"
    sample_image(96, 64).save(path)
    return path


def lines(r) -> list[dict]:
    return [json.loads(x) for x in r.stdout.splitlines() if x.startswith("{")]


# 1. a batch never replaces a file it did not make with these settings
def test_batch_keeps_existing_files_and_clips_made_with_other_settings(backbone, env, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    sample_image(96, 64).save(src / "new.png")
    sample_image(64, 96).save(src / "face.png")
    out.mkdir()
    (out / "new.selftest.mp4").write_text("precious")
    r = cine("batch", src, "--preset", backbone, "-o", out, "--frames", "5", "--json")
    assert r.exit_code == 0, r.output
    assert (out / "new.selftest.mp4").read_text() == "precious"
    status = {x["rel"]: x for x in lines(r)}
    assert status["new.png"]["status"] == "skipped" and status["new.png"]["error"] == "output exists"
    assert status["face.png"]["status"] == "ok"
    made = (out / "face.selftest.mp4").read_bytes()
    again = cine("batch", src, "--preset", backbone, "-o", out, "--frames", "9")  # other settings: kept, and said
    assert again.exit_code == 0 and (out / "face.selftest.mp4").read_bytes() == made
    assert "not replaced" in again.stderr


# 2. --report never replaces a file without --overwrite
def test_report_file_is_not_replaced_without_overwrite(backbone, env, photo, tmp_path):
    report = tmp_path / "rep.json"
    report.write_text("mine")
    r = cine("run", photo, "--preset", backbone, "-o", tmp_path / "a.mp4", "--report", report, "-q")
    assert r.exit_code == 6 and report.read_text() == "mine" and not (tmp_path / "a.mp4").exists()
    r = cine("run", photo, "--preset", backbone, "-o", tmp_path / "a.mp4", "--report", report, "-q", "--overwrite")
    assert r.exit_code == 0 and json.loads(report.read_text())["output"].endswith("a.mp4")


# 3. the output is never one of the inputs, whatever the flags
@pytest.mark.parametrize("which", ["photo", "last-frame", "preset"])
def test_output_equal_to_an_input_is_refused(which, backbone, env, photo, tmp_path):
    import shutil

    preset = tmp_path / "p.toml"
    shutil.copytree(backbone.parent, tmp_path / "stack")
    preset = tmp_path / "stack" / "selftest.toml"
    end = tmp_path / "end.png"
    sample_image(96, 64).save(end)
    target = {"photo": photo, "last-frame": end, "preset": preset}[which]
    victim = tmp_path / "victim.mp4"
    target.rename(victim)  # an input that happens to be named .mp4 (or -o pointing at it through another spelling)
    args = {"photo": victim, "last-frame": end, "preset": preset}
    args[which] = victim
    before = victim.read_bytes()
    r = cine("run", args["photo"], "--preset", args["preset"], "--last-frame", args["last-frame"], "-o",
             tmp_path / "." / "victim.mp4", "--overwrite", "-q")
    assert r.exit_code == 2 and "is also the output" in r.stderr and victim.read_bytes() == before


# 4. the video's name is an MP4's
@pytest.mark.parametrize("name", ["clip.gif", "out/noext"])
def test_output_without_mp4_suffix_is_refused(name, backbone, env, photo, tmp_path):
    (tmp_path / "out").mkdir()
    r = cine("run", photo, "--preset", backbone, "-o", tmp_path / name, "-q")
    assert r.exit_code == 2 and ".mp4" in r.stderr and not (tmp_path / name).exists()


# 5. every setting that changes the pixels is in the file and the report
def test_every_pixel_setting_is_recorded(backbone, env, photo, tmp_path):
    seen = []
    for extra in ([], ["--crf", "30"], ["--fit", "pad"], ["--fast-decode"]):
        out = tmp_path / f"c{len(seen)}.mp4"
        r = cine("run", photo, "--preset", backbone, "-o", out, "--seed", "1", "--json", *extra)
        assert r.exit_code == 0, r.output
        report = json.loads(r.stdout)
        info = json.loads(cine("info", out, "--json").stdout)["cine"]
        for key in ("crf", "fit", "fast_decode", "effect_strength", "lora_files"):
            assert key in info and report["settings"][key] == info[key], key
        seen.append((info["crf"], info["fit"], info["fast_decode"]))
    assert len(set(seen)) == 4


# 6. a symlinked photo is a photo of its own, and what a folder walk skips is said
def test_symlinked_photos_get_their_own_clips_and_skips_are_counted(backbone, env, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    sample_image(96, 64).save(src / "coffee.png")
    os.symlink(src / "coffee.png", src / "link.png")
    (src / "notes.heic").write_bytes(b"x")
    r = cine("batch", src, "--preset", backbone, "-o", out, "--frames", "5", "--json")
    assert r.exit_code == 0, r.output
    assert {x["rel"] for x in lines(r)} == {"coffee.png", "link.png"}
    assert (out / "link.selftest.mp4").is_file() and (out / "coffee.selftest.mp4").is_file()
    assert "1 file(s) in the input folders are not photos" in r.stderr and ".heic 1" in r.stderr
    listed = cine("batch", src / "link.png", src / "coffee.png", "--preset", backbone, "-o", tmp_path / "o2",
                  "--frames", "5", "--json")
    assert len(lines(listed)) == 2


# 7. tests keep to their own folders (an autouse fixture in conftest.py)
def test_tests_run_with_their_own_cache_data_and_config(tmp_path):
    from platformdirs import user_config_dir

    from cinecli.core import dirs

    for folder in (dirs.cache_dir(), dirs.data_dir(), Path(user_config_dir("cine"))):
        assert Path(folder).is_relative_to(tmp_path), folder


# 8. diffusers/peft LoRAs: alpha from the file's metadata or adapter_config.json
def test_diffusers_lora_alpha_from_metadata_and_adapter_config(tmp_path):
    from diffusers.loaders.lora_pipeline import WanLoraLoaderMixin
    from safetensors.torch import save_file

    from cinecli.weights.lora_file import read_lora

    g = torch.Generator().manual_seed(0)
    sd = {"blocks.0.attn1.to_q.lora_A.weight": torch.randn(4, 64, generator=g),
          "blocks.0.attn1.to_q.lora_B.weight": torch.randn(64, 4, generator=g),
          "blocks.0.attn1.to_k.lora_A.weight": torch.randn(4, 64, generator=g),
          "blocks.0.attn1.to_k.lora_B.weight": torch.randn(64, 4, generator=g)}
    WanLoraLoaderMixin.save_lora_weights(tmp_path / "d", transformer_lora_layers=sd, transformer_lora_adapter_metadata={
        "r": 4, "lora_alpha": 2, "alpha_pattern": {"attn1.to_k": 8}, "rank_pattern": {}, "target_modules": ["to_q", "to_k"]})
    lora = read_lora(tmp_path / "d" / "pytorch_lora_weights.safetensors")  # as diffusers 0.42 writes it
    q, k = lora.low_rank["blocks.0.self_attn.q"], lora.low_rank["blocks.0.self_attn.k"]
    assert q.scale == 0.5 and k.scale == 2.0 and q.alpha_source == "safetensors lora_adapter_metadata"
    assert lora.summary()["alpha_sources"] == {"safetensors lora_adapter_metadata": 2}
    # peft's own layout: adapter_model.safetensors + adapter_config.json, no header metadata
    (tmp_path / "p").mkdir()
    save_file({f"base_model.model.{k}": v for k, v in sd.items()}, tmp_path / "p" / "adapter_model.safetensors")
    (tmp_path / "p" / "adapter_config.json").write_text(json.dumps({"r": 4, "lora_alpha": 2}))
    peft_lora = read_lora(tmp_path / "p" / "adapter_model.safetensors")
    assert {lr.scale for lr in peft_lora.low_rank.values()} == {0.5}
    assert {lr.alpha_source for lr in peft_lora.low_rank.values()} == {"adapter_config.json"}


# 13, 14, 20: a batch without weights stops once (exit 4); failures name photos as given; -q prints the outputs
def test_batch_without_weights_stops_once_with_exit_4(env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("photos").mkdir()
    for i in range(3):
        sample_image(96, 64).save(f"photos/p{i}.png")
    r = cine("batch", "photos", "-e", "bullet-time,slowmo", "-o", "clips")
    assert r.exit_code == 4, r.output
    assert r.stderr.count("cine: error:") == 1 and r.stderr.count("missing") <= 2


def test_batch_names_photos_as_given_and_quiet_prints_outputs(backbone, env, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path("photos").mkdir()
    sample_image(96, 64).save("photos/good.png")
    Path("photos/bad.png").write_text("not an image")
    r = cine("batch", "photos", "--preset", backbone, "-o", "clips", "--frames", "5")
    assert r.exit_code == 8
    assert "photos/bad.png" in r.stderr and "../photos" not in r.stderr
    assert (Path("clips") / "manifest.jsonl").read_text().count('"input":"../photos/bad.png"') == 1  # manifest: OUTDIR-relative
    q = cine("batch", "photos", "--preset", backbone, "-o", "clips2", "--frames", "5", "-q")
    assert q.exit_code == 8 and q.stdout.strip().splitlines() == [str(Path("clips2") / "good.selftest.mp4")]
