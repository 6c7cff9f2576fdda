"""RIFE v4.26: cine's IFNet against an independent functional re-implementation of the published forward, strict
loading of the published flownet.pkl layout, `cine interpolate`, and RIFE in `--slowdown` / `--fast-frames` runs.

Weights are random tensors in the published key layout (DDP's ``module.`` prefix), saved as ``flownet.pkl``: the
real file cannot be downloaded here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_cli import cine, decode, one_line_error

from cinecli.models.rife import IFNet, load_rife, load_state, random_state
from cinecli.output.video import write_mp4


# --- an independent reference: the published IFNet_HDv3 forward (v4.25/4.26), written as plain functions over the
# state dict, structured like the published code (linspace grid, scale_factor resizes, per-level concatenation),
# not like cine's module ----------------------------------------------------------------------------------------
def _p(sd, name):
    return sd["module." + name]


def _wb(sd, name):
    return _p(sd, name + ".weight"), _p(sd, name + ".bias")


def ref_warp(x, flow):
    n, _, h, w = flow.shape
    horizontal = torch.linspace(-1.0, 1.0, w).view(1, 1, 1, w).expand(n, -1, h, -1)
    vertical = torch.linspace(-1.0, 1.0, h).view(1, 1, h, 1).expand(n, -1, -1, w)
    grid = torch.cat([horizontal, vertical], 1)
    flow = torch.cat([flow[:, 0:1] / ((x.shape[3] - 1.0) / 2.0), flow[:, 1:2] / ((x.shape[2] - 1.0) / 2.0)], 1)
    grid = (grid + flow).permute(0, 2, 3, 1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


def ref_head(sd, x):
    for i in range(3):
        x = F.leaky_relu(F.conv2d(x, *_wb(sd, f"encode.cnn{i}"), stride=2 if i == 0 else 1, padding=1), 0.2)
    return F.conv_transpose2d(x, *_wb(sd, "encode.cnn3"), stride=2, padding=1)


def ref_block(sd, b, x, flow, scale):
    x = F.interpolate(x, scale_factor=1.0 / scale, mode="bilinear", align_corners=False)
    if flow is not None:
        flow = F.interpolate(flow, scale_factor=1.0 / scale, mode="bilinear", align_corners=False) * 1.0 / scale
        x = torch.cat((x, flow), 1)
    for j in range(2):
        x = F.leaky_relu(F.conv2d(x, *_wb(sd, f"block{b}.conv0.{j}.0"), stride=2, padding=1), 0.2)
    for j in range(8):
        y = F.conv2d(x, *_wb(sd, f"block{b}.convblock.{j}.conv"), padding=1)
        x = F.leaky_relu(y * _p(sd, f"block{b}.convblock.{j}.beta") + x, 0.2)
    tmp = F.conv_transpose2d(x, *_wb(sd, f"block{b}.lastconv.0"), stride=2, padding=1)
    tmp = F.interpolate(F.pixel_shuffle(tmp, 2), scale_factor=scale, mode="bilinear", align_corners=False)
    return tmp[:, :4] * scale, tmp[:, 4:5], tmp[:, 5:]


def ref_inference(sd, img0, img1, timestep, multiple=64):
    h, w = img0.shape[2:]
    pad = (0, (multiple - w % multiple) % multiple, 0, (multiple - h % multiple) % multiple)
    img0, img1 = F.pad(img0, pad), F.pad(img1, pad)
    if torch.is_tensor(timestep):  # one timestep per sample, as the published forward takes a tensor
        timestep = timestep.view(-1, 1, 1, 1).repeat(1, 1, img0.shape[2], img0.shape[3])
    else:
        timestep = (img0[:, :1].clone() * 0 + 1) * timestep
    f0, f1 = ref_head(sd, img0), ref_head(sd, img1)
    warped_img0, warped_img1, flow, mask, feat = img0, img1, None, None, None
    for i, scale in enumerate([16, 8, 4, 2, 1]):
        if flow is None:
            flow, mask, feat = ref_block(sd, i, torch.cat((img0, img1, f0, f1, timestep), 1), None, scale)
        else:
            wf0, wf1 = ref_warp(f0, flow[:, :2]), ref_warp(f1, flow[:, 2:4])
            x = torch.cat((warped_img0, warped_img1, wf0, wf1, timestep, mask, feat), 1)
            fd, mask, feat = ref_block(sd, i, x, flow, scale)
            flow = flow + fd
        warped_img0, warped_img1 = ref_warp(img0, flow[:, :2]), ref_warp(img1, flow[:, 2:4])
    mask = torch.sigmoid(mask)
    return (warped_img0 * mask + warped_img1 * (1 - mask))[:, :, :h, :w]


# --- fixtures ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def state() -> dict:
    return random_state(seed=1)


@pytest.fixture
def flownet(tmp_path, state) -> Path:
    path = tmp_path / "rife" / "flownet.pkl"
    path.parent.mkdir()
    torch.save(state, path)
    return path


def moving_clip(frames: int = 4, w: int = 72, h: int = 40) -> np.ndarray:
    """A bright square moving 4 px per frame over a gradient: [T, H, W, 3] uint8."""
    yy, xx = np.mgrid[:h, :w]
    out = np.empty((frames, h, w, 3), np.uint8)
    for t in range(frames):
        img = np.stack([xx * 3, yy * 5, (xx + yy) * 2], -1) % 256
        img[10:26, 8 + 4 * t: 24 + 4 * t] = (250, 240, 30)
        out[t] = img
    return out


@pytest.fixture
def clip(tmp_path) -> Path:
    path = tmp_path / "in.mp4"
    write_mp4(moving_clip(), path, 12, crf=0)
    return path


# --- the model -----------------------------------------------------------------------------------------------------
def test_matches_the_published_forward(state):
    """cine's IFNet = the published forward (reference above) within 1e-5 in fp32, at 100x70 (no multiple of 32),
    for several timesteps in one batch."""
    net = load_state(IFNet(), state).eval()
    gen = torch.Generator().manual_seed(0)
    img0, img1 = torch.rand(3, 3, 70, 100, generator=gen), torch.rand(3, 3, 70, 100, generator=gen)
    t = torch.tensor([0.25, 0.5, 0.875])
    with torch.no_grad():
        ours = net(img0, img1, t)
        ref = ref_inference(state, img0, img1, t)
        one = net(img0[1:2], img1[1:2], 0.5)
        ref_one = ref_inference(state, img0[1:2], img1[1:2], 0.5)
    diff = (ours - ref).abs().max().item()
    diff_one = (one - ref_one).abs().max().item()
    print(f"max abs diff vs the published forward: {diff:.3g} (batch of 3), {diff_one:.3g} (one pair, scalar t)")
    assert ours.shape == (3, 3, 70, 100) and diff <= 1e-5 and diff_one <= 1e-5
    assert (ours[0] - ours[2]).abs().max() > 1e-3  # the timestep matters


def test_strict_loading_of_the_published_layout(flownet, state, tmp_path):
    net = load_rife(flownet)
    assert all(not p.requires_grad for p in net.parameters())
    assert set(state) == {"module." + k for k in IFNet().state_dict()}  # every key carries DDP's prefix
    training = dict(state, **{"module.teacher.conv0.0.0.weight": torch.zeros(1), "module.caltime.0.weight": torch.zeros(1)})
    load_state(IFNet(), training)  # the training-only modules a training checkpoint carries are skipped by name
    from cinecli.core.errors import WeightsError

    missing = dict(state)
    missing.pop("module.block3.convblock.5.beta")
    with pytest.raises(WeightsError, match="1 missing"):
        load_state(IFNet(), missing)
    with pytest.raises(WeightsError, match="1 unexpected"):
        load_state(IFNet(), dict(state, **{"module.block5.conv0.0.0.weight": torch.zeros(1)}))
    old = dict(state, **{"module.encode.cnn3.weight": torch.zeros(16, 16, 4, 4)})  # v4.22's 16-channel Head
    with pytest.raises(WeightsError, match="encode.cnn3.weight"):
        load_state(IFNet(), old)


@pytest.mark.parametrize("change", ["missing", "extra"])
def test_bad_weights_exit_4(env, clip, tmp_path, state, change):
    bad = dict(state)
    if change == "missing":
        bad.pop("module.encode.cnn0.bias")
    else:
        bad["module.unknown.weight"] = torch.zeros(2)
    path = tmp_path / "bad.pkl"
    torch.save(bad, path)
    line = one_line_error(cine("interpolate", clip, "--factor", "2", "--weights", path, "-o", tmp_path / "o.mp4"), 4)
    assert "do not fit RIFE v4.26" in line and ("missing" if change == "missing" else "unexpected") in line
    assert not (tmp_path / "o.mp4").exists()


# --- cine interpolate -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("factor", [2, 3])
def test_interpolate_end_to_end(env, clip, flownet, tmp_path, factor):
    out = tmp_path / f"x{factor}.mp4"
    r = cine("interpolate", clip, "--factor", factor, "--weights", flownet, "-o", out, "--crf", "0")
    assert r.exit_code == 0, r.output
    assert r.stdout.strip().splitlines()[-1] == str(out)
    src, _ = decode(clip)
    frames, fps = decode(out)
    assert frames.shape == ((4 - 1) * factor + 1, 40, 72, 3) and fps == 12
    kept = np.abs(frames[::factor].astype(int) - src.astype(int)).mean()
    assert kept < 2.0, kept  # the clip's own frames pass through (up to the yuv420p round trip)
    assert np.abs(frames[1].astype(int) - src[0].astype(int)).mean() > 0.5  # a new frame, not a copy
    meta = json.loads(cine("info", out, "--json").stdout)["cine"]
    assert meta["interpolation"] == "rife-v4.26" and meta["factor"] == factor and meta["output_frames"] == frames.shape[0]
    assert meta["interpolation_weights"] == "flownet.pkl" and len(meta["interpolation_sha256"]) == 64
    assert str(tmp_path) not in json.dumps(meta)  # a file's name and hash, never its folder


def test_interpolate_json_report(env, clip, flownet, tmp_path):
    """--json: one document on stdout saying what was done; with --dry-run, what would be; never beside -o -."""
    out = tmp_path / "slow.mp4"
    r = cine("interpolate", clip, "--factor", "3", "--weights", flownet, "-o", out, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    frames, _ = decode(out)
    assert doc["output"] == str(out) and doc["output_frames"] == frames.shape[0] == (doc["frames"] - 1) * 3 + 1
    assert doc["interpolator"] == "rife" and len(doc["interpolation_sha256"]) == 64
    assert "interpolate rife x3" in doc["stages"] and doc["total_s"] > 0
    dry = json.loads(cine("interpolate", clip, "--factor", "2", "--weights", flownet, "--dry-run", "--json").stdout)
    assert dry["dry_run"] and dry["weights"]["present"] and dry["output_frames"] == (dry["frames"] - 1) * 2 + 1
    assert cine("interpolate", clip, "--factor", "2", "-o", "-", "--json").exit_code == 2


def test_interpolate_stdin_to_stdout(env, clip, flownet, tmp_path):
    out = tmp_path / "piped.mp4"
    with open(out, "wb") as f:
        proc = subprocess.run([sys.executable, "-m", "cinecli", "interpolate", "-", "--factor", "2", "--weights",
                               str(flownet), "-o", "-", "-q"], input=clip.read_bytes(), stdout=f, stderr=subprocess.PIPE,
                              env={**os.environ, **env}, timeout=300)
    assert proc.returncode == 0, proc.stderr.decode()
    frames, fps = decode(out)
    assert frames.shape[0] == 7 and fps == 12


@pytest.mark.parametrize("factor", ["0", "1", "1.5", "9", "-2", "two"])
def test_bad_factor_exits_2_before_loading(env, clip, flownet, monkeypatch, factor):
    import cinecli.models.rife as rife
    import cinecli.models.rife_weights as rife_weights

    def boom(*a, **k):
        raise AssertionError("weights were looked up or loaded")

    monkeypatch.setattr(rife, "load_rife", boom)
    monkeypatch.setattr(rife_weights, "locate_rife", boom)
    line = one_line_error(cine("interpolate", clip, "--factor", factor, "--weights", flownet, "-o", clip.parent / "o.mp4"), 2)
    assert f"--factor {factor}" in line


def test_one_frame_clip_exits_2_before_loading(env, flownet, tmp_path, monkeypatch):
    import cinecli.models.rife_weights as rife_weights

    monkeypatch.setattr(rife_weights, "locate_rife", lambda *a, **k: pytest.fail("weights looked up"))
    one = tmp_path / "one.mp4"
    write_mp4(moving_clip(1), one, 12)
    assert "needs at least 2" in one_line_error(cine("interpolate", one, "--factor", "2", "-o", tmp_path / "o.mp4"), 2)


def test_offline_without_weights_exits_4_naming_the_pull(env, clip, tmp_path):
    dry = cine("interpolate", clip, "--factor", "2", "--dry-run")
    assert dry.exit_code == 0 and "MISSING" in dry.stderr and "22.9 MB" in dry.stderr
    line = one_line_error(cine("interpolate", clip, "--factor", "2", "-o", tmp_path / "o.mp4"), 4)
    assert "cine models pull rife" in line and "hzwer/RIFE/RIFEv4.26_0921.zip" in line


def test_minterpolate_needs_no_weights(env, clip, tmp_path):
    out = tmp_path / "m.mp4"
    r = cine("interpolate", clip, "--factor", "2", "--interpolator", "minterpolate", "-o", out)
    assert r.exit_code == 0, r.output
    assert decode(out)[0].shape[0] == 7
    assert json.loads(cine("info", out, "--json").stdout)["cine"]["interpolation"].startswith("minterpolate")


def test_models_scan_and_folder_find_flownet(env, flownet, clip, tmp_path):
    r = cine("models", "scan", flownet.parent, "--json")
    assert json.loads(r.stdout)[0]["kind"] == "rife"
    dry = cine("interpolate", clip, "--factor", "2", "--dry-run", "--offline")
    assert "MISSING" in dry.stderr
    assert "missing" in cine("models", "list", "rife").stdout
    big = flownet.parent / "other.pkl"
    with open(big, "wb") as f:  # a pickle far larger than flownet.pkl is not read (sparse: no disk used)
        f.write(b"\x80")
        f.truncate(257 << 20)
    assert {f["path"]: f["kind"] for f in json.loads(cine("models", "scan", flownet.parent, "--json").stdout)}[str(big)] == "unknown"
    os.environ["CINE_MODELS_DIR"] = str(flownet.parent)  # `env` removes it again after the test
    dry = cine("interpolate", clip, "--factor", "2", "--dry-run")
    assert "present" in dry.stderr and "flownet.pkl" in dry.stderr
    listed = json.loads(cine("models", "list", "rife", "--json").stdout)["rife"]["rife"]
    assert listed["present"] and listed["source"] == "models dir"


def test_zip_from_the_hub_cache_is_extracted_once(env, state, tmp_path, monkeypatch):
    """The published archive (train_log/flownet.pkl beside code and Mac metadata) → flownet.pkl in cine's cache."""
    import zipfile

    from cinecli.models import rife_weights
    from cinecli.weights.hub import Resolved

    archive = tmp_path / "RIFEv4.26_0921.zip"
    pkl = tmp_path / "flownet.pkl"
    torch.save(state, pkl)
    with zipfile.ZipFile(archive, "w") as zf:
        zf.write(pkl, "train_log/flownet.pkl")
        zf.writestr("train_log/IFNet_HDv3.py", "# code cine does not run")
        zf.writestr("__MACOSX/train_log/._flownet.pkl", b"\0" * 10)
    monkeypatch.setattr("cinecli.weights.hub.locate", lambda ref: Resolved(ref, archive, [archive]))
    from cinecli.core.errors import WeightsError
    from cinecli.weights.lock import sha256

    with pytest.raises(WeightsError, match="not the published RIFE v4.26 archive"):  # checked against the pin
        rife_weights.locate_rife()
    assert not list(tmp_path.glob("cache/rife/*/flownet.pkl"))  # nothing extracted from an unknown archive
    monkeypatch.setattr(rife_weights, "ARCHIVE_SHA256", sha256(archive))  # the test's archive stands in for it
    found = rife_weights.locate_rife()
    assert found.source == "hub cache" and found.path.read_bytes() == pkl.read_bytes()
    assert found.sha256 == sha256(pkl)
    mtime = found.path.stat().st_mtime_ns
    assert rife_weights.locate_rife().path.stat().st_mtime_ns == mtime  # not extracted again


# --- runs: --slowdown and --fast-frames -------------------------------------------------------------------------
def test_slowdown_uses_rife_from_a_models_dir(backbone, env, photo, flownet, tmp_path):
    out = tmp_path / "slow.mp4"
    r = cine("run", photo, "--preset", backbone, "-o", out, "--seed", "3", "--slowdown", "3", "--json",
             "--models-dir", flownet.parent)
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert "interpolate rife x3" in report["stages"]
    frames, fps = decode(out)
    assert frames.shape[0] == (9 - 1) * 3 + 1 and fps == 8
    meta = json.loads(cine("info", out, "--json").stdout)["cine"]
    assert meta["interpolation"] == "rife-v4.26" and meta["slowdown"] == 3 and len(meta["interpolation_sha256"]) == 64


def test_slowdown_offline_without_rife_says_minterpolate(backbone, env, photo, tmp_path):
    out = tmp_path / "slow.mp4"
    r = cine("run", photo, "--preset", backbone, "-o", out, "--seed", "3", "--slowdown", "2", "--json")
    assert r.exit_code == 0, r.output
    said = [line for line in r.stderr.splitlines() if "RIFE" in line]
    assert len(said) == 1 and "minterpolate" in said[0] and "cine models pull rife" in said[0]
    assert "interpolate minterpolate x2" in json.loads(r.stdout)["stages"]


def test_fast_frames_generates_half_and_delivers_all(backbone, env, photo, flownet, tmp_path):
    dry = json.loads(cine("run", photo, "--preset", backbone, "--frames", "17", "--fast-frames", "--dry-run", "--json",
                          "--models-dir", flownet.parent).stdout)
    assert dry["frames"] == 9 and dry["delivered_frames"] == 17 and dry["output_frames"] == 17
    assert dry["plan"]["frames"] == 9 and dry["plan"]["delivered_frames"] == 17
    assert any(s["stage"] == "interpolate rife x2" for s in dry["plan"]["stages"])
    assert dry["weights"]["rife"]["present"] and dry["weights"]["rife"]["bytes"] == flownet.stat().st_size
    out = tmp_path / "fast.mp4"
    r = cine("run", photo, "--preset", backbone, "-o", out, "--frames", "17", "--fast-frames", "--json", "--seed", "2",
             "--models-dir", flownet.parent)
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["sizes"]["frames"] == 9 and report["sizes"]["delivered_frames"] == 17
    assert "interpolate rife x2" in report["stages"]
    frames, fps = decode(out)
    assert frames.shape[0] == 17 and fps == 8
    text = cine("run", photo, "--preset", backbone, "--frames", "13", "--fast-frames", "--dry-run",
                "--models-dir", flownet.parent)
    assert "frames 13 → 17" in text.stderr and "interpolated x2 (rife) to 17" in text.stderr


def test_batch_takes_fast_frames_and_the_interpolator(backbone, env, photo, flownet, tmp_path):
    """cine batch has run's --fast-frames and --interpolator: 9 generated, 17 delivered, by the interpolator asked."""
    for interpolator, extra in (("rife", ["--models-dir", str(flownet.parent)]), ("minterpolate", [])):
        outdir = tmp_path / interpolator
        r = cine("batch", photo, "--preset", backbone, "-o", outdir, "--frames", "17", "--fast-frames",
                 "--interpolator", interpolator, "--seed", "2", *extra)
        assert r.exit_code == 0, r.output
        frames, _ = decode(next(outdir.glob("*.mp4")))
        assert frames.shape[0] == 17
        meta = json.loads(cine("info", next(outdir.glob("*.mp4")), "--json").stdout)["cine"]
        assert meta["interpolation"].startswith(interpolator) and meta["frames"] == 9


def test_slow_motion_preset_defaults_to_rife_x2(env, photo, flownet):
    doc = json.loads(cine("slowmo", photo, "--dry-run", "--json", "--models-dir", flownet.parent).stdout)
    assert doc["slowdown"] == 2 and doc["interpolator"] == "rife" and doc["output_frames"] == 97
    assert doc["weights"]["rife"]["present"]
    off = json.loads(cine("slowmo", photo, "--dry-run", "--json", "--interpolator", "minterpolate").stdout)
    assert off["interpolator"] == "minterpolate" and "rife" not in off["weights"]
