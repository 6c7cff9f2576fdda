"""CLIP ViT-H/14 image tower (Wan2.1's image conditioning) on transformers' ``CLIPVisionModel``.

An image in [-1, 1] at any resolution → bicubic squash to 224×224 (no crop) → [0, 1] → CLIP mean/std →
patch embed (no bias) + CLS + positions → pre-LN → the first 31 of 32 pre-LN blocks → all 257 tokens, with no
post-LN and no projection (wan2.1-reference.md §E.2, K.10). The 32nd block's output is never used, so it is not
built: 1/32 less memory and time, and the model's last hidden state *is* the penultimate one.

Weight sources (any of them through ``cinecli.weights``):
  - the original Wan ``models_clip_open-clip-xlm-roberta-large-vit-huge-14.pth`` (``visual.*``; the text tower
    ``textual.*`` and ``log_scale`` are left out);
  - a transformers ``CLIPVisionModel`` / ``CLIPVisionModelWithProjection`` / ``CLIPModel`` folder or file
    (``image_encoder/`` of a diffusers Wan I2V root, ComfyUI ``clip_vision_h.safetensors``: ``vision_model.*``);
  - an open_clip checkpoint (``visual.conv1.weight``, ``visual.transformer.resblocks.N.attn.in_proj_weight``…).
The config comes from ``config.json`` when there is a valid one, else from tensor shapes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:  # transformers loads only with a model (see text_encoder.py)
    from transformers import CLIPVisionConfig, CLIPVisionModel

from ..core.devices import choose_device, choose_dtype, has_op, on_host
from ..core.errors import WeightsError
from ..weights.files import Source, component_folder, describe, iter_tensors, read_config, read_shapes
from ..weights.keys import block_count, compile_rules, normalize_first
from .load import assign_tensors, build_empty

log = logging.getLogger("cinecli")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class ImageEncoderConfig:
    image_size: int = 224
    patch_size: int = 14
    dim: int = 1280
    num_heads: int = 16  # head_dim 80
    dim_mlp: int = 5120
    num_layers: int = 32  # depth of the checkpoint; num_layers - 1 blocks are built and run
    eps: float = 1e-5
    act: str = "gelu"  # exact (erf) GELU
    in_channels: int = 3
    assumed: str = field(default="", compare=False)  # what shape inference had to guess (said in warnings and errors)

    @property
    def num_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2 + 1  # patches + CLS = 257 for ViT-H/14 at 224

    def to_hf(self) -> CLIPVisionConfig:
        from transformers import CLIPVisionConfig

        return CLIPVisionConfig(
            hidden_size=self.dim, intermediate_size=self.dim_mlp, num_hidden_layers=self.num_layers - 1,
            num_attention_heads=self.num_heads, num_channels=self.in_channels, image_size=self.image_size,
            patch_size=self.patch_size, hidden_act=self.act, layer_norm_eps=self.eps, attention_dropout=0.0,
        )


IMAGE_ENCODER_CONFIGS: dict[str, ImageEncoderConfig] = {
    "vit-h-14": ImageEncoderConfig(),
    "tiny": ImageEncoderConfig(image_size=28, patch_size=7, dim=32, num_heads=4, dim_mlp=64, num_layers=3),
}

_SHAPE_FIELDS = ("image_size", "patch_size", "dim", "dim_mlp", "in_channels")

# --- key conversion --------------------------------------------------------------------------------------------
# Canonical names are those of transformers' vision tower (CLIPVisionModel in transformers 5, its .vision_model
# in 4.x): embeddings.*, pre_layrnorm.*, encoder.layers.N.*, post_layernorm.*. Fused q|k|v projections go
# through the temporary name self_attn.qkv_proj and are split by ``convert_to_tower``.
WAN_CLIP_MARKERS = ("cls_embedding",)
WAN_CLIP_RULES = compile_rules([
    (r"patch_embedding", "embeddings.patch_embedding"),
    (r"cls_embedding", "embeddings.class_embedding"),
    (r"pos_embedding", "embeddings.position_embedding.weight"),
    (r"pre_norm", "pre_layrnorm"),
    (r"post_norm", "post_layernorm"),
    (r"transformer\.(\d+)\.norm1", r"encoder.layers.\1.layer_norm1"),
    (r"transformer\.(\d+)\.norm2", r"encoder.layers.\1.layer_norm2"),
    (r"transformer\.(\d+)\.attn\.to_qkv", r"encoder.layers.\1.self_attn.qkv_proj"),
    (r"transformer\.(\d+)\.attn\.proj", r"encoder.layers.\1.self_attn.out_proj"),
    (r"transformer\.(\d+)\.mlp\.0", r"encoder.layers.\1.mlp.fc1"),
    (r"transformer\.(\d+)\.mlp\.2", r"encoder.layers.\1.mlp.fc2"),
])
OPEN_CLIP_MARKERS = ("ln_pre.weight",)  # conv1/class_embedding exist only in the visual tower too, ln_pre is plainest
OPEN_CLIP_RULES = compile_rules([
    (r"conv1", "embeddings.patch_embedding"),
    (r"class_embedding", "embeddings.class_embedding"),
    (r"positional_embedding", "embeddings.position_embedding.weight"),
    (r"ln_pre", "pre_layrnorm"),
    (r"ln_post", "post_layernorm"),
    (r"transformer\.resblocks\.(\d+)\.ln_1", r"encoder.layers.\1.layer_norm1"),
    (r"transformer\.resblocks\.(\d+)\.ln_2", r"encoder.layers.\1.layer_norm2"),
    (r"transformer\.resblocks\.(\d+)\.attn\.in_proj_weight", r"encoder.layers.\1.self_attn.qkv_proj.weight"),
    (r"transformer\.resblocks\.(\d+)\.attn\.in_proj_bias", r"encoder.layers.\1.self_attn.qkv_proj.bias"),
    (r"transformer\.resblocks\.(\d+)\.attn\.out_proj", r"encoder.layers.\1.self_attn.out_proj"),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_fc", r"encoder.layers.\1.mlp.fc1"),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_proj", r"encoder.layers.\1.mlp.fc2"),
])
HF_CLIP_MARKERS = ("embeddings.patch_embedding.weight",)
# Projection heads (Wan ``head``, open_clip ``proj``) map CLS to the joint space; the features used are before them.
# ``embeddings.position_ids`` is an arange buffer older transformers saved (some clip_vision_h copies hold it).
_CLIP_SKIPPED = re.compile(r"^(head|proj|embeddings\.position_ids)$")

# Which files of a folder hold the tower: Wan repo root, ComfyUI names, transformers / open_clip names.
IMAGE_ENCODER_PATTERNS = (
    "models_clip_*.pth", "*clip_vision*.safetensors", "model*.safetensors", "pytorch_model*.bin",
    "open_clip_model.safetensors", "open_clip_pytorch_model.bin",
)


def image_encoder_key_map(keys: Sequence[str]) -> dict[str, str]:
    """``{source_key: tower_key}`` for a CLIP vision tower in the Wan, transformers or open_clip layout.

    Keys of other components (the text tower, ``log_scale``, ``visual_projection``) and the projection head are
    left out; fused qkv keys map to ``...self_attn.qkv_proj.*`` (split on load).
    """
    layouts = ((HF_CLIP_MARKERS, ()), (WAN_CLIP_MARKERS, WAN_CLIP_RULES), (OPEN_CLIP_MARKERS, OPEN_CLIP_RULES))
    names = normalize_first(keys, layouts)
    if names is None:
        raise WeightsError("no CLIP vision tower found (no patch_embedding, cls_embedding or ln_pre key)")
    return {k: v for k, v in names.items() if not _CLIP_SKIPPED.match(v)}


def convert_to_tower(items: Iterable[tuple[str, Tensor]]) -> Iterator[tuple[str, Tensor]]:
    """Tower-named tensors → exactly the tensors the transformers tower holds (works on meta tensors too)."""
    for name, tensor in items:
        if ".qkv_proj." in name:
            # Wan views to_qkv's output as (3, heads, head_dim) and open_clip's in_proj is [q; k; v]: rows split in 3.
            for part, chunk in zip("qkv", tensor.chunk(3, dim=0)):  # [3*dim, dim] → 3 × [dim, dim] (bias: [dim])
                yield name.replace(".qkv_proj.", f".{part}_proj."), chunk
        elif name == "embeddings.class_embedding":
            yield name, tensor.reshape(-1)  # Wan [1, 1, dim] → [dim]
        elif name == "embeddings.position_embedding.weight":
            yield name, tensor.reshape(-1, tensor.shape[-1])  # Wan [1, 257, dim] → [257, dim]
        else:
            yield name, tensor


def config_heads(config_json: dict | None) -> int | None:
    """The head count a config file states, if any: transformers' ``num_attention_heads`` (flat or under
    ``vision_config``), or open_clip's ``vision_cfg`` (width // head_width; open_clip's head_width default is 64)."""
    cfg = config_json or {}
    vision = cfg.get("vision_config", cfg) or {}
    if "num_attention_heads" in vision:
        return int(vision["num_attention_heads"])
    open_clip = (cfg.get("model_cfg", cfg) or {}).get("vision_cfg")
    if isinstance(open_clip, dict) and "width" in open_clip:
        return int(open_clip["width"]) // int(open_clip.get("head_width", 64))
    return None


def infer_image_config(shapes: Mapping[str, tuple[int, ...]], config_json: dict | None = None) -> ImageEncoderConfig:
    """A config from a CLIP vision ``config.json`` when present, else from tower-key shapes.

    Head count is not in any shape. In order: a config that states it (even a partial one, or open_clip's
    ``open_clip_config.json``); a named config the shapes match (allowing a checkpoint that already lacks its last
    block); a named config of the same width but another depth (its head count); else width / 64. The last two are
    guesses: ``assumed`` says which, and loading warns and names it in its errors.
    """
    vision = (config_json or {}).get("vision_config", config_json) or {}
    if all(k in vision for k in ("hidden_size", "num_attention_heads", "patch_size", "num_hidden_layers")):
        return ImageEncoderConfig(
            image_size=vision.get("image_size", 224), patch_size=vision["patch_size"], dim=vision["hidden_size"],
            num_heads=vision["num_attention_heads"], dim_mlp=vision["intermediate_size"],
            num_layers=vision["num_hidden_layers"], eps=vision.get("layer_norm_eps", 1e-5),
            act=vision.get("hidden_act", "quick_gelu"), in_channels=vision.get("num_channels", 3),
        )
    try:
        dim, in_channels, patch_size, _ = shapes["embeddings.patch_embedding.weight"]
        num_tokens = shapes["embeddings.position_embedding.weight"][0]
        dim_mlp = shapes["encoder.layers.0.mlp.fc1.weight"][0]
    except (KeyError, ValueError) as exc:
        raise WeightsError(f"not a CLIP vision checkpoint: missing or odd tensor {exc}") from None
    inferred = ImageEncoderConfig(
        image_size=math.isqrt(num_tokens - 1) * patch_size, patch_size=patch_size, dim=dim,
        num_heads=max(dim // 64, 1), dim_mlp=dim_mlp, num_layers=block_count(shapes, "encoder.layers."), in_channels=in_channels,
    )
    heads = config_heads(config_json)
    if heads is not None:
        return replace(inferred, num_heads=heads)
    same_width = [(name, named) for name, named in IMAGE_ENCODER_CONFIGS.items()
                  if all(getattr(named, f) == getattr(inferred, f) for f in _SHAPE_FIELDS)]
    for _, named in same_width:
        if inferred.num_layers in (named.num_layers, named.num_layers - 1):
            return named
    depth = f"{inferred.num_layers} blocks"
    if same_width:  # another depth of a known tower (a pruned ViT-H/14): its width, so its heads
        name, named = same_width[0]
        return replace(inferred, num_heads=named.num_heads, assumed=f"assumed {named.num_heads} heads as {name} of the "
                       f"same width ({depth}, {named.num_layers} in {name}); no config gave the head count")
    return replace(inferred, assumed=f"assumed {inferred.num_heads} heads (width {dim} / 64, {depth}); no config gave "
                   "the head count")


class ImageEncoder:
    """CLIP vision tower: images [B, 3, H, W] in [-1, 1] → penultimate-block tokens [B, 257, 1280]."""

    def __init__(self, model: CLIPVisionModel, config: ImageEncoderConfig, device: torch.device | None = None):
        self.model = model
        self.config = config
        self.tower = getattr(model, "vision_model", model)  # transformers 4.x wraps the tower, 5.x is the tower
        self._device = device  # the device it was loaded for (an emulated one reads as "cpu" on its tensors)

    @property
    def device(self) -> torch.device:
        return self._device or self.tower.embeddings.patch_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.tower.embeddings.patch_embedding.weight.dtype

    def to(self, device: str | torch.device) -> ImageEncoder:
        self.model.to(device)
        self._device = torch.device(device)
        return self

    def preprocess(self, images: Tensor) -> Tensor:
        """[B, 3, H, W] in [-1, 1], any H, W → CLIP pixel values [B, 3, S, S] float32 (S = image_size).

        As the reference: bicubic squash (align_corners=False, no crop, no antialias, no clamp), then [0, 1],
        then CLIP mean/std. Done in float32 whatever the model dtype.
        """
        size = (self.config.image_size, self.config.image_size)
        where = self.device if has_op(self.device, "upsample_bicubic2d") else torch.device("cpu")  # MPS before 2.6
        with on_host() if where != self.device else contextlib.nullcontext():
            x = F.interpolate(images.to(where, torch.float32), size=size, mode="bicubic", align_corners=False)
        x = x.to(self.device)
        x = x.mul(0.5).add(0.5)  # [-1, 1] → [0, 1]
        mean = torch.tensor(CLIP_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(CLIP_STD, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """images [B, 3, H, W] (or [3, H, W]) in [-1, 1] → features [B, num_tokens, dim] in the model dtype.

        The output of block num_layers-1 (31 of 32 for ViT-H): all tokens, CLS first, no post-LN, no head.
        """
        if images.ndim == 3:
            images = images[None]
        pixels = self.preprocess(images).to(self.dtype)  # [B, 3, S, S]
        return self.tower(pixel_values=pixels).last_hidden_state  # [B, num_tokens, dim]


def load_image_encoder(
    source: Source,
    *,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    config: ImageEncoderConfig | str | None = None,
    weight_dtype: torch.dtype | None = None,
) -> ImageEncoder:
    """Load the CLIP vision tower (all but its last block) from a Wan ``.pth``, a transformers folder or file,
    a ComfyUI ``clip_vision_h.safetensors``, an open_clip checkpoint or a state dict.

    ``dtype``: compute dtype (default ``choose_dtype('auto')``; the reference runs CLIP in fp16 on CUDA).
    ``weight_dtype``: with an fp32 ``dtype`` (CPUs that emulate bf16), keep the linear weights in this 16-bit dtype,
    memory-mapped from a 16-bit file, and multiply in fp32 (``layers.Linear``): half the memory of fp32 weights
    (1.2 GB instead of 2.5 GB for ViT-H), and pages the pipeline can drop after the image encode.
    Raises ``WeightsError`` for an unreadable or unsafe file and for missing / unexpected / mis-shaped keys.
    """
    device = choose_device(device)
    dtype = choose_dtype(dtype if dtype is not None else "auto", device)
    source = component_folder(source, "image_encoder")
    shapes = read_shapes(source, IMAGE_ENCODER_PATTERNS)
    try:
        names = image_encoder_key_map(list(shapes))
    except WeightsError as exc:
        raise WeightsError(f"{describe(source)}: {exc}") from None
    meta = ((names[k], torch.empty(shapes[k], device="meta")) for k in names)
    canonical_shapes = {name: tuple(t.shape) for name, t in convert_to_tower(meta)}
    if isinstance(config, str):
        config = IMAGE_ENCODER_CONFIGS[config]
    cfg = config or infer_image_config(canonical_shapes, read_config(source) or read_config(source, "open_clip_config.json"))
    assumed = f" ({cfg.assumed}: put the tower's config.json beside the weights)" if cfg.assumed else ""
    if cfg.num_layers < 2:
        raise WeightsError(f"{describe(source)}: a CLIP tower with {cfg.num_layers} block(s) has no penultimate block{assumed}")
    if cfg.dim % cfg.num_heads:
        raise WeightsError(f"{describe(source)}: width {cfg.dim} does not split into {cfg.num_heads} heads{assumed}")
    if cfg.assumed:
        log.warning(f"warning: image encoder {describe(source)}: {cfg.assumed}; if that is wrong its features are too")
    last_block = f"encoder.layers.{cfg.num_layers - 1}."  # read by nobody: not built, its tensors skipped

    from transformers import CLIPVisionModel

    model = build_empty(lambda: CLIPVisionModel(cfg.to_hf()))
    tower = getattr(model, "vision_model", model)
    renamed = ((names[k], v) for k, v in iter_tensors(source, IMAGE_ENCODER_PATTERNS) if k in names)
    tensors = ((name, t) for name, t in convert_to_tower(renamed) if not name.startswith(last_block))
    store = weight_dtype if weight_dtype is not None and dtype == torch.float32 and weight_dtype.itemsize == 2 else dtype
    if store != dtype:
        from .layers import Linear

        for m in tower.modules():
            if type(m) is torch.nn.Linear:
                m.__class__ = Linear  # same parameters; computes in its input's dtype from 16-bit weights
    linear = {f"{n}.weight" for n, m in tower.named_modules() if isinstance(m, torch.nn.Linear)}
    try:
        assign_tensors(tower, tensors, device=device, dtype_for=lambda name, t: store if name in linear else dtype,
                       what=describe(source))
    except WeightsError as exc:
        raise WeightsError(f"{exc}{assumed}") from None
    # position_ids is a non-persistent buffer: in no checkpoint, still on meta after the assignment.
    tower.embeddings.position_ids = torch.arange(cfg.num_tokens, device=device).expand(1, -1)
    leftover = [n for n, t in model.state_dict(keep_vars=True).items() if t.is_meta]
    leftover += [n for n, b in model.named_buffers() if b.is_meta]
    if leftover:  # a transformers version with tensors we do not know how to fill
        raise WeightsError(f"{describe(source)}: CLIP tensors left unloaded: {', '.join(sorted(set(leftover))[:4])}")
    model.eval().requires_grad_(False)
    return ImageEncoder(model, cfg, device)


__all__ = [
    "CLIP_MEAN", "CLIP_STD", "IMAGE_ENCODER_CONFIGS", "ImageEncoder", "ImageEncoderConfig", "convert_to_tower",
    "config_heads", "image_encoder_key_map", "infer_image_config", "load_image_encoder",
]
