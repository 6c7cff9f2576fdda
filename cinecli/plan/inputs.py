"""What the memory plan is fed: the machine (devices.py probes it) and the job's sizes, before anything loads.

Component sizes come from the files when they are on disk (safetensors headers, or the tensor index of a
``.pth`` read memory-mapped: parameter counts and stored dtypes, no tensor data), else from what the backbone
and LoRA cards declare (``bytes``, ``dit_config``) and the models' own configs. The DiT's bytes per recipe are
counted layer by layer on a meta-device model, so they are exact for every recipe.
"""

from __future__ import annotations

import functools
import os
import re
from dataclasses import replace
from pathlib import Path

import torch

from ..core.errors import UsageError
from ..core.sizes import parse_size
from ..effects.preset import Preset
from ..effects.rules import RULES
from ..generate.pipeline import Plan
from .memory import DiTSizes, Job, Machine

QUANT_ELEMENT = {torch.float8_e4m3fn: 1, torch.int8: 1, torch.uint8: 1}
_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


def machine(device: torch.device, budget: str | None = None) -> Machine:
    """The machine as the plan sees it; ``budget`` (or CINE_MEMORY_BUDGET) caps what it may use."""
    from ..core.devices import device_memory, kind, limits

    free, host = device_memory(device)
    free = int(free * (1 - limits(device).headroom))  # workspaces, libraries loaded later, fragmentation (CUDA, MPS)
    text = budget or os.environ.get("CINE_MEMORY_BUDGET") or None
    if text and RULES["memory_budget"](text):  # the variable is checked like the option
        raise UsageError(f"CINE_MEMORY_BUDGET '{text}' {RULES['memory_budget'](text)}")
    return Machine(kind(device), free, host, parse_size(text) if text else None)


# --- the DiT ---------------------------------------------------------------------------------------------------------
def _quant_bytes(shape: tuple[int, ...], fmt: str) -> int:
    from ..models.quant import parse_format

    out, inp = shape
    kind, group = parse_format(fmt)
    if kind == "int4":
        return out * inp // 2 + out * (inp // group) * 2  # packed nibbles + fp16 group scales
    return out * inp + out * 4  # one byte per weight + fp32 per-channel scale


def _sizes(per_param: dict[str, int], layers: int, dim: int, ffn_dim: int = 0) -> DiTSizes:
    blocks: dict[int, int] = {}
    outside = 0
    for name, n in per_param.items():
        found = _BLOCK.search(name)
        if found:
            blocks[int(found.group(1))] = blocks.get(int(found.group(1)), 0) + n
        else:
            outside += n
    block = max(blocks.values(), default=0)
    return DiTSizes(total=outside + sum(blocks.values()), outside_blocks=outside, block=block, layers=layers, dim=dim,
                    ffn_dim=ffn_dim)


@functools.lru_cache(maxsize=8)
def dit_sizes(config_name_or_cfg, weight_bytes: int = 2) -> dict[str, DiTSizes]:
    """Bytes of the DiT at every recipe, counted from a meta-device model (no memory used)."""
    from ..models.load import build_empty
    from ..models.recipes import RECIPES, get_recipe
    from ..models.wan_dit import DIT_CONFIGS, WanDiT, keeps_fp32

    cfg = DIT_CONFIGS[config_name_or_cfg] if isinstance(config_name_or_cfg, str) else config_name_or_cfg
    model = build_empty(lambda: WanDiT(replace(cfg, num_layers=1)))  # blocks are identical: count one
    params = {n: tuple(p.shape) for n, p in model.named_parameters()}
    out = {}
    for recipe in RECIPES:  # the ladder, and int8 for a user who pins it
        layers = get_recipe(recipe).plan(model)
        per = {}
        for name, shape in params.items():
            module, _, leaf = name.rpartition(".")
            if module in layers and leaf == "weight":
                per[name] = _quant_bytes(shape, layers[module])
            else:
                per[name] = torch.Size(shape).numel() * (4 if keeps_fp32(name) else weight_bytes)
        one = _sizes(per, 1, cfg.dim)
        out[recipe] = DiTSizes(one.outside_blocks + cfg.num_layers * one.block, one.outside_blocks, one.block, cfg.num_layers,
                               cfg.dim, cfg.ffn_dim)
    return out


def _header(path: Path, patterns) -> dict | None:
    from ..weights.files import read_header

    try:
        return read_header(path, patterns)
    except Exception:  # an unreadable file fails later with its own clear error; the plan just cannot use it
        return None


def dit_header(path: Path | None) -> dict | None:
    """The DiT checkpoint's header (name → (shape, dtype)); None when there is no file or it cannot be read."""
    from ..models.dit_loader import DIT_PATTERNS

    return _header(path, DIT_PATTERNS) if path is not None else None


def dit_job_sizes(preset: Preset, path: Path | None, header: dict | None, weight_bytes: int) -> tuple[dict[str, DiTSizes], bool]:
    """(sizes by recipe, prequantized) from the checkpoint's ``header`` (``dit_header(path)``), else from the
    backbone's ``dit_config``."""
    from ..models.dit_loader import infer_config
    from ..models.recipes import read_metadata
    from ..weights.keys import normalize_dit_keys

    if header:
        quantized = read_metadata(path) is not None or any(dt in QUANT_ELEMENT and dt != torch.uint8 for _, dt in header.values())
        if quantized:
            from ..models.wan_dit import keeps_fp32

            per = {k: torch.Size(s).numel() * QUANT_ELEMENT.get(dt, 4 if keeps_fp32(k) else weight_bytes) for k, (s, dt) in header.items()}
            dim = next(s[0] for k, (s, _) in header.items() if k.endswith("patch_embedding.weight"))
            layers = 1 + max((int(m.group(1)) for m in map(_BLOCK.search, header) if m), default=0)
            ffn = next((s[0] for k, (s, _) in header.items() if k.endswith("ffn.0.weight")), 0)
            return {"prequantized": _sizes(per, layers, dim, ffn)}, True
        try:
            names = normalize_dit_keys({k: s for k, (s, _) in header.items()})
            cfg = infer_config({names[k]: header[k][0] for k in names})
            return dit_sizes(cfg, weight_bytes), False
        except Exception:
            pass
    return dit_sizes(preset.backbone.dit_config or "wan2.1-i2v-14b", weight_bytes), False


def dit_private_bytes(preset: Preset, header: dict | None, sizes: dict[str, DiTSizes], dtype: torch.dtype) -> int:
    """16-bit DiT bytes a load holds in its own memory (``Job.dit_private_bytes``): all of them when the backbone
    merges LoRAs (they rewrite every block) or the file stores block weights in another dtype (fp32 shards cast
    to bf16); 0 for a zero-copy load or a pre-quantized file. ``header``: ``dit_header`` of the file."""
    if "none" not in sizes:
        return 0
    cast = bool(header) and any(dt != dtype for k, (s, dt) in header.items() if _BLOCK.search(k) and len(s) == 2)
    return sizes["none"].total if preset.backbone.merge or cast else 0


# --- encoders and the VAE --------------------------------------------------------------------------------------------
def _numel(header: dict | None, keep=lambda k: True) -> int | None:
    return sum(torch.Size(s).numel() for k, (s, _) in header.items() if keep(k)) if header else None


def text_encoder_bytes(path: Path | None, declared: int | None, weight_bytes: int, wo_bytes: int | None = None) -> int:
    """Resident umT5 bytes: from the file's header (float8 weights of a ComfyUI fp8_scaled file stay 1 byte, except
    the FFN output projections ``wo``, which load dequantized to ``wo_bytes``: text_encoder._dequantize_wo, fp32
    under fp16), else the declared download size (a 16-bit or fp8 file holds what loads), else the umT5-XXL config."""
    from ..models.text_encoder import TEXT_ENCODER_PATTERNS

    header = _header(path, TEXT_ENCODER_PATTERNS) if path else None
    wo_bytes = wo_bytes or weight_bytes

    def element(key: str, dtype: torch.dtype) -> int:
        if dtype not in QUANT_ELEMENT:
            return weight_bytes
        return wo_bytes if ".wo." in key and key.endswith(".weight") else 1

    if header:
        return sum(torch.Size(s).numel() * element(k, dt) for k, (s, dt) in header.items()
                   if not k.startswith(("decoder.", "lm_head.")))
    return declared or text_encoder_params(None) * weight_bytes


def text_encoder_params(path: Path | None) -> int:
    from ..models.text_encoder import TEXT_ENCODER_CONFIGS, TEXT_ENCODER_PATTERNS

    found = _numel(_header(path, TEXT_ENCODER_PATTERNS) if path else None, lambda k: not k.startswith(("decoder.", "lm_head.")))
    if found:
        return found
    c = TEXT_ENCODER_CONFIGS["umt5-xxl"]  # umT5-XXL encoder: embedding + 24 × (attention, gated FFN, rel. bias)
    inner = c.num_heads * c.head_dim
    return c.vocab_size * c.dim + c.num_layers * (4 * c.dim * inner + 3 * c.dim * c.dim_ffn + c.num_buckets * c.num_heads + 2 * c.dim) + c.dim


def image_encoder_params(path: Path | None) -> int:
    from ..models.image_encoder import IMAGE_ENCODER_CONFIGS, IMAGE_ENCODER_PATTERNS

    header = _header(path, IMAGE_ENCODER_PATTERNS) if path else None
    if header:
        towers = [k for k in header if k.startswith(("visual.", "vision_model."))]
        return _numel(header, lambda k: k in set(towers) if towers else True) or 0
    c = IMAGE_ENCODER_CONFIGS["vit-h-14"]  # ViT-H/14: the first 31 of 32 blocks are built
    block = 4 * c.dim * c.dim + 2 * c.dim * c.dim_mlp + 9 * c.dim + c.dim_mlp
    return (c.num_layers - 1) * block + c.num_tokens * c.dim + 3 * c.patch_size**2 * c.dim + 4 * c.dim


def vae_params(path: Path | None) -> int:
    from ..models.load import build_empty
    from ..models.vae_loader import VAE_PATTERNS
    from ..models.wan_vae import WanVAE

    return _numel(_header(path, VAE_PATTERNS) if path else None) or sum(p.numel() for p in build_empty(WanVAE).parameters())


def tiny_vae_bytes() -> int:
    """TAEW2.1 in fp32 (encoder and decoder: an upper bound for decode-only files)."""
    from ..models.load import build_empty
    from ..models.tiny_vae import TINY_VAE_CONFIGS, TinyVAE

    return 4 * sum(p.numel() for p in build_empty(lambda: TinyVAE(TINY_VAE_CONFIGS["taew2.1"])).parameters())


def file_bytes(info: dict | None, declared: int | None) -> int:
    return (info or {}).get("bytes") or declared or 0


def prompt_cached(text_encoder: Path | None, prompts: list[str]) -> bool:
    from ..generate import prompt_cache

    if text_encoder is None:
        return False
    identity = prompt_cache.encoder_identity(text_encoder)
    return all((prompt_cache.cache_dir() / f"{prompt_cache.cache_key(identity, p)}.safetensors").is_file() for p in prompts)


def job(preset: Preset, p: Plan, weights: dict[str, dict], *, device: torch.device, dtype: torch.dtype,
        quantize: str | None = None, fast_decode: bool = False, offload: str = "auto") -> Job:
    """The memory plan's view of one run: sizes of every component and of the clip."""
    from ..core.devices import activation_dtype, vae_dtype

    path = lambda k: Path(weights[k]["path"]) if weights.get(k, {}).get("path") else None  # noqa: E731
    refs = preset.weights()
    wbytes = torch.empty(0, dtype=dtype).element_size()
    abytes = torch.empty(0, dtype=activation_dtype(device, dtype)).element_size()
    header = dit_header(path("dit"))  # read once: sizes and the cast check both use it
    sizes, prequantized = dit_job_sizes(preset, path("dit"), header, wbytes)
    recipe = "prequantized" if prequantized else quantize
    default = preset.backbone.quantize or "none"
    quant_cached = frozenset()
    experts = preset.backbone.experts
    dits = {e: path("dit" if e == "high_noise" else f"dit_{e}") for e in experts}
    merges = {e: [(path(c.labels("lora")[e]), c.strength) for c in preset.backbone.merge if e in c.files()] for e in experts}
    if not prequantized and all(dits.values()) and all(p for m in merges.values() for p, _ in m):
        from ..models.quant_cache import cached_path
        from ..models.recipes import get_recipe

        # quantized once per expert: a recipe counts as cached when every expert's converted file is there
        quant_cached = frozenset(r for r in sizes if r != "none" and all(
            cached_path(dits[e], get_recipe(r), merges[e]).is_file() for e in experts))
    prompts = [p.prompt] + ([p.negative_prompt] if p.sampler.kind != "distill" and p.sampler.guidance != 1.0 else [])
    effect = next((k for k in weights if k.startswith("effect:")), None)  # a pair: the high-noise file (one expert's)
    return Job(
        dit=sizes, frames=p.frames, width=p.width, height=p.height, steps=p.sampler.num_steps,
        text_encoder_bytes=text_encoder_bytes(path("text_encoder"), refs["text_encoder"].bytes, wbytes,
                                              wo_bytes=4 if dtype == torch.float16 else wbytes),
        image_encoder_bytes=image_encoder_params(path("image_encoder")) * (4 if dtype == torch.float32 else 2)
        if preset.backbone.image_encoder is not None else 0,
        vae_bytes=vae_params(path("vae")) * torch.empty(0, dtype=vae_dtype(device)).element_size(),
        act_bytes=abytes, weight_bytes=wbytes, default_recipe=default, pinned_recipe=recipe,
        prompt_cached=prompt_cached(path("text_encoder"), prompts),
        effect_bytes=file_bytes(weights.get(effect), refs[effect].bytes) if effect else 0,
        fast_decode=fast_decode,
        tiny_vae_bytes=tiny_vae_bytes() if preset.backbone.tiny_vae else 0,
        quant_cached=quant_cached, offload=offload, dit_private_bytes=dit_private_bytes(preset, header, sizes, dtype),
        interp_factor=p.interp_factor, interpolator=p.interpolator or "rife", delivered_frames=p.delivered_frames,
        experts=len(experts),
    )
