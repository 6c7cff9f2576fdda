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


# 10. --override: a bad format is exit 2, and so is a glob that matches nothing
def test_quantize_override_errors_are_usage_errors(tmp_path):
    from wan_fixtures import random_state_dict, tiny_config, write_layout

    cfg = tiny_config()
    src = write_layout("safetensors", random_state_dict(cfg), tmp_path / "dit", cfg)
    for override, text in (("blocks.0.*=int9", "unknown weight format"), ("blocks.99.*=int8", "matches no quantizable")):
        r = cine("quantize", src, "-o", tmp_path / "q.safetensors", "--override", override)
        assert r.exit_code == 2 and text in r.stderr and len(r.stderr.strip().splitlines()) == 1, (override, r.output)


# 11. a very large photo: one line, no Pillow warning before it
def test_huge_photo_is_one_line_without_pillow_warnings(env, tmp_path):
    from PIL import Image

    big = tmp_path / "big.png"
    Image.new("RGB", (12000, 12000)).save(big, compress_level=1)
    r = cine("bullet-time", big, "--dry-run")
    assert r.exit_code == 3 and "Warning" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


# 12. one unit convention: GB = 10^9 wherever cine prints a size
def test_sizes_are_decimal_gigabytes(backbone, env, photo, tmp_path):
    from cinecli.core.sizes import human_bytes, parse_size

    assert human_bytes(32_800_000_000) == "32.8 GB" and human_bytes(1536) == "1.5 kB"
    assert human_bytes(parse_size("560MB")) == "560.0 MB"
    r = cine("run", photo, "--preset", backbone, "--dry-run", "--memory-budget", "1MB")
    assert r.exit_code == 7 and "1.0 MB usable" in r.stderr and "GB on a machine" in r.stderr


# 15. the config folder's backbones.toml is read; unknown preset keys are warned about; a missing CINE_MODELS_DIR is said
def test_user_backbones_unknown_keys_and_models_dir(backbone, env, photo, tmp_path, monkeypatch):
    from cinecli.effects.preset import Catalog

    config = Path(os.environ["XDG_CONFIG_HOME"]) / "cine"
    config.mkdir(parents=True)
    (config / "backbones.toml").write_text('[my-backbone]\ndit = { path = "/nowhere/dit" }\n')
    assert "my-backbone" in Catalog().backbones
    preset = tmp_path / "typo.toml"
    preset.write_text(backbone.read_text().replace('frames = 9', 'frams = 9').replace(
        'path = "', f'path = "{backbone.parent}/'))
    r = cine("run", photo, "--preset", preset, "--dry-run")
    assert "unknown key 'frams' (did you mean 'frames'?)" in r.stderr
    monkeypatch.setenv("CINE_MODELS_DIR", str(tmp_path / "nonexistent"))
    r = cine("bullet-time", photo, "--dry-run")
    assert r.exit_code == 2 and "CINE_MODELS_DIR" in r.stderr


# 17. offline without weights: the line also offers models folders and the self-test
def test_offline_line_offers_the_self_test(env, photo):
    r = cine("bullet-time", photo, "-q")
    assert r.exit_code == 4 and "cine doctor" in r.stderr and "--models-dir" in r.stderr


# 9. scan names formats as their publishers do, and knows cine's own files; a single file is identified
def test_scan_labels_follow_the_publishers(tmp_path):
    from gguf_fixtures import write_city96_gguf
    from safetensors.torch import save_file
    from wan_fixtures import random_state_dict, tiny_config

    from cinecli.models import load_dit
    from cinecli.models.recipes import RECIPES, quantize_dit, write_quantized
    from cinecli.models.scan import identify, scan

    cfg = tiny_config()
    sd = random_state_dict(cfg)
    write_city96_gguf(sd, tmp_path / "dit-F16.gguf", "F16")
    f8 = {}
    for k, v in sd.items():
        if k.endswith(".weight") and v.ndim == 2 and k.startswith("blocks."):
            scale = v.abs().amax(1, keepdim=True) / 448
            f8[k], f8[k.replace(".weight", ".weight_scale")] = (v / scale).to(torch.float8_e4m3fn), scale
        else:
            f8[k] = v
    save_file(f8, tmp_path / "dit_scaled_fp8_e4m3_lightx2v.safetensors")
    model = load_dit(sd, dtype="bf16")
    quantize_dit(model, RECIPES["hybrid"])
    write_quantized(model, tmp_path / "cache-hybrid.safetensors", RECIPES["hybrid"])
    labels = {f.path.name: f.label for f in scan(tmp_path)}
    assert labels["dit-F16.gguf"].endswith("GGUF F16")
    assert labels["dit_scaled_fp8_e4m3_lightx2v.safetensors"].endswith("fp8 scaled per channel (lightx2v)")
    assert labels["cache-hybrid.safetensors"].endswith("cine hybrid")
    assert [f.label for f in scan(tmp_path / "dit-F16.gguf")] == [identify(tmp_path / "dit-F16.gguf").label]


# 18 (part): a dry run writes nothing on stdout; shape errors name the file; info shows values, not reprs
def test_dry_run_stdout_shape_errors_and_info_values(backbone, env, photo, tmp_path):
    from PIL import Image

    r = cine("run", photo, "--preset", backbone, "--dry-run", "-o", tmp_path / "x.mp4")
    assert r.exit_code == 0 and r.stdout == ""
    for size in ((1, 1), (20000, 20)):
        thin = tmp_path / f"thin{size[0]}.png"
        Image.new("RGB", size).save(thin)
        r = cine("run", thin, "--preset", backbone, "--dry-run")
        assert r.exit_code == 3 and str(thin) in r.stderr
    r = cine("run", photo, "--preset", backbone, "--frames", "1", "--slowdown", "2", "--dry-run")
    assert "does nothing to a single frame" in r.stderr
    out = tmp_path / "v.mp4"
    assert cine("run", photo, "--preset", backbone, "-o", out, "-q").exit_code == 0
    info = cine("info", out).stdout
    assert "None" not in info and "['" not in info and "{'" not in info and "last_frame: none" in info


# 16. Click's own errors are one `cine: error:` line (the entry point); exit codes by kind
@pytest.mark.parametrize("args", [["run", "p.png", "--frames", "1.5"], ["run", "p.png", "--seed", "abc"], ["--bogus"]])
def test_usage_errors_are_one_line(args, env):
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "cinecli", *args], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("cine: error: ") and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_exit_codes_by_kind(backbone, env, tmp_path):
    assert cine("lora", "inspect", tmp_path / "missing.safetensors").exit_code == 4  # weights, not a photo (3)
    (tmp_path / "afile").write_text("x")
    assert cine("batch", tmp_path, "--preset", backbone, "-o", tmp_path / "afile").exit_code == 6  # the output
    names = cine("effects")  # not a terminal: the names alone, once
    assert names.stdout.split() == sorted(set(names.stdout.split())) and "┃" not in names.output


# 19. progress: a terminal sees the stage, step i/N and the time left; a log sees each stage as it starts
def test_progress_on_a_terminal_and_in_a_log():
    import io

    from rich.console import Console

    from cinecli.core.timing import Timings
    from cinecli.output.progress import StageProgress

    for terminal in (True, False):
        out = io.StringIO()
        console = Console(file=out, force_terminal=terminal, width=160, color_system=None)
        timings = Timings()
        timings.stages["vae encode"] = 10.0
        with StageProgress(console, timings, "selftest: 9 frames", steps=4) as progress:
            with timings.stage("denoise step 1/4"):
                pass
            progress.step_seconds[-1] = 2.0  # a measured step of 2 s
            assert progress.eta() == 3 * 2.0 + 1.6 * 10.0  # three steps to go, then the decode
            with timings.stage("denoise step 2/4"):
                text = out.getvalue()
        if terminal:
            assert "denoise step 2/4" in text and "1/4" in text and "left" in text
        else:
            assert "denoise step 2/4 …" in text and "denoise step 1/4: " in text


def test_a_dry_run_plans_without_importing_model_code(backbone, env, photo):
    import subprocess
    import sys

    code = ("import sys; from typer.testing import CliRunner; from cinecli.cli.app import app; "
            f"r = CliRunner().invoke(app, ['run', {str(photo)!r}, '--preset', {str(backbone)!r}, '--dry-run']); "
            "assert r.exit_code == 0, r.output; assert 'transformers' not in sys.modules and 'peft' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0


def test_info_reads_stdin_and_several_files(backbone, env, photo, tmp_path):
    import subprocess
    import sys

    a, b = tmp_path / "a.mp4", tmp_path / "b.mp4"
    for out in (a, b):
        assert cine("run", photo, "--preset", backbone, "-o", out, "-q").exit_code == 0
    docs = json.loads(cine("info", a, b, "--json").stdout)
    assert [Path(d["path"]).name for d in docs] == ["a.mp4", "b.mp4"]
    r = subprocess.run([sys.executable, "-m", "cinecli", "info", "-"], input=a.read_bytes(), capture_output=True)
    assert r.returncode == 0 and r.stdout.decode().startswith("stdin: h264")


# 18 (part): shell completion knows effects and devices, and --show-completion takes the shell asked for
def test_completion_offers_effects_and_devices(env):
    import subprocess
    import sys

    def complete(words: str, cword: int) -> list[str]:
        env = {**os.environ, "_CINE_COMPLETE": "complete_bash", "COMP_WORDS": words, "COMP_CWORD": str(cword)}
        return subprocess.run([sys.executable, "-m", "cinecli"], env=env, capture_output=True, text=True).stdout.split()

    assert {"bullet-time", "bulletti", "run"} <= set(complete("cine ", 1))
    assert complete("cine run p.png --device m", 4) == ["mps"]
    assert "bullet-time,slowmo" in complete("cine batch d -e bullet-time,slo", 4)
    fish = subprocess.run([sys.executable, "-m", "cinecli", "--show-completion", "fish"], capture_output=True, text=True)
    assert fish.returncode == 0 and "complete --command cine" in fish.stdout
