"""The one key-normalizer: every checkpoint and LoRA key goes through here to reach our canonical names.

Canonical names are the original Wan2.1 names (``blocks.0.self_attn.q.weight``, ``encoder.conv1.weight``, …),
because that is what the official releases, ComfyUI, lightx2v and most LoRA trainers use.

Two steps, both data-driven:
  1. ``find_prefix``: a component is located inside a file by a *marker* key that it always has
     (``patch_embedding.weight`` for the DiT). Whatever stands before the marker is the prefix
     (``model.diffusion_model.``, ``diffusion_model.``, ``transformer.`` or nothing); keys without that
     prefix belong to other components of an all-in-one file and are left out.
  2. ``rename``: ordered regex rules map foreign module names (diffusers) back to canonical ones.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

Rules = Sequence[tuple[re.Pattern[str], str]]


def compile_rules(pairs: Sequence[tuple[str, str]]) -> Rules:
    """Rules as (regex, replacement); each regex is anchored at a dotted-name boundary on both ends."""
    return [(re.compile(r"(?<![^.])" + pat + r"(?![^.])"), repl) for pat, repl in pairs]


def find_prefix(keys: Iterable[str], markers: Sequence[str]) -> str | None:
    """The prefix in front of the first marker key found, '' when unprefixed, None when no marker is present."""
    found: list[str] = []
    for key in keys:
        for marker in markers:
            if key == marker or key.endswith("." + marker):
                found.append(key[: len(key) - len(marker)])
    if not found:
        return None
    return min(found, key=len)  # the shortest: a nested copy (e.g. an EMA sub-model) never wins over the main one


def rename(key: str, rules: Rules) -> str:
    for pattern, repl in rules:
        key = pattern.sub(repl, key)
    return key


def block_count(keys: Iterable[str], prefix: str) -> int:
    """How many numbered blocks ``<prefix>N.`` the keys hold (highest index + 1; 0 for none)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return max((int(m.group(1)) + 1 for k in keys if (m := pattern.match(k))), default=0)


def normalize_first(keys: Iterable[str], layouts: Sequence[tuple[Sequence[str], Rules]]) -> dict[str, str] | None:
    """``normalize_keys`` with the first (markers, rules) layout whose marker the keys hold; None if none does."""
    keys = list(keys)
    for markers, rules in layouts:
        try:
            return normalize_keys(keys, markers, rules)
        except KeyError:
            continue
    return None


def normalize_keys(keys: Iterable[str], markers: Sequence[str], rules: Rules = ()) -> dict[str, str]:
    """Map each source key of one component to its canonical name: ``{source_key: canonical_key}``.

    Keys outside the component (another prefix) are omitted. Raises ``KeyError`` when no marker is found.
    """
    keys = list(keys)
    prefix = find_prefix(keys, markers)
    if prefix is None:
        raise KeyError(f"none of {', '.join(markers)} found")
    return {k: rename(k[len(prefix):], rules) for k in keys if k.startswith(prefix)}


# --- DiT -------------------------------------------------------------------------------------------------------
# diffusers WanTransformer3DModel → original WanModel (wan2.1-reference.md §B). Order matters only where one
# pattern could produce another's input; the norm2→norm3 swap is safe because diffusers' norm3 has no tensors.
DIT_MARKERS = ("patch_embedding.weight",)
DIT_DIFFUSERS_RULES: Rules = compile_rules([
    (r"condition_embedder\.time_embedder\.linear_1", "time_embedding.0"),
    (r"condition_embedder\.time_embedder\.linear_2", "time_embedding.2"),
    (r"condition_embedder\.time_proj", "time_projection.1"),
    (r"condition_embedder\.text_embedder\.linear_1", "text_embedding.0"),
    (r"condition_embedder\.text_embedder\.linear_2", "text_embedding.2"),
    (r"condition_embedder\.image_embedder\.norm1", "img_emb.proj.0"),
    (r"condition_embedder\.image_embedder\.ff\.net\.0\.proj", "img_emb.proj.1"),
    (r"condition_embedder\.image_embedder\.ff\.net\.2", "img_emb.proj.3"),
    (r"condition_embedder\.image_embedder\.norm2", "img_emb.proj.4"),
    (r"condition_embedder\.image_embedder\.pos_embed", "img_emb.emb_pos"),
    (r"(blocks\.\d+)\.norm2", r"\1.norm3"),
    (r"(blocks\.\d+)\.scale_shift_table", r"\1.modulation"),
    (r"scale_shift_table", "head.modulation"),
    (r"proj_out", "head.head"),
    (r"attn1", "self_attn"),
    (r"attn2", "cross_attn"),
    (r"to_q", "q"),
    (r"to_k", "k"),
    (r"to_v", "v"),
    (r"to_out\.0", "o"),
    (r"add_k_proj", "k_img"),
    (r"add_v_proj", "v_img"),
    (r"norm_added_k", "norm_k_img"),
    (r"ffn\.net\.0\.proj", "ffn.0"),
    (r"ffn\.net\.2", "ffn.2"),
])


def normalize_dit_keys(keys: Iterable[str]) -> dict[str, str]:
    """``{source_key: original_wan_key}`` for a DiT in any layout (original, diffusers, ComfyUI prefixes)."""
    return normalize_keys(keys, DIT_MARKERS, DIT_DIFFUSERS_RULES)


# --- LoRA ------------------------------------------------------------------------------------------------------
LORA_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "base_model.model.", "transformer.", "model.")
# What a key's tail says it is: low-rank halves, alpha, bias delta (diffusers lora_B.bias), full deltas, the DoRA
# magnitude (LyCORIS/ComfyUI ``dora_scale``, peft ``lora_magnitude_vector``) and LoCon's Tucker ``lora_mid``.
_LORA_KIND = re.compile(
    r"\.(?:(?P<down>lora_down|lora_A)|(?P<up>lora_up|lora_B))(?:\.[^.]+)?\.weight$"
    r"|\.lora_B(?:\.[^.]+)?\.(?P<bias>bias)$|\.(?P<alpha>alpha)$|\.(?P<diff_b>diff_b)$|\.(?P<diff_m>diff_m)$|\.(?P<diff>diff)$"
    r"|\.(?:dora_scale|lora_magnitude_vector)(?:\.[^.]+)?(?:\.(?P<dora>weight))?$|\.(?P<mid>lora_mid)(?:\.weight)?$"
)
# kohya/musubi flatten module paths with underscores; these put the dots back (original and diffusers names).
_KOHYA_RULES = [
    (re.compile(r"^blocks_(\d+)_(self_attn|cross_attn)_(q|k|v|o|k_img|v_img|norm_q|norm_k|norm_k_img)$"), r"blocks.\1.\2.\3"),
    (re.compile(r"^blocks_(\d+)_(attn[12])_to_out_0$"), r"blocks.\1.\2.to_out.0"),
    (re.compile(r"^blocks_(\d+)_(attn[12])_(to_q|to_k|to_v|add_k_proj|add_v_proj)$"), r"blocks.\1.\2.\3"),
    (re.compile(r"^blocks_(\d+)_ffn_net_0_proj$"), r"blocks.\1.ffn.net.0.proj"),
    (re.compile(r"^blocks_(\d+)_ffn_net_2$"), r"blocks.\1.ffn.net.2"),
    (re.compile(r"^blocks_(\d+)_ffn_(\d+)$"), r"blocks.\1.ffn.\2"),
    (re.compile(r"^blocks_(\d+)_(norm\d)$"), r"blocks.\1.\2"),
    (re.compile(r"^(text_embedding|time_embedding|time_projection)_(\d+)$"), r"\1.\2"),
    (re.compile(r"^head_head$"), "head.head"),
    (re.compile(r"^img_emb_proj_(\d+)$"), r"img_emb.proj.\1"),
]
_DIFFUSERS_NAMES = re.compile(r"(?<![^.])(attn[12]|condition_embedder|proj_out|scale_shift_table|ffn\.net)(?![^.])")


def normalize_lora_key(key: str) -> tuple[str, str, str] | None:
    """A LoRA key → (canonical module, kind, style), or None for a key no style explains.

    kind: down | up | alpha | bias | diff | diff_b | diff_m | dora | mid;
    style: original | original-peft | kohya | diffusers | diff.
    """
    m = _LORA_KIND.search(key)
    if m is None:
        return None
    kind = m.lastgroup or "dora"  # dora_scale / lora_magnitude_vector without a .weight tail
    module = key[: m.start()]
    if module.startswith("lora_unet_"):
        flat = module[len("lora_unet_"):]
        for pattern, repl in _KOHYA_RULES:
            if pattern.match(flat):
                module = pattern.sub(repl, flat)
                break
        else:
            return None
        style = "kohya"
    else:
        for prefix in LORA_PREFIXES:
            if module.startswith(prefix):
                module = module[len(prefix):]
                break
        if kind.startswith("diff"):
            style = "diff"
        elif _DIFFUSERS_NAMES.search(module):
            style = "diffusers"
        else:
            style = "original-peft" if any(k in key for k in ("lora_A", "lora_B", "lora_magnitude_vector")) else "original"
    return rename(module, DIT_DIFFUSERS_RULES), kind, style
