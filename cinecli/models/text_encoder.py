"""umT5-XXL text encoder (Wan2.1's prompt encoder) on transformers' ``UMT5EncoderModel``.

Prompts → cleaned text → token ids padded to 512 (EOS included) → 24 pre-RMS-norm blocks with a per-layer
relative position bias and no 1/sqrt(d) attention scale → final RMS norm → rows trimmed to each prompt's real
length (wan2.1-reference.md §E.1). The DiT zero-pads them back to 512 itself (§A.2, K.5).

Weight sources (any of them through ``cinecli.weights``):
  - the original Wan ``models_t5_umt5-xxl-enc-bf16.pth`` (``token_embedding.weight``, ``blocks.N.attn.q.weight``…),
    converted by the rename table below;
  - a transformers / diffusers ``text_encoder/`` folder (``shared.weight``, ``encoder.block.N.layer.0…``),
    possibly sharded, with or without ``config.json``; a full UMT5 checkpoint (its decoder is skipped);
  - a single file of either layout, or a state dict;
  - ComfyUI's ``umt5_xxl_fp8_e4m3fn_scaled.safetensors`` (transformers names, float8 linear weights with a scalar
    ``scale_weight`` each and a ``scaled_fp8`` marker) and plain float8 files: the float8 weights stay float8 in
    memory (QuantLinear, dequantized per call), except the FFN output ``wo`` (see ``_dequantize_wo``).
The config comes from ``config.json`` when there is a valid one, else from tensor shapes.
"""

from __future__ import annotations

import html
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # transformers (~1 s, 100 MB) loads only with a model: the plan reads sizes without it
    from transformers import UMT5Config, UMT5EncoderModel

from ..core.devices import choose_device, choose_dtype
from ..core.errors import WeightsError
from ..weights.files import Source, component_folder, describe, iter_tensors, read_config, read_header
from ..weights.keys import block_count, compile_rules, normalize_first
from .dit_loader import wild_quant_layers, wild_quant_tensors
from .load import assign_tensors, build_empty
from .quant import QuantLinear, swap_in

try:  # optional, as in the reference: fixes mojibake before the html/whitespace cleaning
    import ftfy
except ImportError:  # pragma: no cover - depends on the environment
    ftfy = None


@dataclass(frozen=True)
class TextEncoderConfig:
    vocab_size: int = 256384
    dim: int = 4096  # d_model: residual width and width of the output features
    head_dim: int = 64  # d_kv
    num_heads: int = 64
    dim_ffn: int = 10240  # d_ff of the gated-GELU feed-forward
    num_layers: int = 24
    num_buckets: int = 32  # relative-position buckets, 16 per direction; every layer has its own table (umT5)
    max_distance: int = 128  # distances beyond this share the last bucket
    eps: float = 1e-6
    text_len: int = 512  # prompts are padded / truncated to this many tokens, EOS included

    def to_hf(self) -> UMT5Config:
        # "gated-gelu" makes transformers use gelu_new, the same tanh formula as Wan's T5 GELU (bit for bit);
        # gelu_pytorch_tanh would be F.gelu(approximate='tanh'): equal in exact arithmetic, rounded differently.
        from transformers import UMT5Config

        return UMT5Config(
            vocab_size=self.vocab_size, d_model=self.dim, d_kv=self.head_dim, d_ff=self.dim_ffn,
            num_layers=self.num_layers, num_heads=self.num_heads, relative_attention_num_buckets=self.num_buckets,
            relative_attention_max_distance=self.max_distance, layer_norm_epsilon=self.eps,
            feed_forward_proj="gated-gelu", dropout_rate=0.0, use_cache=False,
        )


TEXT_ENCODER_CONFIGS: dict[str, TextEncoderConfig] = {
    "umt5-xxl": TextEncoderConfig(),
    "tiny": TextEncoderConfig(vocab_size=64, dim=32, head_dim=8, num_heads=4, dim_ffn=48, num_layers=2),
}

# Fields that tensor shapes determine; the others (eps, max_distance, text_len) keep their defaults.
_SHAPE_FIELDS = ("vocab_size", "dim", "head_dim", "num_heads", "dim_ffn", "num_layers", "num_buckets")

# --- key conversion --------------------------------------------------------------------------------------------
# Canonical names are transformers' UMT5EncoderModel names. Wan's feed-forward is fc2(fc1(x) * gelu(gate.0(x)));
# transformers' is wo(gelu(wi_0(x)) * wi_1(x)): so gate.0 → wi_0 (the GELU branch) and fc1 → wi_1.
WAN_T5_MARKERS = ("token_embedding.weight",)
WAN_T5_RULES = compile_rules([
    (r"token_embedding", "shared"),
    (r"blocks\.(\d+)\.norm1", r"encoder.block.\1.layer.0.layer_norm"),
    (r"blocks\.(\d+)\.attn\.(q|k|v|o)", r"encoder.block.\1.layer.0.SelfAttention.\2"),
    (r"blocks\.(\d+)\.pos_embedding\.embedding", r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias"),
    (r"blocks\.(\d+)\.norm2", r"encoder.block.\1.layer.1.layer_norm"),
    (r"blocks\.(\d+)\.ffn\.gate\.0", r"encoder.block.\1.layer.1.DenseReluDense.wi_0"),
    (r"blocks\.(\d+)\.ffn\.fc1", r"encoder.block.\1.layer.1.DenseReluDense.wi_1"),
    (r"blocks\.(\d+)\.ffn\.fc2", r"encoder.block.\1.layer.1.DenseReluDense.wo"),
    (r"norm", "encoder.final_layer_norm"),  # last: after the renames above the only segment named exactly 'norm'
])
HF_T5_MARKERS = ("encoder.final_layer_norm.weight",)
# The input embedding is stored as shared.weight, encoder.embed_tokens.weight, or both (tied): one name for both.
HF_T5_RULES = compile_rules([(r"encoder\.embed_tokens", "shared")])
# Parts of a full UMT5 checkpoint (or a ComfyUI file) that the encoder does not use.
_T5_SKIPPED = re.compile(r"^(decoder\.|lm_head\.|spiece_model$)")

# Which files of a folder hold the encoder: Wan repo root, ComfyUI names, transformers/diffusers names.
TEXT_ENCODER_PATTERNS = (
    "models_t5_*.pth", "*umt5*.safetensors", "*umt5*.pth", "model*.safetensors", "pytorch_model*.bin",
)


def text_encoder_key_map(keys: Sequence[str]) -> dict[str, str]:
    """``{source_key: transformers_key}`` for a umT5 encoder in the Wan or transformers layout.

    Keys of other components (another prefix), the decoder and the lm head are left out; a tied embedding
    stored twice maps both copies to ``shared.weight``.
    """
    names = normalize_first(keys, ((WAN_T5_MARKERS, WAN_T5_RULES), (HF_T5_MARKERS, HF_T5_RULES)))
    if names is None:
        raise WeightsError("no umT5 encoder found (no token_embedding.weight or encoder.final_layer_norm.weight key)")
    return {k: v for k, v in names.items() if not _T5_SKIPPED.match(v)}


def infer_text_config(shapes: Mapping[str, tuple[int, ...]], config_json: dict | None = None) -> TextEncoderConfig:
    """A config from ``config.json`` when it describes a gated-GELU T5, else from canonical key shapes.

    A shape-inferred config that matches a named one returns the named one.
    """
    if config_json and "d_model" in config_json and "num_heads" in config_json:
        if config_json.get("feed_forward_proj", "gated-gelu") != "gated-gelu":
            raise WeightsError(f"unsupported T5 variant: feed_forward_proj={config_json['feed_forward_proj']!r}")
        return TextEncoderConfig(
            vocab_size=config_json["vocab_size"], dim=config_json["d_model"], head_dim=config_json["d_kv"],
            num_heads=config_json["num_heads"], dim_ffn=config_json["d_ff"], num_layers=config_json["num_layers"],
            num_buckets=config_json.get("relative_attention_num_buckets", 32),
            max_distance=config_json.get("relative_attention_max_distance", 128),
            eps=config_json.get("layer_norm_epsilon", 1e-6),
        )
    attn = "encoder.block.0.layer.0.SelfAttention."
    try:
        vocab_size, dim = shapes["shared.weight"]
        inner = shapes[attn + "q.weight"][0]  # heads * head_dim
        num_buckets, num_heads = shapes[attn + "relative_attention_bias.weight"]
        dim_ffn = shapes["encoder.block.0.layer.1.DenseReluDense.wi_0.weight"][0]
    except (KeyError, ValueError) as exc:
        raise WeightsError(f"not a umT5 encoder checkpoint: missing or odd tensor {exc}") from None
    inferred = TextEncoderConfig(
        vocab_size=vocab_size, dim=dim, head_dim=inner // num_heads, num_heads=num_heads, dim_ffn=dim_ffn,
        num_layers=block_count(shapes, "encoder.block."), num_buckets=num_buckets,
    )
    for named in TEXT_ENCODER_CONFIGS.values():
        if all(getattr(named, f) == getattr(inferred, f) for f in _SHAPE_FIELDS):
            return named
    return inferred


# --- text cleaning and tokenizer -------------------------------------------------------------------------------


def clean_prompt(text: str) -> str:
    """The reference cleaning: ftfy (when installed), html-unescape twice, collapse whitespace, strip."""
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


def _tokenizer_candidates(source: Source) -> list[Path]:
    """Folders where a tokenizer usually sits relative to the weights (Wan repo root, diffusers pipeline root)."""
    if isinstance(source, Mapping):
        return []
    path = Path(source).expanduser()
    folder = path if path.is_dir() else path.parent
    return [folder, folder / "google" / "umt5-xxl", folder.parent / "tokenizer", folder / "tokenizer"]


def _has_tokenizer_files(folder: Path) -> bool:
    return any((folder / name).is_file() for name in ("tokenizer.json", "spiece.model", "tokenizer_config.json"))


def load_tokenizer(path: str | os.PathLike):
    """A transformers tokenizer from a folder (``google/umt5-xxl`` of the Wan repo, or ``tokenizer/``)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError) as exc:
        raise WeightsError(f"cannot load the tokenizer from {path}: {str(exc).splitlines()[0]}") from None


# --- the encoder ------------------------------------------------------------------------------------------------


class TextEncoder:
    """umT5 encoder plus tokenizer: prompts → one feature matrix [L_i, dim] per prompt (L_i = real tokens + EOS)."""

    def __init__(self, model: UMT5EncoderModel, config: TextEncoderConfig, tokenizer=None):
        self.model = model
        self.config = config
        self.tokenizer = tokenizer

    @property
    def device(self) -> torch.device:
        return self.model.shared.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.shared.weight.dtype

    def to(self, device: str | torch.device) -> TextEncoder:
        """Move the weights (e.g. off the accelerator once the prompts are encoded)."""
        self.model.to(device)
        return self

    def tokenize(self, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Cleaned prompts → ``input_ids`` [B, text_len] int64 and ``attention_mask`` [B, text_len] (1 = real)."""
        if self.tokenizer is None:
            raise WeightsError("no tokenizer: pass tokenizer=<folder holding the umT5 tokenizer files>")
        batch = self.tokenizer(
            [clean_prompt(p) for p in prompts], padding="max_length", truncation=True,
            max_length=self.config.text_len, add_special_tokens=True, return_attention_mask=True,
            padding_side="right", return_tensors="pt",  # trimming keeps the first rows: pads must come last
        )
        return batch["input_ids"], batch["attention_mask"]

    @torch.no_grad()
    def encode_ids(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """input_ids [B, L] int, attention_mask [B, L] (1 = real, 0 = pad) → hidden states [B, L, dim].

        Rows at padded positions are computed but meaningless; padded keys are masked out of attention.
        """
        out = self.model(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device), return_dict=True,
        )
        return out.last_hidden_state

    def encode(self, prompts: str | Sequence[str], *, full_length: bool = False) -> list[Tensor]:
        """Prompts → list of [L_i, dim] tensors in the model dtype, trimmed to each prompt's length (EOS included).

        Padded keys are masked and the position bias depends only on i - j, so the real rows do not depend on
        how many pads follow them: the encoder runs on the longest real prompt of the batch, not on all 512
        tokens (5-25x less work for usual prompts). ``full_length=True`` runs all ``text_len`` tokens as the
        reference does; the rows agree to rounding.
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        if not prompts:
            return []
        ids, mask = self.tokenize(prompts)
        lengths = mask.gt(0).sum(dim=1).tolist()  # [B]
        if not full_length:
            keep = max(lengths)
            ids, mask = ids[:, :keep], mask[:, :keep]  # right padding: real tokens come first
        hidden = self.encode_ids(ids, mask)  # [B, L, dim]
        return [h[:n] for h, n in zip(hidden, lengths)]


def load_text_encoder(
    source: Source,
    *,
    tokenizer=None,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype | None = None,
    config: TextEncoderConfig | str | None = None,
) -> TextEncoder:
    """Load the umT5 encoder from a Wan ``.pth``, a transformers/diffusers folder, a file or a state dict.

    ``tokenizer``: a folder, a loaded tokenizer, or None to look next to the weights (the folder itself,
    ``google/umt5-xxl/`` of a Wan repo, ``tokenizer/`` of a diffusers root); without one only ``encode_ids``
    works. ``dtype``: compute dtype (default ``choose_dtype('auto')``); with float16 the feed-forward output
    projections ``wo`` stay float32, as transformers does, because umT5 activations overflow fp16 there.
    Raises ``WeightsError`` for an unreadable or unsafe file and for missing / unexpected / mis-shaped keys.
    """
    device = choose_device(device)
    dtype = choose_dtype(dtype if dtype is not None else "auto", device)
    source = component_folder(source, "text_encoder")
    header = read_header(source, TEXT_ENCODER_PATTERNS)  # shapes, and stored dtypes (float8 files)
    shapes = {k: shape for k, (shape, _) in header.items()}
    try:
        names = text_encoder_key_map(list(shapes))
    except WeightsError as exc:
        raise WeightsError(f"{describe(source)}: {exc}") from None
    canonical_shapes = {names[k]: shapes[k] for k in names}
    if isinstance(config, str):
        config = TEXT_ENCODER_CONFIGS[config]
    cfg = config or infer_text_config(canonical_shapes, read_config(source))

    from transformers import UMT5EncoderModel

    model = build_empty(lambda: UMT5EncoderModel(cfg.to_hf()))
    # The encoder stack reads the embedding through its own module; drop it so the one tensor is read and cast
    # once, and share the loaded module afterwards (what set_input_embeddings does).
    model.encoder.embed_tokens = None
    # ComfyUI fp8 / fp8_scaled: the float8 linear layers load as QuantLinear, their scales brought to ours.
    layers = wild_quant_layers(model, {names[k]: header[k][1] for k in names})
    swap_in(model, layers, meta=True)

    def dtype_for(name: str, tensor: Tensor) -> torch.dtype:
        module, _, leaf = name.rpartition(".")
        if module in layers and leaf in ("weight", "weight_scale"):
            return tensor.dtype  # quantized data and its scales stay as stored
        return torch.float32 if dtype == torch.float16 and ".wo." in name else dtype

    def tensors() -> Iterator[tuple[str, Tensor]]:
        seen: set[str] = set()
        for key, tensor in iter_tensors(source, TEXT_ENCODER_PATTERNS):
            name = names.get(key)
            if name is not None and name not in seen:  # a tied embedding stored twice is read once
                seen.add(name)
                yield name, tensor

    stream = wild_quant_tensors(tensors(), layers, {names[k]: shapes[k] for k in names}) if layers else tensors()
    assign_tensors(model, stream, device=device, dtype_for=dtype_for, what=describe(source))
    model.encoder.embed_tokens = model.shared
    _dequantize_wo(model, layers, torch.float32 if dtype == torch.float16 else dtype)

    if tokenizer is None:
        found = next((p for p in _tokenizer_candidates(source) if p.is_dir() and _has_tokenizer_files(p)), None)
        tokenizer = load_tokenizer(found) if found is not None else None
    elif isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = load_tokenizer(tokenizer)
    return TextEncoder(model, cfg, tokenizer)


def _dequantize_wo(model: UMT5EncoderModel, layers: dict[str, str], dtype: torch.dtype) -> None:
    """Float8 FFN output projections → plain linear layers in ``dtype``.

    transformers' gated FFN casts its hidden states to ``wo.weight.dtype`` before ``wo`` (its fp32-``wo`` overflow
    guard), which would turn them into float8; a dequantized ``wo`` keeps that guard working. It costs 1/6 of the
    linear weights in 16 bits (2 GB for umT5-XXL in bf16, against 11 GB for the whole model unquantized).
    """
    for name in [n for n in layers if n.endswith(".wo")]:
        parent, _, child = name.rpartition(".")
        q: QuantLinear = model.get_submodule(name)
        linear = torch.nn.Linear(q.in_features, q.out_features, bias=False, device="meta")
        linear.weight = torch.nn.Parameter(q.dequantized(dtype), requires_grad=False)
        setattr(model.get_submodule(parent), child, linear)
        del layers[name]


__all__ = [
    "TEXT_ENCODER_CONFIGS", "TextEncoder", "TextEncoderConfig", "clean_prompt", "infer_text_config",
    "load_text_encoder", "load_tokenizer", "text_encoder_key_map",
]
