"""``load_dit``: a Wan2.1 DiT from any layout in the wild, its config read or inferred from tensor shapes."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..core.devices import activation_dtype, choose_device, choose_dtype, limits
from ..core.errors import WeightsError
from ..weights import Source, iter_tensors, read_config
from ..weights.files import component_folder, describe, read_header, resolve_files
from ..weights.gguf import block_types, is_gguf
from ..weights.keys import block_count, normalize_dit_keys
from .gguf_linear import swap_in_gguf
from .load import assign_tensors, build_empty
from .quant import swap_in
from .recipes import read_metadata
from .wan_dit import DIT_CONFIGS, Chunking, DiTConfig, WanDiT, keeps_fp32

# Which files of a folder hold the DiT: diffusers/official shards first, then any single file.
DIT_PATTERNS = ("diffusion_pytorch_model*.safetensors", "*.safetensors", "*.gguf", "*.pth", "*.pt", "*.bin")


def infer_config(shapes: dict[str, tuple[int, ...]], config_json: dict | None = None) -> DiTConfig:
    """A DiTConfig from canonical key shapes; ``num_heads`` from config.json when present, else dim/128."""
    try:
        dim, in_dim, *patch = shapes["patch_embedding.weight"]
        ffn_dim = shapes["blocks.0.ffn.0.weight"][0]
        out_dim = shapes["head.head.weight"][0] // (patch[0] * patch[1] * patch[2])
        text_dim = shapes["text_embedding.0.weight"][1]
        freq_dim = shapes["time_embedding.0.weight"][1]
    except (KeyError, ValueError) as exc:
        raise WeightsError(f"not a Wan2.1 DiT checkpoint: missing or odd tensor {exc}") from None
    if "img_emb.emb_pos" in shapes:
        model_type = "flf2v"
    elif "img_emb.proj.1.weight" in shapes or "blocks.0.cross_attn.k_img.weight" in shapes:
        model_type = "i2v"
    elif in_dim > 16:  # mask ‖ condition latent on the input, no CLIP branch: Wan2.2's i2v experts
        model_type = "i2v-noclip"
    else:
        model_type = "t2v"
    cfg = config_json or {}
    heads = cfg.get("num_heads") or cfg.get("num_attention_heads") or dim // 128  # every release uses head_dim 128
    image_dim = shapes.get("img_emb.proj.1.weight", (0, 1280))[1]
    return DiTConfig(
        model_type=model_type, dim=dim, ffn_dim=ffn_dim, num_heads=heads, num_layers=block_count(shapes, "blocks."),
        in_dim=in_dim, out_dim=out_dim, patch_size=tuple(patch), text_dim=text_dim, freq_dim=freq_dim,
        image_dim=image_dim, eps=cfg.get("eps", 1e-6),
    )


def load_dit(
    source: Source,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    config: DiTConfig | str | None = None,
) -> WanDiT:
    """Load a Wan2.1 DiT (t2v, i2v or flf2v, any width and depth) from a file, folder or state dict.

    Accepts original Wan keys, diffusers folders/keys, ComfyUI prefixes (``model.diffusion_model.``,
    ``diffusion_model.``), sharded ``*.safetensors.index.json`` and ``.pth`` (weights only). ``dtype`` is the
    weight dtype (default: ``choose_dtype('auto')`` for the device); norms and modulation stay float32 and the
    time embedding, residual stream and head compute in float32. Activations run in ``dtype`` where the device
    multiplies it natively, else float32. Pre-quantized checkpoints (``cine quantize`` output, ComfyUI fp8 /
    fp8_scaled, lightx2v fp8/int8, city96's GGUF files) keep their quantized weights. Returns the model in eval mode; its forward maps
    x [B,16,F,H,W], t [B], context [B,L≤512,4096], clip_fea [B,257|514,1280], y [B,20,F,H,W] → velocity fp32.
    """
    device = choose_device(device)
    dtype = choose_dtype(dtype if dtype is not None else "auto", device)
    source = component_folder(source, "transformer")
    header = read_header(source, DIT_PATTERNS)  # one read of the headers for shapes and stored dtypes
    shapes = {k: shape for k, (shape, _) in header.items()}
    try:
        names = normalize_dit_keys(shapes)
    except KeyError:
        raise WeightsError(f"{describe(source)} holds no Wan2.1 DiT (no patch_embedding.weight key)") from None
    canonical_shapes = {names[k]: shapes[k] for k in names}
    quant_meta = read_metadata(source)
    if isinstance(config, str):
        config = DIT_CONFIGS[config]
    if config is None and quant_meta is not None:
        config = DiTConfig(**{**quant_meta["config"], "patch_size": tuple(quant_meta["config"]["patch_size"])})
    cfg = config or infer_config(canonical_shapes, read_config(source))
    model = build_empty(lambda: WanDiT(cfg))
    # Pre-quantized layers: ours (metadata), or float8/int8 weights from ComfyUI / lightx2v files.
    wild = quant_meta["layers"] if quant_meta else wild_quant_layers(model, {names[k]: header[k][1] for k in names})
    swap_in(model, wild, meta=True)
    ggml = gguf_layers(model, source, names)  # GGUF block-quantized weights, dequantized per call
    swap_in_gguf(model, ggml)
    layers = {**wild, **ggml}

    def dtype_for(name: str, tensor: torch.Tensor) -> torch.dtype:
        module, _, leaf = name.rpartition(".")
        if module in layers and leaf in ("weight", "weight_scale"):
            return tensor.dtype  # quantized data and its scales stay as stored
        return torch.float32 if keeps_fp32(name) else dtype

    tensors = ((names[k], v) for k, v in iter_tensors(source, DIT_PATTERNS) if k in names)
    if wild and not quant_meta:
        tensors = wild_quant_tensors(tensors, wild, canonical_shapes)
    model = assign_tensors(model, tensors, device=device, dtype_for=dtype_for, what=describe(source),
                           copy=isinstance(source, Mapping))
    model.compute_dtype = activation_dtype(device, dtype)
    model.chunking = Chunking.for_device(limits(device))
    model.quant_recipe = quant_meta["recipe"] if quant_meta else ("gguf" if ggml else "prequantized" if layers else "none")
    model.quant_layers = dict(layers)
    return model


def gguf_layers(model: WanDiT, source: Source, names: dict[str, str]) -> dict[str, str]:
    """``{linear module: GGML type}`` of the block-quantized weights in GGUF files of ``source``."""
    if isinstance(source, Mapping):
        return {}
    kinds = {}
    for path in resolve_files(source, DIT_PATTERNS):
        for key, kind in (block_types(path) if is_gguf(path) else {}).items():
            if key not in names:
                continue  # another component's tensor: reported by the loader as unexpected, if at all
            module, _, leaf = names[key].rpartition(".")
            linear = dict(model.named_modules()).get(module) if leaf == "weight" else None
            if not isinstance(linear, torch.nn.Linear):
                raise WeightsError(f"{path.name}: {key} is {kind}-quantized but is not a linear layer's weight")
            kinds[module] = kind
    return kinds


def wild_quant_layers(model: WanDiT, dtypes: dict[str, torch.dtype]) -> dict[str, str]:
    """Linear layers stored as float8 (ComfyUI fp8 / fp8_scaled, lightx2v fp8) or int8 (lightx2v int8)."""
    layers = {}
    for name, module in model.named_modules():
        dt = dtypes.get(f"{name}.weight")
        if isinstance(module, torch.nn.Linear) and dt in (torch.float8_e4m3fn, torch.int8):
            layers[name] = "fp8" if dt == torch.float8_e4m3fn else "int8"
    if any(dt == torch.float8_e5m2 for dt in dtypes.values()):
        raise WeightsError("float8_e5m2 weights are not supported (only e4m3fn, as ComfyUI and lightx2v publish)")
    return layers


def wild_quant_tensors(tensors, layers: dict[str, str], shapes: dict[str, tuple[int, ...]]):
    """Bring scales of other tools to ours: per-output-channel float32 ``weight_scale`` [out, 1].

    lightx2v: ``weight_scale`` [out, 1] already. ComfyUI fp8_scaled: a scalar ``scale_weight`` (broadcast to every
    channel); its ``scaled_fp8`` marker, ``scale_input`` and ``comfy_quant`` entries carry nothing we need.
    Plain ComfyUI fp8 has no scale at all: 1.
    """
    seen = set()
    for name, tensor in tensors:
        module, _, leaf = name.rpartition(".")
        if name == "scaled_fp8" or leaf in ("scale_input", "input_scale", "comfy_quant"):
            continue
        if leaf in ("scale_weight", "weight_scale") and module in layers:
            if tensor.numel() == 0:
                raise WeightsError(f"{module}.{leaf} is empty: a broken fp8 export (its weights would be unscaled)")
            out = shapes[f"{module}.weight"][0]
            tensor = tensor.float().reshape(-1, 1).expand(out, 1).contiguous() if tensor.numel() in (1, out) else tensor.float()
            name = f"{module}.weight_scale"
            seen.add(module)
        yield name, tensor
    for module, fmt in layers.items():
        if module not in seen:
            if fmt == "int8":
                raise WeightsError(f"{module} is int8 but has no weight_scale: cannot dequantize it")
            yield f"{module}.weight_scale", torch.ones(shapes[f"{module}.weight"][0], 1)


def cast_dit(model: WanDiT, dtype: torch.dtype) -> WanDiT:
    """Cast an in-memory DiT's weights to ``dtype`` under the same fp32 policy and activation rule as ``load_dit``."""
    for name, p in model.named_parameters():
        p.data = p.data.to(torch.float32 if keeps_fp32(name) else dtype)
    model.compute_dtype = activation_dtype(model.patch_embedding.weight.device, dtype)
    return model


