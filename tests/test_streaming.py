"""Streamed DiT blocks (models/streaming.py) give bit-identical outputs, with effect LoRAs and quantized layers.

No GPU here: the CPU stand-in (``force=True``) runs the same copy path a GPU does — every block's weights are
copied in from the host store before it runs and dropped after — minus the side stream and pinned memory.
"""

from __future__ import annotations

import sys
from dataclasses import replace

import pytest
import torch
from test_dit import inputs
from test_lora import TARGETS, known_delta, write_style
from wan_fixtures import random_state_dict, tiny_config

from cinecli.models import load_dit
from cinecli.models.adapters import Effects
from cinecli.models.load import release_pages
from cinecli.models.recipes import get_recipe, quantize_dit
from cinecli.models.streaming import PagedBlocks, stream_blocks


def _host_ptrs(model):
    return [p.data_ptr() for p in model.blocks.parameters()]


def test_streaming_on_off_bit_identical_and_copies_every_block():
    cfg = tiny_config("i2v")
    sd = random_state_dict(cfg)
    args = inputs(cfg)
    with torch.no_grad():
        resident = load_dit(sd, dtype="bf16")
        want = resident(*args)
        streamed = stream_blocks(load_dit(sd, dtype="bf16"), "cpu", force=True)
        host = _host_ptrs(streamed)
        seen = []  # data pointers each block computes with
        hooks = [blk.register_forward_pre_hook(lambda m, a: seen.append([p.data_ptr() for p in m.parameters()]))
                 for blk in streamed.blocks]
        ctx = streamed.prepare_context(args[2], args[3])
        got = streamed(args[0], args[1], ctx, y=args[4])
        for h in hooks:
            h.remove()
    assert torch.equal(got, want)
    block_bytes = sum(p.numel() * p.element_size() for p in streamed.blocks.parameters())
    # prepare_context streams the blocks once (cross-attention K/V), forward once more
    assert streamed.block_stream.copied_bytes == 2 * block_bytes
    assert len(seen) == cfg.num_layers and not set(sum(seen, [])) & set(host)  # ran on copies, never the store
    assert _host_ptrs(streamed) == host  # and the store is back in place
    assert isinstance(stream_blocks(load_dit(sd), "cpu").block_stream, PagedBlocks)  # CPU default: no copies


def test_streamed_quantized_model_bit_identical():
    cfg = tiny_config("i2v")
    sd = random_state_dict(cfg)
    args = inputs(cfg)
    with torch.no_grad():
        resident = load_dit(sd, dtype="bf16")
        quantize_dit(resident, get_recipe("hybrid"))
        streamed = load_dit(sd, dtype="bf16")
        quantize_dit(streamed, get_recipe("hybrid"))
        stream_blocks(streamed, "cpu", force=True)
        assert torch.equal(streamed(*args), resident(*args))


def test_effect_loras_on_streamed_blocks_switch_without_reload(tmp_path):
    cfg = tiny_config("i2v")
    sd = random_state_dict(cfg)
    write_style("original", known_delta(cfg, seed=1), tmp_path / "a.safetensors")
    write_style("diff", known_delta(cfg, seed=2, targets=TARGETS[:4]), tmp_path / "b.safetensors")
    args = inputs(cfg)
    with torch.no_grad():
        outs = {}
        for streaming in (False, True):
            model = load_dit(sd, dtype="fp32")
            if streaming:
                stream_blocks(model, "cpu", force=True)
            effects = Effects(model)
            effects.load("a", tmp_path / "a.safetensors")
            effects.load("b", tmp_path / "b.safetensors", strength=0.7)
            for i, name in enumerate(("a", "b", None, "a")):
                effects.use(name)
                outs[streaming, i] = model(*args)
        base = load_dit(sd, dtype="fp32")(*args)
    for i in range(4):
        assert torch.equal(outs[True, i], outs[False, i]), i
    assert not torch.equal(outs[True, 0], base) and not torch.equal(outs[True, 1], outs[True, 0])
    assert torch.equal(outs[True, 2], base)  # no effect: the backbone alone
    assert torch.equal(outs[True, 3], outs[True, 0])  # A → B → none → A gives A again, no reload


def _resident_file_bytes(tensors) -> int:
    """Bytes of the tensors' pages resident in this process (mincore-free: /proc/self/pagemap present bits)."""
    import struct

    total = 0
    with open("/proc/self/pagemap", "rb") as f:
        for t in tensors:
            a, b = t.data_ptr() // 4096, (t.data_ptr() + t.numel() * t.element_size() - 1) // 4096 + 1
            f.seek(a * 8)
            total += 4096 * sum(bool(v >> 63) for v in struct.unpack(f"<{b - a}Q", f.read((b - a) * 8)))
    return total


@pytest.mark.skipif(sys.platform != "linux", reason="page release is Linux-only (a no-op elsewhere)")
def test_cpu_streaming_drops_each_blocks_pages_with_identical_output(tmp_path):
    from safetensors.torch import save_file

    cfg = replace(tiny_config("i2v"), dim=512, ffn_dim=1024, num_heads=4)  # blocks of many pages
    sd = random_state_dict(cfg)
    save_file({k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}, tmp_path / "dit.safetensors")
    args = inputs(cfg)
    with torch.no_grad():
        want = load_dit(tmp_path / "dit.safetensors", dtype="bf16")(*args)
        model = stream_blocks(load_dit(tmp_path / "dit.safetensors", dtype="bf16"), "cpu")
        weights = [p for p in model.blocks.parameters() if p.numel() * p.element_size() >= 1 << 16]
        got = model(*args)
        assert torch.equal(got, want)
        size = sum(p.numel() * p.element_size() for p in weights)
        # dropped after use, but for pages a block shares with a tensor outside it (the fp32 norms are copies)
        assert model.block_stream.released_bytes > 0.9 * size and _resident_file_bytes(weights) < 0.02 * size
        assert torch.equal(model(*args), want)  # refaulted from the file: same numbers


@pytest.mark.skipif(sys.platform != "linux", reason="page release is Linux-only (a no-op elsewhere)")
def test_release_pages_keeps_pages_a_write_made(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    save_file({"a": torch.arange(1 << 18, dtype=torch.float32), "b": torch.ones(1 << 18)}, tmp_path / "w.safetensors")
    with safe_open(str(tmp_path / "w.safetensors"), "pt") as f:
        a, b = f.get_tensor("a"), f.get_tensor("b")
    b.mul_(3)  # a merged LoRA writes like this: those pages are private copies now
    assert a.sum() > 0 and release_pages(a, b) >= a.numel() * 4 - 8192
    assert _resident_file_bytes([a]) <= 8192  # its two edge pages are shared with the header and with b
    assert torch.equal(b, torch.full((1 << 18,), 3.0)) and torch.equal(a, torch.arange(1 << 18, dtype=torch.float32))
    assert release_pages(torch.ones(1 << 20)) == 0  # heap memory is never touched


@pytest.mark.skipif(sys.platform != "linux", reason="page release is Linux-only (a no-op elsewhere)")
def test_each_stage_drops_its_components_pages(tmp_path, monkeypatch):
    """After a run on the CPU, no component keeps the memory-mapped pages it read: CLIP's go after the image
    encode, the VAE's after encoding and decoding, the DiT's before the decode (pipeline.Generator)."""
    from cinecli.effects.preset import Catalog
    from cinecli.generate.pipeline import Generator, Request, plan
    from cinecli.generate.selftest import sample_image, write_backbone
    from cinecli.models.load import _file_mappings
    from cinecli.weights.hub import resolve_all

    monkeypatch.setenv("CINE_CACHE_DIR", str(tmp_path / "cache"))
    preset = Catalog(extra_preset=write_backbone(tmp_path / "backbone")).resolve(None)
    gen = Generator(preset.backbone, resolve_all(preset.weights(), "test"), torch.device("cpu"), torch.bfloat16)
    image = sample_image(64, 64)
    request = Request(image="photo.png", preset=preset, frames=5, seed=0)
    gen.generate(request, plan(request, image.size), image)
    maps = _file_mappings()
    mapped = lambda m: [p for p in m.parameters() if any(a <= p.data_ptr() < b for a, b in maps)]  # noqa: E731
    checked = {name: mapped(m) for name, m in (("clip", gen.clip.model), ("vae", gen.vae), ("dit", gen.dit))}
    assert checked["vae"] and checked["dit"]  # memory-mapped from the files (CLIP: only when stored as computed)
    for name, weights in checked.items():
        size = sum(p.numel() * p.element_size() for p in weights)
        assert _resident_file_bytes(weights) <= 0.1 * size + 4096 * 2 * len(weights), name
