"""`cine` end to end on the tiny self-test backbone (real files on disk), MP4s decoded back with PyAV."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from cinecli.cli.app import app
from cinecli.generate.selftest import sample_image

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "portrait.png"
    sample_image(96, 64).save(path)
    return path


def cine(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def decode(path: Path) -> tuple[np.ndarray, float]:
    with av.open(str(path)) as c:
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
        return frames, float(c.streams.video[0].average_rate)


def one_line_error(result, code: int) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cine: error:"), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def test_end_to_end_mp4_and_report(backbone, env, photo, tmp_path):
    out, report_file = tmp_path / "clip.mp4", tmp_path / "report.json"
    r = cine("run", photo, "--preset", backbone, "-o", out, "--seed", "7", "--report", report_file)
    assert r.exit_code == 0, r.output
    assert r.stdout.strip().splitlines()[-1] == str(out)  # the output path on the last line
    frames, fps = decode(out)
    report = json.loads(report_file.read_text())
    assert frames.shape == (9, report["sizes"]["height"], report["sizes"]["width"], 3) and fps == 8
    assert (report["sizes"]["width"], report["sizes"]["height"]) == (64, 48)  # 3:2 photo, 4096-pixel budget, ×16
    for stage in ("resolve", "load dit", "load vae", "load image_encoder", "text encode", "image encode", "vae encode",
                  "prepare context", "denoise step 1/4", "denoise step 4/4", "vae decode", "mp4 encode"):
        assert stage in report["stages"], stage
    assert abs(report["stages_total_s"] - report["total_s"]) <= 0.05 * report["total_s"]
    assert report["ms_per_frame"] > 0 and report["peak_memory"]["bytes"] > 0 and report["job"]["seed"] == 7
    info = cine("info", out, "--json")
    meta = json.loads(info.stdout)["cine"]
    assert meta["seed"] == 7 and meta["effect"] == "selftest" and meta["steps"] == 4 and meta["backbone"] == "selftest-tiny"


def test_same_seed_same_frames_and_prompt_cache(backbone, env, photo, tmp_path):
    outs = [tmp_path / f"{i}.mp4" for i in range(3)]
    cine("run", photo, "--preset", backbone, "-o", outs[0], "--seed", "3", "--json")
    r = cine("run", photo, "--preset", backbone, "-o", outs[1], "--seed", "3", "--json")
    report = json.loads(r.stdout)  # --json: the report is the whole stdout
    assert "text cache lookup" in report["stages"]
    assert "load text_encoder" not in report["stages"] and "text encode" not in report["stages"]  # a cache hit
    cine("run", photo, "--preset", backbone, "-o", outs[2], "--seed", "4")
    a, b, c = (decode(o)[0] for o in outs)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_stdout_video_is_decodable(backbone, env, photo, tmp_path):
    out = tmp_path / "piped.mp4"
    with open(out, "wb") as f:
        proc = subprocess.run([sys.executable, "-m", "cinecli", "run", str(photo), "--preset", str(backbone), "-o", "-",
                               "--seed", "1", "-q"], stdout=f, stderr=subprocess.PIPE, env={**os.environ, **env}, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    frames, fps = decode(out)
    assert frames.shape[0] == 9 and fps == 8


def test_stdin_image_and_output_dir(backbone, env, photo, tmp_path):
    (tmp_path / "outdir").mkdir()
    proc = subprocess.run([sys.executable, "-m", "cinecli", "run", "-", "--preset", str(backbone), "-o", str(tmp_path / "outdir") + "/",
                           "--frames", "6"], input=photo.read_bytes(), capture_output=True, env={**os.environ, **env}, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    assert b"frames 6" in proc.stderr and b"5" in proc.stderr  # rounded to 4k+1 with a notice
    out = tmp_path / "outdir" / "stdin.selftest.mp4"
    assert proc.stdout.decode().strip().splitlines()[-1] == str(out)
    assert decode(out)[0].shape[0] == 5


def test_bulletti_alias_and_dry_run_loads_nothing(env, photo, monkeypatch):
    import cinecli.generate.pipeline as pipeline
    import cinecli.models as models

    def boom(*a, **k):
        raise AssertionError("--dry-run loaded a model")

    monkeypatch.setattr(models, "load_dit", boom)
    monkeypatch.setattr(pipeline.Generator, "generate", boom)
    r = cine("bulletti", photo, "--dry-run", "--json", "--seed", "5")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["effect"] == "bullet-time" and doc["frames"] == 49 and doc["seed"] == 5
    assert doc["output"] == "portrait.bullet-time.mp4" and doc["prompt"].startswith("rw360xz")
    assert doc["width"] % 16 == 0 and doc["height"] % 16 == 0 and doc["width"] * doc["height"] <= 480 * 832
    assert doc["missing"] and doc["plan"]["stages"] and all(s["device_peak_bytes"] > 0 for s in doc["plan"]["stages"])
    for alias, effect in (("hitchcock", "dolly-zoom"), ("vertigo", "dolly-zoom"), ("slowmo", "slow-motion"), ("bullet", "bullet-time")):
        assert json.loads(cine(alias, photo, "--dry-run", "--json").stdout)["effect"] == effect


def test_missing_weights_offline_is_one_clear_line(env, photo, tmp_path):
    line = one_line_error(cine("bullet-time", photo, "-o", tmp_path / "x.mp4"), 4)
    assert "missing weights (offline mode)" in line and "Wan2.1-I2V-14B-480P" in line and "cine models pull bullet-time" in line
    assert not (tmp_path / "x.mp4").exists()


def test_unknown_effect_suggests(env, photo):
    line = one_line_error(cine("bulet-time", photo), 2)
    assert "did you mean 'bullet-time'" in line


def _png_claiming(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims a huge size (the pixel data is never reached)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))  # noqa: E731
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b""))


def test_bad_inputs_get_one_line_and_exit_code(backbone, env, photo, tmp_path):
    jpeg = tmp_path / "photo.jpg"
    Image.open(photo).convert("RGB").resize((256, 256)).save(jpeg, quality=95)
    (tmp_path / "truncated.jpg").write_bytes(jpeg.read_bytes()[: len(jpeg.read_bytes()) // 2])
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("not an image")
    _png_claiming(tmp_path / "huge.png", 40000, 40000)
    run = lambda img, *extra: cine("run", img, "--preset", backbone, "-o", tmp_path / "out.mp4", *extra)  # noqa: E731
    assert "no such file" in one_line_error(run(tmp_path / "missing.jpg"), 3)
    assert "not an image" in one_line_error(run(tmp_path / "notes.txt"), 3)
    assert "unreadable image" in one_line_error(run(tmp_path / "truncated.jpg"), 3)
    assert "0 bytes" in one_line_error(run(tmp_path / "empty.png"), 3)
    assert "MP" in one_line_error(run(tmp_path / "huge.png"), 3)
    assert "does not exist" in one_line_error(cine("run", photo, "--preset", backbone, "-o", tmp_path / "nodir" / "o.mp4"), 6)
    existing = tmp_path / "keep.mp4"
    existing.write_bytes(b"precious")
    assert "--overwrite" in one_line_error(cine("run", photo, "--preset", backbone, "-o", existing), 6)
    assert existing.read_bytes() == b"precious"
    assert "--fit squash: must be one of crop, pad, stretch" in one_line_error(run(photo, "--fit", "squash"), 2)
    assert "--offload disk: must be one of auto, none, blocks" in one_line_error(run(photo, "--offload", "disk"), 2)
    assert not (tmp_path / "out.mp4").exists() and not list(tmp_path.glob(".out.mp4*"))


def test_unwritable_output_leaves_nothing(backbone, env, photo, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        if os.access(ro, os.W_OK):  # root ignores permissions: use a read-only filesystem instead
            target = Path("/proc/cine-test.mp4")
        else:
            target = ro / "out.mp4"
        one_line_error(cine("run", photo, "--preset", backbone, "-o", target), 6)
        assert not target.exists()
    finally:
        ro.chmod(0o700)


def test_overwrite_replaces_and_last_frame(backbone, env, photo, tmp_path):
    out = tmp_path / "o.mp4"
    out.write_bytes(b"old")
    end = tmp_path / "end.png"
    sample_image(96, 64).transpose(Image.FLIP_LEFT_RIGHT).save(end)
    r = cine("run", photo, "--preset", backbone, "-o", out, "--overwrite", "--last-frame", end, "--seed", "2")
    assert r.exit_code == 0, r.output
    assert decode(out)[0].shape[0] == 9
    line = one_line_error(cine("bullet-time", photo, "--last-frame", end, "--dry-run"), 2)
    assert "does not support --last-frame" in line


def test_fast_decode_uses_the_tiny_vae(backbone, env, photo, tmp_path):
    out = tmp_path / "fast.mp4"
    r = cine("run", photo, "--preset", backbone, "-o", out, "--seed", "1", "--fast-decode", "--json")
    assert r.exit_code == 0, r.output
    stages = json.loads(r.stdout)["stages"]
    assert "vae decode (tiny)" in stages and "load tiny_vae" in stages and "vae decode" not in stages
    frames, _ = decode(out)
    assert frames.shape == (9, 48, 64, 3)


def test_cli_start_imports_no_torch():
    """`cine --help`, bad-value checks and did-you-mean answer in a fraction of a second: torch (2+ s) loads lazily."""
    code = "import sys, cinecli.cli.app; assert 'torch' not in sys.modules, 'cinecli.cli.app imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)
