"""Slow motion: --slowdown (frame interpolation through PyAV's FFmpeg filters), burst pairs, batch sidecar pairs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_cli import cine, decode, one_line_error

from cinecli.batch.items import pair_last_frames
from cinecli.generate.selftest import sample_image
from cinecli.output.slowdown import DEFAULT_METHOD, METHODS, interpolate

ROOT = Path(__file__).resolve().parents[1]


def bench_module():
    spec = importlib.util.spec_from_file_location("bench_slowdown", ROOT / "bench" / "slowdown.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def photo(tmp_path) -> Path:
    path = tmp_path / "first.png"
    sample_image(96, 64).save(path)
    return path


@pytest.mark.parametrize("method", ["blend", "framerate", DEFAULT_METHOD])
@pytest.mark.parametrize("factor", [2, 3, 4])
def test_interpolate_counts_and_keeps_generated_frames(method, factor):
    frames = np.random.default_rng(0).integers(0, 256, (5, 48, 64, 3), dtype=np.uint8)
    out = interpolate(frames, factor, method)
    assert out.shape == ((5 - 1) * factor + 1, 48, 64, 3) and out.dtype == np.uint8
    assert np.array_equal(out[::factor], frames)  # generated frames pass through exactly
    between = out[1::factor][:, :, :, :].astype(float)  # the first in-between frames differ from both neighbours
    assert np.abs(between - frames[:-1]).mean() > 5 and np.abs(between - frames[1:]).mean() > 5
    assert interpolate(frames[:1], factor, method).shape[0] == 1


def test_motion_compensation_beats_blending_on_a_moving_disc():
    """The default method follows motion: on the bench's synthetic scene it beats a cross-fade by dB, not noise."""
    bench = bench_module()
    true, masks = bench.render(5, 2, (256, 160), (6.0, 3.0))  # 9 true frames, 4 of them in-between
    scores = {m: bench.score(true, masks, interpolate(true[::2], 2, m), 2) for m in ("blend", DEFAULT_METHOD)}
    assert scores[DEFAULT_METHOD][1] > scores["blend"][1] + 2, scores  # moving-region PSNR
    assert DEFAULT_METHOD in METHODS


def test_slowdown_doubles_frames_same_fps(backbone, env, photo, tmp_path):
    out = tmp_path / "slow.mp4"
    r = cine("run", photo, "--preset", backbone, "-o", out, "--seed", "3", "--slowdown", "2", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    frames, fps = decode(out)
    assert frames.shape[0] == 2 * 9 - 1 and fps == 8  # F → 2F−1 at the preset's 8 fps
    assert report["sizes"]["output_frames"] == 17 and report["sizes"]["slowdown"] == 2
    names = list(report["stages"])
    assert names.index("vae decode") < names.index("interpolate minterpolate x2") < names.index("mp4 encode")
    meta = json.loads(cine("info", out, "--json").stdout)["cine"]
    assert meta["slowdown"] == 2 and meta["frames"] == 9 and meta["output_frames"] == 17
    assert meta["interpolation"] == f"minterpolate {DEFAULT_METHOD}"  # offline without RIFE's weights (test_rife.py)


@pytest.mark.parametrize("value", ["0", "1", "1.5", "9", "100", "-2", "fast"])
def test_bad_slowdown_exits_2_before_loading(env, photo, monkeypatch, value):
    import cinecli.generate.pipeline as pipeline
    import cinecli.models as models

    def boom(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_dit", boom)
    monkeypatch.setattr(pipeline.Generator, "generate", boom)
    line = one_line_error(cine("slow-motion", photo, "--slowdown", value), 2)
    assert f"--slowdown {value}: must be 2 to 8 or off" in line
    assert "--slowdown" in one_line_error(cine("batch", photo, "-e", "slowmo", "-o", photo.parent / "o", "--slowdown", value), 2)


def test_slow_motion_preset_defaults_to_2x(env, photo):
    doc = json.loads(cine("slowmo", photo, "--dry-run", "--json").stdout)
    assert doc["slowdown"] == 2 and doc["output_frames"] == 97 and doc["fps"] == 16
    off = json.loads(cine("slowmo", photo, "--dry-run", "--json", "--slowdown", "off").stdout)
    assert off["slowdown"] == 1 and off["output_frames"] == 49
    assert json.loads(cine("bullet-time", photo, "--dry-run", "--json").stdout)["slowdown"] == 1
    preset = photo.parent / "mine.toml"
    for value, expected in (('"off"', 1), ("3", 3)):
        preset.write_text(f'name = "mine"\nbackbone = "wan2.1-fun-1.3b-inp"\nprompt = "slow"\nslowdown = {value}\n')
        assert json.loads(cine("run", photo, "--preset", preset, "--dry-run", "--json").stdout)["slowdown"] == expected
    preset.write_text('name = "mine"\nbackbone = "wan2.1-fun-1.3b-inp"\nprompt = "slow"\nslowdown = 1\n')
    assert "slowdown = 1: must be 2 to 8 or off" in one_line_error(cine("run", photo, "--preset", preset, "--dry-run"), 2)
    burst = cine("slow-motion", photo, "--last-frame", photo, "--backbone", "wan2.1-fun-1.3b-inp", "--dry-run", "--json")
    assert burst.exit_code == 0, burst.output
    assert json.loads(burst.stdout)["last_frame"] == str(photo)


def test_burst_pair_end_to_end(backbone, env, photo, tmp_path):
    second = tmp_path / "second.jpg"
    sample_image(120, 80).transpose(Image.FLIP_LEFT_RIGHT).save(second)  # another size, same orientation: fitted alike
    out = tmp_path / "burst.mp4"
    r = cine("run", photo, "--preset", backbone, "--last-frame", second, "-o", out, "--frames", "5", "--slowdown", "4",
             "--seed", "1")
    assert r.exit_code == 0, r.output
    frames, fps = decode(out)
    assert frames.shape == (4 * 4 + 1, 48, 64, 3) and fps == 8
    assert json.loads(cine("info", out, "--json").stdout)["cine"]["last_frame"] == "second.jpg"


def test_burst_pair_of_other_orientation_is_refused(backbone, env, photo, tmp_path, monkeypatch):
    import cinecli.generate.pipeline as pipeline

    monkeypatch.setattr(pipeline.Generator, "generate", lambda *a, **k: pytest.fail("generated"))
    portrait = tmp_path / "portrait.jpg"
    sample_image(64, 96).save(portrait)
    line = one_line_error(cine("run", photo, "--preset", backbone, "--last-frame", portrait, "-o", tmp_path / "x.mp4"), 3)
    assert "portrait 64x96 last frame does not pair with the landscape 96x64" in line
    assert not (tmp_path / "x.mp4").exists()


def test_pair_last_frames_patterns(tmp_path):
    for name in ("a.png", "a.last.jpg", "a.last.txt", "b.jpg", "c.png", "c_end.png", "d.last.png"):
        (tmp_path / name).write_bytes(b"x")
    found = [(str(tmp_path / n), n) for n in ("a.png", "a.last.jpg", "b.jpg", "c.png", "c_end.png", "d.last.png")]
    items, pairs = pair_last_frames(found, "{stem}.last.*")
    assert [rel for _, rel in items] == ["a.png", "b.jpg", "c.png", "c_end.png", "d.last.png"]  # d has no d.png: an item
    assert pairs == {str(tmp_path / "a.png"): str(tmp_path / "a.last.jpg")}
    items, pairs = pair_last_frames(found, "{stem}_end.{ext}")
    assert pairs == {str(tmp_path / "c.png"): str(tmp_path / "c_end.png")} and "c_end.png" not in [r for _, r in items]


def test_batch_sidecar_pair(backbone, env, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    src.mkdir()
    sample_image(96, 64).save(src / "jump.png")
    sample_image(96, 64).transpose(Image.FLIP_LEFT_RIGHT).save(src / "jump.last.jpg")
    sample_image(80, 64).save(src / "solo.png")
    r = cine("batch", src, "--preset", backbone, "-o", out, "--frames", "5", "--slowdown", "2", "--json")
    assert r.exit_code == 0, r.output
    records = {x["rel"]: x for x in map(json.loads, r.stdout.splitlines())}
    assert set(records) == {"jump.png", "solo.png"}  # the sidecar is not an item of its own
    assert (out / records["jump.png"]["last_frame"]).resolve() == (src / "jump.last.jpg").resolve()  # relative to OUTDIR
    assert records["solo.png"]["last_frame"] is None
    for rel in records:
        assert decode(out / f"{Path(rel).stem}.selftest.mp4")[0].shape[0] == 2 * 5 - 1
    meta = json.loads(cine("info", out / "jump.selftest.mp4", "--json").stdout)["cine"]
    assert meta["last_frame"] == "jump.last.jpg" and meta["slowdown"] == 2
    again = cine("batch", src, "--preset", backbone, "-o", out, "--frames", "5", "--slowdown", "2", "--json")
    assert {json.loads(x)["status"] for x in again.stdout.splitlines()} == {"skipped"}
