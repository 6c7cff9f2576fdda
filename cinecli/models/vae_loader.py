"""``load_vae`` and ``load_tiny_vae``: the Wan2.1 VAE and TAEW2.1 from any layout in the wild.

Wan VAE layouts: the original ``Wan2.1_VAE.pth`` (fp32 pickle, read weights-only), ComfyUI's
``wan_2.1_vae.safetensors`` (original names, 16-bit), a diffusers ``AutoencoderKLWan`` folder (diffusers names,
mapped back to the original ones by ``VAE_DIFFUSERS_RULES``), a diffusers pipeline root (its ``vae/`` folder),
an original Wan repo folder (its ``Wan2.1_VAE.pth``), or an in-memory state dict. Tiny VAE: ``taew2_1.pth`` /
``taew2_1.safetensors`` (``encoder.N.*``, ``decoder.N.*``; the encoder is optional).

Loading is lean (``load.assign_tensors``): the module is built on ``meta``, and each tensor goes from the memory
map straight to its target dtype and device.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import replace
from pathlib import Path

import torch

from ..core.devices import choose_device, choose_dtype, vae_dtype
from ..core.errors import WeightsError
from ..weights import Source, iter_tensors, read_config, read_shapes
from ..weights.files import component_folder, describe
from ..weights.keys import Rules, compile_rules, normalize_keys
from .load import assign_tensors, build_empty
from .tiny_vae import TINY_VAE_CONFIGS, TGrow, TinyVAE, TinyVAEConfig
from .wan_vae import VAE_CONFIGS, WanVAE, WanVAEConfig

VAE_PATTERNS = ("Wan2.1_VAE.pth", "diffusion_pytorch_model*.safetensors", "*vae*.safetensors", "*vae*.pth",
                "*.safetensors", "*.pth", "*.pt", "*.bin")
TINY_PATTERNS = ("taew2_1.safetensors", "taew2_1.pth", "*.safetensors", "*.pth", "*.pt")
VAE_MARKERS = ("encoder.conv1.weight", "encoder.conv_in.weight", "decoder.conv1.weight", "decoder.conv_in.weight")
TINY_MARKERS = ("decoder.1.weight",)


def diffusers_vae_rules(num_res_blocks: int = 2, num_stages: int = 4) -> Rules:
    """diffusers ``AutoencoderKLWan`` names → original ``Wan2.1_VAE.pth`` names (wan2.1-reference.md §C.4).

    Resnet-internal names are renamed first, while ``down_blocks``/``resnets`` still tell a resnet's ``conv1``
    from the encoder's. Decoder stage i holds ``num_res_blocks + 1`` resnets then one upsampler, flattened into
    ``upsamples`` at ``i·(num_res_blocks + 2) + j``; the encoder's ``down_blocks`` index is already flat.
    """
    per_stage = num_res_blocks + 2
    block = r"(?P<blk>(?:down_blocks|resnets)\.\d+)"
    pairs = [
        (block + r"\.norm1", r"\g<blk>.residual.0"),
        (block + r"\.conv1", r"\g<blk>.residual.2"),
        (block + r"\.norm2", r"\g<blk>.residual.3"),
        (block + r"\.conv2", r"\g<blk>.residual.6"),
        (block + r"\.conv_shortcut", r"\g<blk>.shortcut"),
        (r"(?P<part>encoder|decoder)\.conv_in", r"\g<part>.conv1"),
        (r"(?P<part>encoder|decoder)\.norm_out", r"\g<part>.head.0"),
        (r"(?P<part>encoder|decoder)\.conv_out", r"\g<part>.head.2"),
        (r"mid_block\.resnets\.0", "middle.0"),
        (r"mid_block\.attentions\.0", "middle.1"),
        (r"mid_block\.resnets\.1", "middle.2"),
        (r"down_blocks", "downsamples"),
        (r"quant_conv", "conv1"),  # only at the top level: the anchors keep post_quant_conv intact
        (r"post_quant_conv", "conv2"),
    ]
    for i in range(num_stages):
        pairs += [(rf"up_blocks\.{i}\.resnets\.{j}", f"upsamples.{i * per_stage + j}")
                  for j in range(num_res_blocks + 1)]
        pairs.append((rf"up_blocks\.{i}\.upsamplers\.0", f"upsamples.{i * per_stage + num_res_blocks + 1}"))
    return compile_rules(pairs)


VAE_DIFFUSERS_RULES = diffusers_vae_rules()


def normalize_vae_keys(keys: list[str], rules: Rules = VAE_DIFFUSERS_RULES) -> dict[str, str]:
    """``{source_key: original_key}`` for a Wan VAE in original, ComfyUI (prefixed) or diffusers naming."""
    return normalize_keys(keys, VAE_MARKERS, rules)


def infer_vae_config(shapes: dict[str, tuple[int, ...]]) -> WanVAEConfig:
    """Channels, stages, resnets per stage and temporal downsampling from original-name tensor shapes."""
    try:
        base_dim = shapes["encoder.conv1.weight"][0]
        z_dim = shapes["conv2.weight"][0]
        layer_ids = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.downsamples\.(\d+)\.", k))})
        stages: list[list[int]] = [[]]  # output widths of each stage's resnets
        temporal: list[bool] = []
        for i in layer_ids:
            if f"encoder.downsamples.{i}.resample.1.weight" in shapes:
                temporal.append(f"encoder.downsamples.{i}.time_conv.weight" in shapes)
                stages.append([])
            else:
                stages[-1].append(shapes[f"encoder.downsamples.{i}.residual.2.weight"][0])
    except (KeyError, IndexError) as exc:
        raise WeightsError(f"not a Wan2.1 VAE checkpoint: missing tensor {exc}") from None
    if not stages[0] or any(len(s) != len(stages[0]) for s in stages):
        raise WeightsError("not a Wan2.1 VAE checkpoint: irregular encoder layout")
    dim_mult = tuple(s[-1] // base_dim for s in stages)
    cfg = VAE_CONFIGS["wan2.1"]
    if z_dim != cfg.z_dim:  # the published statistics are for 16 channels; anything else is not Wan2.1
        raise WeightsError(f"not a Wan2.1 VAE checkpoint: latent has {z_dim} channels, expected 16")
    return replace(cfg, base_dim=base_dim, dim_mult=dim_mult, num_res_blocks=len(stages[0]),
                   temporal_downsample=tuple(temporal))


def _dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    # None: the device's choice (devices.vae_dtype: bf16 where it multiplies bf16 natively, else fp32 as the reference)
    return vae_dtype(device) if dtype is None else choose_dtype(dtype, device)


def load_vae(source: Source, *, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
             config: WanVAEConfig | str | None = None) -> WanVAE:
    """Load the Wan2.1 VAE from a file, folder or state dict (any layout listed in the module docstring).

    ``dtype`` is the weight and compute dtype (default: ``devices.vae_dtype``, bf16 where the device multiplies bf16
    natively, else fp32 as the reference); ``config`` overrides the one
    inferred from tensor shapes. Raises ``WeightsError`` on a missing file or a checkpoint that does not fit.
    """
    device = choose_device(device)
    dtype = _dtype(dtype, device)
    source = component_folder(source, "vae")
    shapes = read_shapes(source, VAE_PATTERNS)
    meta = read_config(source) or {}
    if meta.get("_class_name") != "AutoencoderKLWan":
        meta = {}  # e.g. an original Wan repo's config.json, which describes the DiT
    if meta.get("is_residual") or meta.get("z_dim", 16) != 16:
        raise WeightsError(f"{describe(source)} is not a Wan2.1 VAE (Wan2.2-style config)")
    rules = diffusers_vae_rules(meta.get("num_res_blocks", 2), len(meta.get("dim_mult", (1, 2, 4, 4))))
    try:
        names = normalize_vae_keys(list(shapes), rules)
    except KeyError:
        raise WeightsError(f"{describe(source)} holds no Wan VAE (no encoder.conv1 / conv_in weight)") from None
    if isinstance(config, str):
        config = VAE_CONFIGS[config]
    cfg = config or infer_vae_config({names[k]: shapes[k] for k in names})
    cast = _cast_once(source, dtype, device)
    if cast is not None:  # the CPU in 16 bits: a converted file, memory-mapped as the original would be
        return load_vae(cast, device=device, dtype=dtype, config=cfg)
    model = build_empty(lambda: WanVAE(cfg))
    tensors = ((names[k], v) for k, v in iter_tensors(source, VAE_PATTERNS) if k in names)
    return assign_tensors(model, tensors, device=device, dtype_for=lambda n, t: dtype, what=describe(source))


def _cast_once(source: Source, dtype: torch.dtype, device: torch.device) -> Path | None:
    """On the CPU, a VAE file stored in another dtype than it computes in (the official fp32 ``Wan2.1_VAE.pth`` run
    in bf16) is cast once into cine's cache (``<cache>/vae/``, keyed by the source's path, size and mtime) and
    memory-mapped from there: its pages stay droppable after each stage (load.release_pages), as the original's
    would be, instead of a private copy resident for the whole run. None when no cast is needed (or not a file)."""
    if device.type != "cpu" or isinstance(source, Mapping):
        return None
    from safetensors.torch import save_file

    from ..core.dirs import cache_dir
    from .quant_cache import identity

    first = next(iter_tensors(source, VAE_PATTERNS), None)
    if first is None or first[1].dtype == dtype:
        return None
    key = hashlib.sha256(json.dumps([identity(Path(source), VAE_PATTERNS), str(dtype)]).encode()).hexdigest()[:20]
    path = cache_dir() / "vae" / f"{Path(source).stem}.{str(dtype).removeprefix('torch.')}.{key}.safetensors"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        save_file({k: v.to(dtype).contiguous() for k, v in iter_tensors(source, VAE_PATTERNS)}, str(tmp))
        os.replace(tmp, path)  # atomic: a killed run leaves no half-written cache file
    return path


def infer_tiny_config(shapes: dict[str, tuple[int, ...]]) -> TinyVAEConfig:
    """Widths, latent channels and temporal strides of a TAEHV-layout checkpoint (the Wan one: 16 channels)."""
    try:
        z = shapes["decoder.1.weight"][1]
        widths = (shapes["decoder.1.weight"][0], shapes["decoder.8.weight"][0], shapes["decoder.14.weight"][0],
                  shapes["decoder.20.weight"][0])
        enc = "encoder.0.weight" in shapes
        e = shapes["encoder.0.weight"][0] if enc else 64
        # A TPool's 1×1 conv reads stride·width channels.
        pools = (tuple(shapes[f"encoder.{i}.conv.weight"][1] == 2 * e for i in (2, 7, 12)) if enc
                 else (True, True, False))
        out_channels = shapes["decoder.22.weight"][0]
    except KeyError as exc:
        raise WeightsError(f"not a TAEHV checkpoint: missing tensor {exc}") from None
    if out_channels != 3:
        raise WeightsError("not a TAEW2.1 checkpoint: patch-size > 1 output (TAEW2.2 / TAEHV1.5?)")
    return TinyVAEConfig(latent_channels=z, decoder_widths=widths, encoder_width=e, encoder_time_downscale=pools,
                         with_encoder=enc)


def load_tiny_vae(source: Source, *, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
                  config: TinyVAEConfig | str | None = None) -> TinyVAE:
    """Load TAEW2.1 (``taew2_1.pth`` / ``.safetensors``, file, folder or state dict; encoder optional).

    ``dtype`` defaults to fp32. A TGrow conv stored with more output channels than the model's stride needs
    (the 1× stage of TAEW2.1) keeps its last-timestep channels, as TAEHV's ``patch_tgrow_layers`` does.
    """
    device = choose_device(device)
    dtype = torch.float32 if dtype is None else choose_dtype(dtype, device)  # TAEW2.1: fp32 unless asked
    shapes = read_shapes(source, TINY_PATTERNS)
    try:
        names = normalize_keys(shapes, TINY_MARKERS)
    except KeyError:
        raise WeightsError(f"{describe(source)} holds no TAEHV decoder (no decoder.1.weight)") from None
    if isinstance(config, str):
        config = TINY_VAE_CONFIGS[config]
    cfg = config or infer_tiny_config({names[k]: shapes[k] for k in names})
    if cfg.latent_channels != 16:
        raise WeightsError(f"{describe(source)} is a TAEHV for {cfg.latent_channels}-channel latents, not Wan2.1's 16")
    model = build_empty(lambda: TinyVAE(cfg))
    wanted = model.state_dict()
    tgrow = {f"decoder.{i}.conv.weight" for i, m in enumerate(model.decoder) if isinstance(m, TGrow)}

    def tensors() -> Iterator[tuple[str, torch.Tensor]]:
        for key, value in iter_tensors(source, TINY_PATTERNS):
            if key not in names:
                continue
            name = names[key]
            if name in tgrow and name in wanted and value.shape[0] > wanted[name].shape[0]:
                value = value[-wanted[name].shape[0]:]  # last-timestep slice
            yield name, value

    return assign_tensors(model, tensors(), device=device, dtype_for=lambda n, t: dtype, what=describe(source))
