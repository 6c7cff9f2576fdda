"""GGUF DiT files (city96's Wan2.1 layout): every supported type decodes exactly as the gguf package's reference
dequantizer does, a whole DiT loads from one and computes what its dequantized weights compute, and any other
type is refused by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf_fixtures import BLOCK_TYPES, FLOATS, K_SCALE_FIELDS, encode, reference, write_city96_gguf
from test_dit import inputs, rel_err
from wan_fixtures import random_state_dict, tiny_config

from cinecli.core.errors import WeightsError
from cinecli.models import load_dit
from cinecli.models.gguf_linear import GGUFLinear, dequantize_rows
from cinecli.weights.gguf import iter_gguf


def _write(path, tensors: dict[str, tuple[np.ndarray, str]]):
    import gguf

    writer = gguf.GGUFWriter(str(path), arch="wan")
    for name, (data, kind) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=gguf.GGMLQuantizationType[kind] if kind not in ("F32", "F16") else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("kind", FLOATS + BLOCK_TYPES)
def test_each_type_matches_the_reference_dequantizer(kind, tmp_path):
    rng = np.random.default_rng(1)
    rows, cols = 24, 768  # 3 K-blocks or 24 32-blocks per row
    data = encode(rng.standard_normal((rows, cols)).astype(np.float32) * 0.05, kind, rng, scale=1e-2)
    (name, tensor), = iter_gguf(_write(tmp_path / f"w.{kind}.gguf", {"blocks.0.ffn.0.weight": (data, kind)}))
    got = tensor.float() if kind in FLOATS else dequantize_rows(tensor, kind)
    want = reference(data, kind).reshape(rows, cols)
    err = (got - want).abs().max().item()
    print(f"GGUF {kind}: max |ours - gguf.quants.dequantize| = {err:.1e} over {rows}x{cols}")
    assert name == "blocks.0.ffn.0.weight" and got.shape == (rows, cols)
    assert torch.equal(got, want) and want.abs().max() > 0


@pytest.mark.parametrize("kind", ["Q8_0", "Q4_K", "Q3_K", "BF16"])
def test_city96_dit_loads_and_matches_its_dequantized_weights(kind, tmp_path):
    cfg = tiny_config("i2v")
    sd = random_state_dict(cfg, seed=4)
    path = tmp_path / "diffusion_models" / f"wan2.1-i2v-14b-480p-{kind}.gguf"
    meant = write_city96_gguf(sd, path, kind)
    model = load_dit(path.parent, dtype="fp32")  # the folder finds the .gguf
    assert model.config == cfg
    assert model.patch_embedding.weight.dtype == torch.float32 and model.blocks[0].modulation.dtype == torch.float32
    if kind in BLOCK_TYPES:
        ffn = model.blocks[0].ffn[0]
        assert isinstance(ffn, GGUFLinear) and ffn.fmt == kind and ffn.weight.dtype == torch.uint8
        assert model.quant_recipe == "gguf"
        # 32-wide rows fit 32-blocks; K-types (256) leave them F16, as llama.cpp's quantize does
        assert isinstance(model.text_embedding[0], GGUFLinear) == kind.endswith("_0")
    reference_model = load_dit(meant, dtype="fp32")
    args = inputs(cfg)
    with torch.no_grad():
        err = rel_err(model(*args), reference_model(*args))
    print(f"DiT from {kind} GGUF vs its dequantized weights: {err:.1e}")
    assert err <= 1e-5


def test_other_types_are_refused_by_name(tmp_path):
    rng = np.random.default_rng(0)
    sd = random_state_dict(tiny_config("i2v"))
    path = tmp_path / "wan-Q2_K.gguf"
    tensors = {k: (v.float().numpy(), "F32") for k, v in sd.items()}
    tensors["blocks.0.ffn.0.weight"] = (encode(sd["blocks.0.ffn.0.weight"].numpy(), "Q2_K", rng), "Q2_K")
    assert "Q2_K" in K_SCALE_FIELDS
    _write(path, tensors)
    with pytest.raises(WeightsError, match=r"blocks\.0\.ffn\.0\.weight is GGUF type Q2_K, which cine does not support") as info:
        load_dit(path)
    assert "\n" not in str(info.value) and info.value.exit_code == 4


def test_merged_lora_on_a_gguf_dit_equals_merging_into_its_dequantized_weights(tmp_path):
    from cinecli.models.adapters import merge_into

    cfg = tiny_config("i2v")
    meant = write_city96_gguf(random_state_dict(cfg, seed=6), tmp_path / "dit-Q4_K.gguf", "Q4_K")
    g = torch.Generator().manual_seed(2)
    lora = {}
    for module, (out, inp) in {"blocks.0.self_attn.q": (256, 256), "blocks.1.ffn.0": (512, 256)}.items():
        lora[f"diffusion_model.{module}.lora_down.weight"] = torch.randn(4, inp, generator=g) * 0.5
        lora[f"diffusion_model.{module}.lora_up.weight"] = torch.randn(out, 4, generator=g) * 0.5
        lora[f"diffusion_model.{module}.alpha"] = torch.tensor(2.0)
    gguf_model, float_model = load_dit(tmp_path / "dit-Q4_K.gguf", dtype="fp32"), load_dit(meant, dtype="fp32")
    args = inputs(cfg)
    with torch.no_grad():
        before = gguf_model(*args)
        merge_into(gguf_model, lora, strength=0.8)
        merge_into(float_model, lora, strength=0.8)
        after, want = gguf_model(*args), float_model(*args)
    assert len(gguf_model.blocks[1].ffn[0].low_rank) == 1 and gguf_model.blocks[1].ffn[0].weight.dtype == torch.uint8
    assert rel_err(after, want) <= 1e-5 and rel_err(before, want) > 100 * rel_err(after, want)
