"""Quantization recipes for the DiT and the self-describing quantized checkpoint format.

A recipe maps each quantizable linear layer to a weight format; first matching rule wins. Never quantized,
whatever the recipe: norms, modulation tables, the patch embedding, the head, biases and the image-embedding
MLP (they are small and numerically sensitive: wan2.1-reference.md §H, users-and-conventions.md items 22-24).

  hybrid   the CineMobile recipe: FP8 attention + text/time embedding projections, INT4 (group 64) FFN
  compact  hybrid, plus the cross-attention projections in INT4: the 1.3B i2v model under 1 GB
  fp8      FP8 everywhere quantizable          int8     INT8 everywhere quantizable        none
Per-layer overrides go first: e.g. ``{"blocks.0.*": "int8", "blocks.29.*": "int8"}`` keeps the ends at 8 bits.

File format: one safetensors file; quantized layers store ``weight`` + ``weight_scale`` (models/quant.py);
metadata ``{"cine_quant": json{"recipe", "layers": {module: format}, "config": DiTConfig fields}}``.
"""

from __future__ import annotations

import fnmatch
import json
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn

from .quant import QuantLinear, parse_format, swap_in

ATTENTION = ["blocks.*.self_attn.q", "blocks.*.self_attn.k", "blocks.*.self_attn.v", "blocks.*.self_attn.o",
             "blocks.*.cross_attn.q", "blocks.*.cross_attn.k", "blocks.*.cross_attn.v", "blocks.*.cross_attn.o",
             "blocks.*.cross_attn.k_img", "blocks.*.cross_attn.v_img"]
CROSS = [p for p in ATTENTION if "cross_attn" in p]
EMBEDDINGS = ["text_embedding.0", "text_embedding.2", "time_embedding.0", "time_embedding.2", "time_projection.1"]
FFN = ["blocks.*.ffn.0", "blocks.*.ffn.2"]
QUANTIZABLE = ATTENTION + EMBEDDINGS + FFN


@dataclass(frozen=True)
class Recipe:
    name: str
    rules: tuple[tuple[str, str], ...]  # (module glob, format), first match wins
    next_safer: str | None = None  # what to suggest when this recipe produces NaN/Inf
    overrides: dict[str, str] = field(default_factory=dict)

    def format_for(self, module: str) -> str | None:
        for pattern, fmt in [*self.overrides.items(), *self.rules]:
            if fnmatch.fnmatchcase(module, pattern):
                return None if fmt == "none" else fmt
        return None

    def plan(self, model: nn.Module) -> dict[str, str]:
        """{module name: format} for every quantizable linear of ``model``."""
        out = {}
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and not isinstance(module, QuantLinear) and any(fnmatch.fnmatchcase(name, p) for p in QUANTIZABLE):
                fmt = self.format_for(name)
                if fmt:
                    out[name] = fmt
        return out


RECIPES: dict[str, Recipe] = {
    "hybrid": Recipe("hybrid", tuple((p, "fp8") for p in ATTENTION + EMBEDDINGS) + tuple((p, "int4g64") for p in FFN), "int8"),
    "compact": Recipe("compact", tuple((p, "int4g64") for p in CROSS + FFN) + tuple((p, "fp8") for p in ATTENTION + EMBEDDINGS), "hybrid"),
    "fp8": Recipe("fp8", tuple((p, "fp8") for p in QUANTIZABLE), "int8"),
    "int8": Recipe("int8", tuple((p, "int8") for p in QUANTIZABLE), "none"),
    "none": Recipe("none", (), None),
}


def get_recipe(name: str, overrides: dict[str, str] | None = None) -> Recipe:
    from ..core.errors import UsageError

    if name not in RECIPES:
        raise UsageError(f"unknown quantization recipe '{name}' (known: {', '.join(RECIPES)})")
    recipe = RECIPES[name]
    for pattern, fmt in (overrides or {}).items():
        if fmt != "none":
            try:
                parse_format(fmt)
            except ValueError as exc:
                raise UsageError(f"--override '{pattern}={fmt}': {exc}") from None
    return Recipe(recipe.name, recipe.rules, recipe.next_safer, dict(overrides or {})) if overrides else recipe


def check_overrides(recipe: Recipe, model: nn.Module) -> None:
    """Every --override must name at least one quantizable layer: a typo'd glob is an error, not a no-op."""
    from ..core.errors import UsageError

    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and any(fnmatch.fnmatchcase(n, p) for p in QUANTIZABLE)]
    for pattern in recipe.overrides:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise UsageError(f"--override '{pattern}' matches no quantizable layer (e.g. {names[0] if names else '?'})")


@torch.no_grad()
def quantize_dit(model: nn.Module, recipe: Recipe, measure: bool = False) -> dict[str, dict]:
    """Quantize ``model`` in place, layer by layer (each full-precision weight is freed once quantized).

    Returns {module: {"format", "rel_rms_error" (with ``measure``)}}.
    """
    layers = recipe.plan(model)
    report = {}
    for name, fmt in layers.items():
        original = model.get_submodule(name).weight
        swap_in(model, {name: fmt})
        report[name] = {"format": fmt}
        if measure:
            report[name]["rel_rms_error"] = layer_error(original, model.get_submodule(name))
        del original
    model.quant_recipe = recipe.name
    model.quant_layers = {**getattr(model, "quant_layers", {}), **layers}
    return report


def metadata_for(model: nn.Module) -> dict[str, str]:
    cfg = asdict(model.config)
    return {"cine_quant": json.dumps({"recipe": getattr(model, "quant_recipe", "none"), "layers": getattr(model, "quant_layers", {}),
                                      "config": cfg})}



def write_quantized(model: nn.Module, output, recipe: Recipe | None = None) -> int:
    """Write a quantized DiT as one self-describing safetensors file, one tensor at a time, atomically (a temp file
    renamed over ``output``: a killed run never leaves a half-written checkpoint). Returns the bytes of tensor data;
    raises OSError (the temp file removed) when the folder cannot take it.

    ``recipe``: ``model`` is still 16-bit (memory-mapped from its checkpoint) and each layer is quantized as it is
    written, its source pages dropped after (load.release_pages): converting never holds more than one layer's
    quantized copy, so a 14B checkpoint converts in the memory of its largest layer, not of the whole model.
    """
    from ..weights.files import write_safetensors
    from .load import build_empty, release_pages
    from .quant import quantize

    formats = recipe.plan(model) if recipe is not None else {}
    real = model.state_dict()
    quantized = {f"{name}.{leaf}" for name in formats for leaf in ("weight", "weight_scale")}
    keys, shapes, meta = list(real), real, metadata_for(model)
    if formats:  # the quantized layers' keys, shapes and dtypes come from an empty twin with them swapped in
        twin = swap_in(build_empty(lambda: type(model)(model.config)), formats, meta=True)
        twin.config, twin.quant_recipe = model.config, recipe.name
        twin.quant_layers = {**getattr(model, "quant_layers", {}), **formats}
        empty = twin.state_dict()
        keys, shapes, meta = list(empty), {**real, **{k: empty[k] for k in quantized}}, metadata_for(twin)
    layout = {k: (tuple(shapes[k].shape), shapes[k].dtype) for k in keys}

    def pieces():
        scale = None
        for key in keys:
            if key.endswith(".weight") and key in quantized:
                q, scale = quantize(real[key], formats[key.removesuffix(".weight")])
                release_pages(real[key])
                yield q
            elif key in quantized:  # the weight_scale that follows its weight
                yield scale
            else:
                yield real[key]

    return write_safetensors(output, layout, pieces(), meta)


def read_metadata(source) -> dict | None:
    """The ``cine_quant`` metadata of a (first) safetensors file, if it is one of ours."""
    from pathlib import Path

    from safetensors import safe_open

    from ..weights.files import resolve_files

    if not isinstance(source, (str, Path)):
        return None
    try:
        files = resolve_files(source, ("*.safetensors",))
    except Exception:
        return None
    if not files or files[0].suffix != ".safetensors":
        return None
    with safe_open(str(files[0]), framework="pt") as f:
        meta = f.metadata() or {}
    return json.loads(meta["cine_quant"]) if "cine_quant" in meta else None


def layer_error(original: torch.Tensor, layer: QuantLinear) -> float:
    """Relative RMS error of a quantized layer's weight: ‖W - Ŵ‖ / ‖W‖."""
    w = original.float()
    return ((w - layer.dequantized(torch.float32)).pow(2).mean().sqrt() / w.pow(2).mean().sqrt().clamp(min=1e-12)).item()
