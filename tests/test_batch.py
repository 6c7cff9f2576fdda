"""`cine batch`: folders in, videos and a manifest out; resume, isolation, SIGKILL safety, shards, stdin, Ray."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import pytest
from typer.testing import CliRunner

from cinecli.batch.items import BatchOptions, in_shard, item_seed, parse_shard, plan_items
from cinecli.cli.app import app
from cinecli.effects.preset import Catalog
from cinecli.generate.selftest import sample_image


def photos(folder: Path, n: int, sub: int = 0) -> list[Path]:
    out = []
    for i in range(n):
        p = folder / ("sub" if i < sub else "") / f"face{i}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        sample_image(64 + 16 * (i % 2), 48).rotate(i * 7).save(p)
        out.append(p)
    return out


def cine(*args, input=None):
    return CliRunner().invoke(app, [str(a) for a in args], input=input, catch_exceptions=False)


def manifest(outdir: Path) -> list[dict]:
    return [json.loads(line) for line in (outdir / "manifest.jsonl").read_text().splitlines()]


def frames_of(path: Path) -> int:
    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


def test_folder_with_bad_images_then_rerun_does_no_work(backbone, env, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    photos(src, 3, sub=1)
    (src / "notes.jpg").write_text("not an image")
    (src / "empty.png").write_bytes(b"")
    (src / "sub" / "face0.txt").write_text("a cinematic portrait")  # a sidecar prompt for sub/face0.png
    r = cine("batch", src, "-r", "--preset", backbone, "-o", out, "--frames", "5", "--json")
    assert r.exit_code == 8, r.output  # some items failed
    streamed = [json.loads(line) for line in r.stdout.splitlines()]
    lines = {x["rel"]: x for x in manifest(out)}
    assert streamed == manifest(out)
    assert {k for k, v in lines.items() if v["status"] == "ok"} == {"face1.png", "face2.png", "sub/face0.png"}
    assert "not an image" in lines["notes.jpg"]["error"] and "0 bytes" in lines["empty.png"]["error"]
    assert lines["notes.jpg"]["stage"] == "read image"
    # prompts (the preset's and face0's sidecar) were encoded before the DiT loaded, not item by item
    assert all("load text_encoder" not in x["timings"] for x in lines.values())
    sidecar = json.loads(cine("info", out / "sub" / "face0.selftest.mp4", "--json").stdout)["cine"]["prompt"]
    assert sidecar == "a cinematic portrait"
    for rel in ("face1.png", "face2.png", "sub/face0.png"):
        video = out / Path(rel).parent / f"{Path(rel).stem}.selftest.mp4"
        assert frames_of(video) == 5 and len(lines[rel]["output_sha256"]) == 64
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.mp4")}
    again = cine("batch", src, "-r", "--preset", backbone, "-o", out, "--frames", "5", "--json")
    statuses = {json.loads(x)["rel"]: json.loads(x)["status"] for x in again.stdout.splitlines()}
    assert statuses["face1.png"] == statuses["sub/face0.png"] == "skipped" and statuses["empty.png"] == "failed"
    assert mtimes == {p: p.stat().st_mtime_ns for p in out.rglob("*.mp4")}
    # new parameters: the clips made with the old ones are kept (issue 22: never replaced without --overwrite) …
    changed = cine("batch", src, "-r", "--preset", backbone, "-o", out, "--frames", "9", "--json")
    kept = {json.loads(x)["rel"]: json.loads(x) for x in changed.stdout.splitlines()}["face1.png"]
    assert kept["status"] == "skipped" and kept["error"] == "output exists"
    assert mtimes == {p: p.stat().st_mtime_ns for p in out.rglob("*.mp4")}
    # … and redone with --overwrite
    changed = cine("batch", src, "-r", "--preset", backbone, "-o", out, "--frames", "9", "--json", "--overwrite")
    assert {json.loads(x)["rel"]: json.loads(x)["status"] for x in changed.stdout.splitlines()}["face1.png"] == "ok"


def test_sigkill_mid_batch_leaves_no_partial_file_and_resume_finishes(backbone, env, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    photos(src, 4)
    cmd = [sys.executable, "-m", "cinecli", "batch", str(src), "--preset", str(backbone), "-o", str(out), "--frames", "5", "-q"]
    proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "manifest.jsonl").exists():
        time.sleep(0.05)
    time.sleep(0.3)  # into the next item
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = [x["rel"] for x in manifest(out) if x["status"] == "ok"]
    assert 1 <= len(done) < 4
    files = [p for p in out.rglob("*") if p.is_file() and p.name != "manifest.jsonl"]
    assert len(files) == len(done) and all(frames_of(p) == 5 for p in files)  # complete videos only, nothing partial
    r = cine("batch", src, "--preset", backbone, "-o", out, "--frames", "5", "--json")
    assert r.exit_code == 0, r.output
    statuses = [json.loads(x)["status"] for x in r.stdout.splitlines()]
    assert statuses.count("skipped") == len(done) and statuses.count("ok") == 4 - len(done)


def test_shards_cover_every_item_once_with_the_same_seeds(backbone, env, tmp_path):
    src = tmp_path / "in"
    photos(src, 6, sub=2)
    catalog = Catalog(extra_preset=backbone)
    opts = lambda shard: BatchOptions(inputs=[str(src)], effects=[], outdir=tmp_path / "o", recursive=True,  # noqa: E731
                                      preset_file=backbone, shard=shard, seed=11)
    whole = {(i.rel, i.effect): i.seed for i in plan_items(opts((0, 1)), catalog)}
    parts = [{(i.rel, i.effect): i.seed for i in plan_items(opts((k, 3)), catalog)} for k in range(3)]
    assert sum(len(p) for p in parts) == len(whole) == 6
    assert {k: v for p in parts for k, v in p.items()} == whole
    for k in (0, 1):
        assert cine("batch", src, "-r", "--preset", backbone, "-o", tmp_path / "sharded", "--shard", f"{k}/2", "--seed", "11",
                    "--frames", "1").exit_code == 0
    made = {x["rel"]: x["seed"] for x in manifest(tmp_path / "sharded")}
    assert made == {rel: seed for (rel, _), seed in whole.items()}
    assert all(seed == item_seed(11, rel) for rel, seed in made.items())


def test_shard_detection_from_launchers():
    assert parse_shard(None, {"RANK": "2", "WORLD_SIZE": "4"}) == (2, 4)
    assert parse_shard(None, {"SLURM_ARRAY_TASK_ID": "5", "SLURM_ARRAY_TASK_MIN": "1", "SLURM_ARRAY_TASK_COUNT": "8"}) == (4, 8)
    assert parse_shard("1/3", {"RANK": "0", "WORLD_SIZE": "2"}) == (1, 3)
    assert parse_shard(None, {}) == (0, 1)
    assert sum(in_shard(f"p{i}.jpg", (k, 4)) for i in range(50) for k in range(4)) == 50


def test_stdin_paths_and_json_stream(backbone, env, tmp_path):
    src, out = tmp_path / "in", tmp_path / "out"
    files = photos(src, 2)
    r = cine("batch", "-", "--preset", backbone, "-o", out, "--frames", "1", "--json", input="\n".join(map(str, files)) + "\n")
    assert r.exit_code == 0, r.output
    records = [json.loads(x) for x in r.stdout.splitlines()]
    assert [x["status"] for x in records] == ["ok", "ok"] and all((out / x["output"]).exists() for x in records)


def test_ray_runs_the_same_items(backbone, env, tmp_path):
    try:
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError:
        pytest.skip("Ray is not installed here (pip install 'cinecli[ray]')")
    src, out = tmp_path / "in", tmp_path / "out"
    photos(src, 2)
    r = cine("batch", src, "--preset", backbone, "-o", out, "--frames", "1", "--ray", "--json")
    assert r.exit_code == 0, r.output
    records = manifest(out)
    assert sorted(x["rel"] for x in records) == ["face0.png", "face1.png"] and all(x["status"] == "ok" for x in records)
    assert all(frames_of(out / x["output"]) == 1 for x in records)
    again = cine("batch", src, "--preset", backbone, "-o", out, "--frames", "1", "--ray", "--json")
    assert [json.loads(x)["status"] for x in again.stdout.splitlines()] == ["skipped", "skipped"]


def test_out_of_memory_on_one_item_is_recorded_and_the_batch_goes_on(backbone, env, tmp_path, monkeypatch):
    import torch

    from cinecli.generate.pipeline import Generator

    original = Generator.generate

    def generate(self, request, the_plan, image):
        if str(request.image).endswith("face1.png"):
            with self.timings.stage("denoise step 2/4"):
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return original(self, request, the_plan, image)

    monkeypatch.setattr(Generator, "generate", generate)
    src, out = tmp_path / "in", tmp_path / "out"
    photos(src, 3)
    r = cine("batch", src, "--preset", backbone, "-o", out, "--frames", "1")
    assert r.exit_code == 8, r.output
    lines = {x["rel"]: x for x in manifest(out)}
    assert lines["face0.png"]["status"] == lines["face2.png"]["status"] == "ok"
    failed = lines["face1.png"]
    assert failed["status"] == "failed" and failed["stage"] == "denoise step 2/4"
    assert "out of memory in stage 'denoise step 2/4'" in failed["error"] and "1 frames" in failed["error"]


def test_inputs_from_folders_globs_and_files(tmp_path):
    from cinecli.batch.items import collect

    photos(tmp_path / "shoot", 3, sub=1)
    (tmp_path / "shoot" / "notes.md").write_text("not a photo")
    assert [rel for _, rel in collect([str(tmp_path / "shoot")], False)] == ["face1.png", "face2.png"]
    assert [rel for _, rel in collect([str(tmp_path / "shoot")], True)] == ["face1.png", "face2.png", "sub/face0.png"]
    assert [rel for _, rel in collect([str(tmp_path / "shoot") + "/**/*.png"], False)] == ["face1.png", "face2.png", "sub/face0.png"]
    single = collect([str(tmp_path / "shoot" / "face1.png"), str(tmp_path / "shoot" / "face1.png")], False)
    assert [rel for _, rel in single] == ["face1.png"]  # the same photo twice is one item
