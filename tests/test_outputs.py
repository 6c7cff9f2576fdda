"""Nothing lost, nothing misplaced: distinct batch outputs inside OUTDIR, a manifest that survives any failure,
disk full, writable outputs checked before loading, `cine info` on non-videos, corrupt and changed weight files,
LOCAL_RANK devices, and no local paths in what people share (issue 12)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_batch import cine, frames_of, manifest, photos

from cinecli.batch.items import BatchOptions, plan_items
from cinecli.batch.manifest import append_manifest, read_manifest
from cinecli.core.errors import DiskFullError, WeightsError
from cinecli.effects.preset import Catalog
from cinecli.generate.selftest import sample_image


@pytest.fixture
def no_model(monkeypatch):
    """Any model load fails the test: usage and output errors must come before it."""
    import cinecli.generate.pipeline as pipeline
    import cinecli.models as models

    def boom(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_dit", boom)
    monkeypatch.setattr(pipeline.Generator, "generate", boom)
    monkeypatch.setattr(pipeline.Generator, "encode_prompts", boom)


def one_line(result, code: int) -> str:
    assert result.exit_code == code, (result.exit_code, result.output)
    # non-terminal stderr carries a progress line per stage ("cine: [  1.2 s] load dit: …") before a load error
    lines = [line for line in result.stderr.strip().splitlines() if not line.startswith("cine: [")]
    assert len(lines) == 1 and lines[0].startswith("cine: error:"), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


# --- 1, 14: distinct outputs, stable reruns, no local paths in the manifest or the MP4 --------------------------------
def test_camera_folders_from_stdin_get_distinct_outputs_and_no_local_paths(backbone, env, tmp_path):
    dcim, out = tmp_path / "DCIM", tmp_path / "out"
    for folder, angle in (("100", 0), ("101", 40)):
        (dcim / folder).mkdir(parents=True)
        sample_image(64, 48).rotate(angle).save(dcim / folder / "IMG_0001.png")
    listing = f"{dcim / '100' / 'IMG_0001.png'}\n{dcim / '101' / 'IMG_0001.png'}\n"  # absolute, as `find $PWD/DCIM` prints
    r = cine("batch", "-", "--preset", backbone, "-o", out, "--frames", "1", "--json", input=listing)
    assert r.exit_code == 0, r.output
    videos = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.mp4"))
    assert videos == ["100/IMG_0001.selftest.mp4", "101/IMG_0001.selftest.mp4"]
    lines = manifest(out)
    assert {x["output"] for x in lines} == set(videos)  # relative to OUTDIR, as the inputs
    assert {x["input"] for x in lines} == {"../DCIM/100/IMG_0001.png", "../DCIM/101/IMG_0001.png"}
    assert str(tmp_path) not in (out / "manifest.jsonl").read_text()
    meta = json.loads(cine("info", out / videos[0], "--json").stdout)["cine"]
    assert str(tmp_path) not in json.dumps(meta) and "/" + "tmp" not in meta["dit"]
    assert meta["dit"].startswith("dit/diffusion_pytorch_model.safetensors sha256:")  # name + content hash
    again = cine("batch", "-", "--preset", backbone, "-o", out, "--frames", "1", "--json", input=listing)
    assert [json.loads(x)["status"] for x in again.stdout.splitlines()] == ["skipped", "skipped"]  # stable reruns


def test_relative_stdin_paths_mirror_below_their_common_root(tmp_path, monkeypatch, backbone, env):
    for sub in ("coll/d1", "coll/d2", "m12"):
        (tmp_path / sub).mkdir(parents=True)
        sample_image(32, 32).save(tmp_path / sub / "IMG_0001.png")
    monkeypatch.chdir(tmp_path / "m12")
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("../coll/d1/IMG_0001.png\n../coll/d2/IMG_0001.png\n"))
    opts = BatchOptions(inputs=["-"], effects=[], outdir=Path("../clips"), preset_file=backbone)
    items = plan_items(opts, Catalog(extra_preset=backbone))
    assert sorted(i.output for i in items) == ["../clips/d1/IMG_0001.selftest.mp4", "../clips/d2/IMG_0001.selftest.mp4"]
    monkeypatch.setattr(sys, "stdin", __import__("io").StringIO("../m12/IMG_0001.png\n"))
    (item,) = plan_items(opts, Catalog(extra_preset=backbone))
    assert item.output == "../clips/IMG_0001.selftest.mp4"  # inside OUTDIR, not next to the photo


def test_clashing_outputs_are_refused_before_any_work(backbone, env, tmp_path, no_model):
    for d in ("d1", "d2"):
        (tmp_path / d).mkdir()
        sample_image(32, 32).save(tmp_path / d / "IMG_0001.png")
    out = tmp_path / "out"
    line = one_line(cine("batch", tmp_path / "d1", tmp_path / "d2", "--preset", backbone, "-o", out), 2)
    assert "outputs clash" in line and f"{tmp_path}/d1/IMG_0001.png and {tmp_path}/d2/IMG_0001.png" in line
    assert not out.exists()
    sample_image(32, 32).save(tmp_path / "d1" / "IMG_0001.jpg")
    line = one_line(cine("batch", tmp_path / "d1", "--preset", backbone, "-o", out), 2)  # .png and .jpg of one stem
    assert "IMG_0001.jpg" in line and "IMG_0001.png" in line and "{ext}" in line
    assert not out.exists()


# --- 2: every output inside OUTDIR; bad --name patterns are usage errors -------------------------------------------
@pytest.mark.parametrize("pattern,why", [("{foo}.mp4", "unknown field {foo}"), ("{stem}.mov", "must end in .mp4"),
                                         ("../../x_{stem}.mp4", "inside OUTDIR"), ("/tmp/{stem}.mp4", "inside OUTDIR"),
                                         ("{stem}/../../{stem}.mp4", "inside OUTDIR"), ("{stem.mp4", "not a valid pattern")])
def test_bad_name_patterns_exit_2_before_any_work(backbone, env, tmp_path, no_model, pattern, why):
    photos(tmp_path / "in", 1)
    out = tmp_path / "out"
    assert why in one_line(cine("batch", tmp_path / "in", "--preset", backbone, "-o", out, "--name", pattern), 2)
    assert not out.exists()


def test_name_pattern_subfolders_stay_inside(backbone, tmp_path):
    photos(tmp_path / "in", 1)
    opts = BatchOptions(inputs=[str(tmp_path / "in")], effects=[], outdir=tmp_path / "out", preset_file=backbone,
                        name="{effect}/{stem}.mp4")
    (item,) = plan_items(opts, Catalog(extra_preset=backbone))
    assert item.output == str(tmp_path / "out" / "selftest" / "face0.mp4")


# --- 3: the manifest stays valid JSONL; disk full is exit 6 ------------------------------------------------------------
def test_torn_manifest_tail_is_cut_and_the_item_redone(backbone, env, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    photos(src, 2)
    assert cine("batch", src, "--preset", backbone, "-o", out, "--frames", "1").exit_code == 0
    path = out / "manifest.jsonl"
    first = path.read_text().splitlines()[0]
    path.write_text(first + "\n" + '{"i')  # a run killed mid-append (or out of space) tore the second line
    (out / "face1.selftest.mp4").unlink()
    r = cine("batch", src, "--preset", backbone, "-o", out, "--frames", "1", "--json")
    assert r.exit_code == 0, r.output
    assert "torn last line (3 bytes)" in r.stderr
    lines = path.read_text().splitlines()
    records = [json.loads(line) for line in lines]  # every line is JSON: nothing glued onto the torn bytes
    assert [x["rel"] for x in records] == ["face0.png", "face1.png"] and records[1]["status"] == "ok"


def test_short_manifest_write_is_cut_back_and_exits_6(tmp_path, monkeypatch):
    """Simulated: os.write returns a short count (what a full disk does) for the second line."""
    append_manifest(tmp_path, {"rel": "a.png", "effect": "fx", "status": "ok"})
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, data[: len(data) // 2]))
    with pytest.raises(DiskFullError, match="disk full"):
        append_manifest(tmp_path, {"rel": "b.png", "effect": "fx", "status": "ok"})

    def enospc(fd, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "write", enospc)
    with pytest.raises(DiskFullError, match="No space left"):
        append_manifest(tmp_path, {"rel": "c.png", "effect": "fx", "status": "ok"})
    monkeypatch.setattr(os, "write", real_write)
    text = (tmp_path / "manifest.jsonl").read_text()
    assert text.endswith("\n") and [json.loads(x)["rel"] for x in text.splitlines()] == ["a.png"]
    assert list(read_manifest(tmp_path)) == [("a.png", "fx")]


def test_video_to_a_full_stdout_exits_6(backbone, env, tmp_path):
    """Real: /dev/full answers every write with ENOSPC."""
    photo = tmp_path / "p.png"
    sample_image(64, 48).save(photo)
    with open("/dev/full", "wb") as full:
        proc = subprocess.run([sys.executable, "-m", "cinecli", "run", str(photo), "--preset", str(backbone), "-o", "-",
                               "-q", "--frames", "1"], stdout=full, stderr=subprocess.PIPE, env={**os.environ, **env}, timeout=300)
    err = proc.stderr.decode().strip().splitlines()
    assert proc.returncode == 6, err
    assert err[-1].startswith("cine: error: disk full") and "Traceback" not in proc.stderr.decode()


def _userns_tmpfs() -> bool:
    try:
        return subprocess.run(["unshare", "-Urm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /tmp"],
                              capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


@pytest.mark.skipif(not _userns_tmpfs(), reason="needs unprivileged user namespaces to mount a tiny tmpfs")
def test_batch_on_a_really_full_disk_exits_6_and_resumes(backbone, env, tmp_path):
    """Real: OUTDIR is a 20 KiB tmpfs (room for about one clip) in a user namespace; then it grows and the rerun finishes."""
    src, out = tmp_path / "in", tmp_path / "out"
    photos(src, 3)
    out.mkdir()
    script = (f'mount -t tmpfs -o size=20k tmpfs "$1" && shift && "$@"; echo "rc=$?"; cp "{out}/manifest.jsonl" "{tmp_path}/m1"; '
              f'mount -o remount,size=20m "{out}" && "$@"; echo "rc=$?"; cp -r "{out}/." "{tmp_path}/final"')
    cmd = [sys.executable, "-m", "cinecli", "batch", str(src), "--preset", str(backbone), "-o", str(out), "--frames", "5", "-q"]
    proc = subprocess.run(["unshare", "-Urm", "sh", "-c", script, "sh", str(out), *cmd], capture_output=True,
                          env={**os.environ, **env}, timeout=600)
    rcs = [line for line in proc.stdout.decode().splitlines() if line.startswith("rc=")]
    assert rcs == ["rc=6", "rc=0"], (rcs, proc.stderr.decode())
    assert "cine: error: disk full" in proc.stderr.decode() and "Traceback" not in proc.stderr.decode()
    first = [json.loads(line) for line in (tmp_path / "m1").read_text().splitlines()]
    assert len(first) < 3 and all(x["status"] == "ok" for x in first)
    final = [json.loads(line) for line in (tmp_path / "final" / "manifest.jsonl").read_text().splitlines()]
    assert sorted(x["rel"] for x in final) == [f"face{i}.png" for i in range(3)]
    assert all(frames_of(tmp_path / "final" / f"face{i}.selftest.mp4") == 5 for i in range(3))


# --- 5: unwritable --report before loading ------------------------------------------------------------------------------
def test_bad_report_path_fails_before_loading_and_leaves_no_video(backbone, env, tmp_path, no_model):
    photo, out = tmp_path / "p.png", tmp_path / "clip.mp4"
    sample_image(64, 48).save(photo)
    line = one_line(cine("run", photo, "--preset", backbone, "-o", out, "--report", tmp_path / "nodir" / "r.json"), 6)
    assert "--report" in line and "does not exist" in line
    (tmp_path / "adir").mkdir()
    assert "is a directory" in one_line(cine("run", photo, "--preset", backbone, "-o", out, "--report", tmp_path / "adir"), 6)
    assert not out.exists()


def test_unwritable_batch_outdir_fails_before_loading(backbone, env, tmp_path, no_model):
    photos(tmp_path / "in", 1)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "manifest.jsonl").mkdir()  # the manifest cannot be a file here
    one_line(cine("batch", tmp_path / "in", "--preset", backbone, "-o", tmp_path / "out"), 6)


# --- 8: cine info on things that are not (whole) videos -------------------------------------------------------------
def test_info_says_not_a_video_or_truncated(tmp_path):
    from cinecli.output.video import write_mp4

    frames = np.random.default_rng(0).integers(0, 255, (9, 48, 64, 3), dtype=np.uint8)
    good = tmp_path / "good.mp4"
    write_mp4(frames, good, 8, {"seed": 1})
    data = good.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) * 2 // 3])
    (tmp_path / "notes.txt").write_text("not a video\n")
    sample_image(64, 48).save(tmp_path / "photo.png")
    assert json.loads(cine("info", good, "--json").stdout)["frames"] == 9
    assert "not a video" in one_line(cine("info", tmp_path / "notes.txt"), 3)
    assert "not a video" in one_line(cine("info", tmp_path / "photo.png"), 3)
    assert "truncated" in one_line(cine("info", tmp_path / "cut.mp4"), 3)


# --- 10: empty and corrupt weight files; local files recorded and re-hashed only when they change ------------------
@pytest.fixture
def stack(backbone, tmp_path) -> Path:
    """A private copy of the self-test stack (these tests change its files)."""
    shutil.copytree(backbone.parent, tmp_path / "stack")
    return tmp_path / "stack" / "selftest.toml"


@pytest.mark.parametrize("kind", ["empty", "random", "truncated"])
@pytest.mark.parametrize("file", ["dit/diffusion_pytorch_model.safetensors", "Wan2.1_VAE.pth"])
def test_empty_or_corrupt_weight_file_is_one_line_exit_4(stack, env, tmp_path, file, kind):
    target = stack.parent / file
    data = target.read_bytes()
    target.write_bytes({"empty": b"", "random": np.random.default_rng(1).bytes(4096), "truncated": data[: len(data) // 2]}[kind])
    photo = tmp_path / "p.png"
    sample_image(64, 48).save(photo)
    line = one_line(cine("run", photo, "--preset", stack, "-o", tmp_path / "o.mp4", "--frames", "1"), 4)
    word = {"empty": "empty", "random": "corrupt", "truncated": "truncated"}[kind]
    assert word in line and target.name in line and "mmap" not in line and "Python objects" not in line


def test_corrupt_pickle_is_not_called_unsafe(tmp_path):
    from cinecli.weights.files import iter_tensors

    (tmp_path / "x.pth").write_bytes(b"\x80\x02" + bytes(range(256)) * 4)  # a pickle header, then garbage
    with pytest.raises(WeightsError, match="corrupt checkpoint"):
        list(iter_tensors(tmp_path / "x.pth"))


def test_local_weights_are_hashed_once_and_changes_are_caught(stack, env, monkeypatch, capsys):
    from cinecli.cli.app import app  # noqa: F401 - CLI import order as in a run
    from cinecli.weights import hub, lock

    preset = Catalog(extra_preset=stack).resolve(None)
    hub.resolve_all(preset.weights(), "hint")
    recorded = lock.read_lock()["local"]
    dit = stack.parent / "dit" / "diffusion_pytorch_model.safetensors"
    assert recorded[str(dit.resolve())]["sha256"] == lock.sha256(dit) and len(recorded) >= 4
    hashed, real_sha256 = [], lock.sha256
    monkeypatch.setattr(lock, "sha256", lambda p, *a: hashed.append(p) or "0" * 64)
    hub.resolve_all(preset.weights(), "hint")
    assert hashed == []  # unchanged size and mtime: nothing re-hashed
    monkeypatch.setattr(lock, "sha256", real_sha256)
    data = bytearray(dit.read_bytes())
    data[-1] ^= 0x01  # one flipped bit, same size
    st = dit.stat()
    dit.write_bytes(bytes(data))
    os.utime(dit, ns=(st.st_atime_ns, st.st_mtime_ns))  # bit rot: not even the mtime moved
    r = cine("models", "verify")
    assert r.exit_code == 4 and "sha256 differs" in r.stdout and "diffusion_pytorch_model.safetensors" in r.stdout
    os.utime(dit)  # a replaced file: new mtime → the next run re-hashes and warns
    capsys.readouterr()
    hub.resolve_all(preset.weights(), "hint")
    err = capsys.readouterr().err
    assert "cine: warning:" in err and "changed since cine first used it" in err and "sha256" in err


# --- 13: torchrun ranks on their own GPU ---------------------------------------------------------------------------
def test_local_rank_picks_the_gpu(monkeypatch):
    from cinecli.core.devices import choose_device
    from cinecli.core.errors import DeviceError

    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "set_device", current.append)
    assert str(choose_device("auto", {"LOCAL_RANK": "3"})) == "cuda:3" and current == [3]
    assert str(choose_device("cuda", {"LOCAL_RANK": "7"})) == "cuda:7"
    assert str(choose_device("cuda:1", {"LOCAL_RANK": "7"})) == "cuda:1"  # an explicit index wins
    assert str(choose_device("auto", {})) == "cuda"
    monkeypatch.setenv("LOCAL_RANK", "5")  # as torchrun sets it for the process
    assert str(choose_device("auto")) == "cuda:5"
    with pytest.raises(DeviceError, match="LOCAL_RANK=9"):
        choose_device("auto", {"LOCAL_RANK": "9"})
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)  # one GPU made visible per rank
    assert str(choose_device("auto", {"LOCAL_RANK": "5"})) == "cuda:0"
    assert str(choose_device("cpu", {"LOCAL_RANK": "5"})) == "cpu"
