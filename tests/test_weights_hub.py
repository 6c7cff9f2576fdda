"""Weights from a Hugging Face cache the tests build in the real on-disk layout: offline runs, lock, verify, inspect."""

from __future__ import annotations

import json
import shlex
import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from test_lora import known_delta, write_style
from typer.testing import CliRunner

from cinecli.cli.app import app
from cinecli.effects.preset import WeightRef
from cinecli.generate.selftest import sample_image, write_backbone
from cinecli.models.wan_dit import DIT_CONFIGS
from cinecli.weights import lock

SHA = "0123456789abcdef0123456789abcdef01234567"
TINY_REPO = "cine-test/tiny-wan"
LORA_REPO = "cine-test/tiny-loras"


def fake_hub_repo(cache: Path, repo: str, files: dict[str, Path]) -> Path:
    """models--org--name/{refs/main, snapshots/<sha>/...} as huggingface_hub lays it out."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = folder / "snapshots" / SHA
    for rel, src in files.items():
        dst = snapshot / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(src, dst) if src.is_dir() else shutil.copy(src, dst)
    (folder / "refs").mkdir(parents=True, exist_ok=True)
    (folder / "refs" / "main").write_text(SHA)
    return snapshot


@pytest.fixture
def hub(tmp_path, monkeypatch, env):
    """A tiny backbone and two LoRAs in a fake hub cache, and user config that points the real presets at them."""
    from transformers.utils import logging

    logging.disable_progress_bar()
    stack = write_backbone(tmp_path / "stack").parent
    cache = tmp_path / "hf" / "hub"
    snap = fake_hub_repo(cache, TINY_REPO, {"dit": stack / "dit", "Wan2.1_VAE.pth": stack / "Wan2.1_VAE.pth",
                                            "text_encoder": stack / "text_encoder", "tokenizer": stack / "tokenizer",
                                            "image_encoder": stack / "image_encoder"})
    cfg = DIT_CONFIGS["tiny-i2v"]
    write_style("diff", known_delta(cfg, seed=3, targets=["blocks.0.ffn.0"]), tmp_path / "distill.safetensors")
    write_style("kohya", known_delta(cfg, seed=4), tmp_path / "bullet.safetensors")
    lora_snap = fake_hub_repo(cache, LORA_REPO, {"distill.safetensors": tmp_path / "distill.safetensors",
                                                 "bullet/bullet_20_epochs.safetensors": tmp_path / "bullet.safetensors"})
    config = tmp_path / "config" / "cine"
    (config / "presets").mkdir(parents=True)
    (config / "loras").mkdir()
    # Same names as the built-in backbone and cards: user definitions shadow them, the bullet-time preset stays real.
    (config / "presets" / "backbones.toml").write_text(f'''["wan2.1-i2v-14b-480p-4step"]
dit = {{ repo = "{TINY_REPO}", file = "dit/" }}
vae = {{ repo = "{TINY_REPO}", file = "Wan2.1_VAE.pth" }}
text_encoder = {{ repo = "{TINY_REPO}", file = "text_encoder/" }}
tokenizer = {{ repo = "{TINY_REPO}", file = "tokenizer/" }}
image_encoder = {{ repo = "{TINY_REPO}", file = "image_encoder/" }}
merge = ["lightx2v-i2v-480p-4step"]
sampler = {{ kind = "distill", timesteps = [1000, 750, 500, 250], shift = 5.0 }}
''')
    (config / "loras" / "lightx2v.toml").write_text(f'name = "lightx2v-i2v-480p-4step"\nsource = {{ repo = "{LORA_REPO}", file = "distill.safetensors" }}\n')
    (config / "loras" / "bullet.toml").write_text(f'name = "bullet-time"\ntrigger = "rw360xz"\n'
                                                 f'source = {{ repo = "{LORA_REPO}", file = "bullet/*.safetensors" }}\n')
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))  # on top of the isolated, offline `env`
    monkeypatch.setenv("CINE_DATA_DIR", str(tmp_path / "cine-data"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))  # read at import time; the tests import it earlier
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    photo = tmp_path / "portrait.png"
    sample_image(64, 96).save(photo)
    return {"snap": snap, "lora_snap": lora_snap, "photo": photo, "tmp": tmp_path}


def cine(*args):
    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def test_offline_run_with_weights_present_makes_no_network_call(hub, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("network access during an offline run")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    out = hub["tmp"] / "out.mp4"
    r = cine("bulletti", hub["photo"], "-o", out, "--frames", "5", "--seed", "1", "--json")
    assert r.exit_code == 0, r.output
    report = json.loads(r.stdout)
    assert report["job"]["effect"] == "bullet-time" and report["job"]["prompt"].startswith("rw360xz")
    assert "load effect bullet-time" in report["stages"]
    meta = json.loads(cine("info", out, "--json").stdout)["cine"]
    assert meta["loras"] == ["lightx2v-i2v-480p-4step", "bullet-time"]


def test_missing_weights_offline_name_files_and_command(hub):
    shutil.rmtree(hub["snap"] / "image_encoder")
    r = cine("bullet-time", hub["photo"], "-o", hub["tmp"] / "x.mp4")
    assert r.exit_code == 4, r.output
    assert f"{TINY_REPO}/image_encoder/" in r.stderr and "cine models pull bullet-time" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    pull = cine("models", "pull", "bullet-time", "-y")
    assert pull.exit_code == 4 and "offline mode" in pull.stderr


def test_models_list_path_and_verify_against_lock(hub):
    listing = json.loads(cine("models", "list", "bullet-time", "--json").stdout)["bullet-time"]
    assert all(w["present"] for w in listing.values()) and listing["dit"]["bytes"] > 0
    paths = dict(line.split("\t") for line in cine("models", "path", "bulletti").stdout.strip().splitlines())
    assert paths["effect:bullet-time"].endswith("bullet_20_epochs.safetensors")
    ref = WeightRef(repo=LORA_REPO, file="bullet/*.safetensors")
    lock.record(ref, SHA, hub["lora_snap"], [hub["lora_snap"] / "bullet" / "bullet_20_epochs.safetensors"])
    assert cine("models", "verify").exit_code == 0
    target = hub["lora_snap"] / "bullet" / "bullet_20_epochs.safetensors"
    data = bytearray(target.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes: only the sha256 can tell
    target.write_bytes(bytes(data))
    r = cine("models", "verify")
    assert r.exit_code == 4 and "sha256 differs" in r.stdout


def test_lora_inspect_counts_and_refuses_misfits(hub):
    r = cine("lora", "inspect", hub["tmp"] / "bullet.safetensors", "--json")
    doc = json.loads(r.stdout)
    assert doc["format"] == "kohya" and doc["targets"] == 10 and doc["ranks"] == {"4": 10} and doc["alphas"] == {"2.0": 10}
    fit = cine("lora", "inspect", hub["tmp"] / "bullet.safetensors", "--backbone", hub["snap"] / "dit", "--json")
    assert fit.exit_code == 0 and json.loads(fit.stdout)["matched"] == 10
    big = DIT_CONFIGS["tiny-i2v"].__class__(dim=512, num_heads=4, num_layers=2, ffn_dim=512, text_dim=32, image_dim=32, freq_dim=64)
    write_style("diffusers", known_delta(big, targets=["blocks.0.self_attn.q", "blocks.1.ffn.0"]), hub["tmp"] / "big.safetensors")
    misfit = cine("lora", "inspect", hub["tmp"] / "big.safetensors", "--backbone", hub["snap"] / "dit")
    assert misfit.exit_code == 4 and "does not fit" in misfit.stderr and "0 of 2 targets match" in misfit.stdout
    save_file({"blocks.0.self_attn.q.diff": torch.zeros(256, 256)}, str(hub["tmp"] / "d.safetensors"))
    assert json.loads(cine("lora", "inspect", hub["tmp"] / "d.safetensors", "--json").stdout)["full_deltas"] == 1


def _hinted(stderr: str) -> tuple[set[str], list[str]]:
    """The missing references and the hinted command of a missing-weights error line."""
    line = stderr.strip().splitlines()[-1]
    missing, command = line.split("): ", 1)[1].split("; use Wan files")[0], line.split("fetch them with: ")[1]
    return set(missing.split(", ")), shlex.split(command)


def test_missing_weights_hint_is_a_command_that_fetches_exactly_them(hub, monkeypatch):
    """--backbone and --preset runs: the hinted `cine models pull …` (run as printed, against a simulated hub that
    copies files into the test cache) downloads exactly the missing references, and the run then finds them all."""
    from cinecli.weights import hub as hub_module

    fetched = []

    def download(ref):  # the hub, simulated: the bytes come from the tiny stack instead of the network
        src = hub["snap"] / ref.file.rstrip("/")
        if not src.exists() and ref.file.endswith(".safetensors"):  # a single-file DiT: the tiny stack's DiT file
            src = hub["snap"] / "dit" / ref.file
        if not src.exists():
            src = hub["snap"] / ("tokenizer" if ref.file.endswith("/") else "Wan2.1_VAE.pth")
        fake_hub_repo(hub["tmp"] / "hf" / "hub", ref.repo, {ref.file.rstrip("/"): src})
        fetched.append(str(ref))
        return hub_module._cached(ref)

    monkeypatch.setattr(hub_module, "hub_reachable", lambda *a: not hub_module.offline())
    monkeypatch.setattr(hub_module, "remote_sizes", lambda ref: {ref.file: 1})
    monkeypatch.setattr(hub_module, "download", download)
    mine = hub["tmp"] / "my.toml"
    mine.write_text('name = "mine"\nprompt = "the camera orbits"\nframes = 5\nmax_area = 4096\n[backbone]\nname = "mine"\n'
                    + "".join(f'{k} = {{ repo = "cine-test/mine", file = "{f}" }}\n' for k, f in (
                        ("dit", "dit/"), ("vae", "Wan2.1_VAE.pth"), ("text_encoder", "text_encoder/"),
                        ("tokenizer", "tokenizer/"), ("image_encoder", "image_encoder/"))))
    for run in (["bullet-time", hub["photo"], "--backbone", "wan2.1-fun-1.3b-inp", "--offline"],
                ["run", hub["photo"], "--preset", mine, "--offline"]):
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        r = cine(*run, "-o", hub["tmp"] / "x.mp4")
        assert r.exit_code == 4, r.output
        missing, command = _hinted(r.stderr)
        assert command[:3] == ["cine", "models", "pull"]
        monkeypatch.delenv("HF_HUB_OFFLINE")
        fetched.clear()
        pull = cine(*command[1:])
        assert pull.exit_code == 0, pull.output
        assert set(fetched) == missing  # exactly what was missing, nothing else
        dry = json.loads(cine(*run, "-o", hub["tmp"] / "x.mp4", "--dry-run", "--json").stdout)
        assert dry["missing"] == []
    r = cine("run", hub["photo"], "--preset", mine, "-o", hub["tmp"] / "mine.mp4", "--offline")
    assert r.exit_code == 0, r.output
