"""LoRA files in every style found for Wan2.1, read into one form on canonical (original Wan) module names.

Styles (wan2.1-reference.md §G), any mix of them in one file:
  original   ``diffusion_model.blocks.0.self_attn.q.lora_down.weight`` / ``lora_up`` / ``.alpha`` (or lora_A / lora_B)
  kohya      ``lora_unet_blocks_0_self_attn_q.lora_down.weight`` (+ ``.alpha``): dots turned into underscores
  diffusers  ``transformer.blocks.0.attn1.to_q.lora_A.weight`` / ``lora_B.weight`` (+ ``lora_B.bias``)
  diff       ``<module>.diff`` (full weight delta), ``.diff_b`` (bias delta), ``blocks.N.diff_m`` (modulation delta)

Math: W ← W + strength · scale · (up @ down), scale = alpha / rank when an alpha is stored, else 1. diffusers and
peft store no ``.alpha`` tensors: their alpha (``lora_alpha``, ``alpha_pattern``) is read from the safetensors
header's ``lora_adapter_metadata`` or an ``adapter_config.json`` beside the file (``adapter_config``);
``param ← param + strength · diff`` for full deltas. Key names go through the one normalizer (weights.keys).
DoRA (``dora_scale`` / ``lora_magnitude_vector``, one magnitude per output row, as peft's ``use_dora``):
W ← m ⊙ (W + strength·ΔW) / ‖W + strength·ΔW‖ (row norms).

Tensors cine does not load — LoHa (``hada_*``), LoKr (``lokr_*``), OFT, LoCon's Tucker ``lora_mid`` (with the
down/up/alpha of its module), anything unrecognised — are counted by kind: loaders warn with the counts on every
load (as ComfyUI's "lora key not loaded") and refuse a file when most of its tensors would be ignored.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.errors import WeightsError
from .files import Source, iter_tensors
from .keys import normalize_lora_key

log = logging.getLogger("cinecli")
# Key markers of LoRA-family formats cine does not apply → the name the warning counts them under.
UNSUPPORTED = (("hada_", "LoHa"), ("lokr_", "LoKr"), ("oft_", "OFT"), ("boft_", "OFT"))


@dataclass
class LowRank:
    """One module's low-rank delta: up [out, rank] @ down [rank, in] (×scale), optional bias delta [out]."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float | None = None
    bias: torch.Tensor | None = None
    magnitude: torch.Tensor | None = None  # DoRA: [out], the norm each output row of W + ΔW is rescaled to
    alpha_source: str = "none"  # where alpha came from: "tensor", a metadata source (ADAPTER_SOURCES), or "none"

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank if self.alpha is not None else 1.0

    def delta(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The full weight delta [out, in] (scale included, strength not)."""
        down, up = self.down.to(dtype), self.up.to(dtype)
        if down.ndim > 2:  # conv LoRAs (patch_embedding): [r, in, kt, kh, kw]
            return (up.flatten(1) @ down.flatten(1)).view(up.shape[0], *down.shape[1:]) * self.scale
        return (up @ down) * self.scale


@dataclass
class LoraFile:
    """A parsed LoRA: low-rank deltas per module and full deltas per parameter, on canonical names."""

    low_rank: dict[str, LowRank] = field(default_factory=dict)  # module → delta ("blocks.0.self_attn.q")
    full: dict[str, torch.Tensor] = field(default_factory=dict)  # parameter → delta ("blocks.0.modulation")
    styles: Counter = field(default_factory=Counter)  # style → number of keys
    unknown: list[str] = field(default_factory=list)  # keys no style explains
    tensors: int = 0  # tensors in the file
    ignored: Counter = field(default_factory=Counter)  # kind (LoHa, lora_mid, …) → tensors that are not applied
    ignored_keys: list[str] = field(default_factory=list)

    @property
    def format(self) -> str:
        return "+".join(s for s, _ in self.styles.most_common()) or "empty"

    def targets(self) -> dict[str, tuple[int, ...]]:
        """Every parameter the LoRA changes → the shape it expects that parameter to have."""
        out = {}
        for module, lr in self.low_rank.items():
            out[f"{module}.weight"] = (lr.up.shape[0], *lr.down.shape[1:])
            if lr.bias is not None:
                out[f"{module}.bias"] = tuple(lr.bias.shape)
        out.update({name: tuple(t.shape) for name, t in self.full.items()})
        return out

    def summary(self) -> dict:
        ranks = Counter(lr.rank for lr in self.low_rank.values())
        alphas = Counter(lr.alpha for lr in self.low_rank.values())
        sources = Counter(lr.alpha_source for lr in self.low_rank.values())
        return {
            "format": self.format, "ranks": dict(sorted(ranks.items())),
            "alphas": {("none (scale 1)" if k is None else str(k)): v for k, v in alphas.items()},
            "alpha_sources": dict(sources),
            "low_rank_modules": len(self.low_rank), "full_deltas": len(self.full), "targets": len(self.targets()),
            "unknown_keys": len(self.unknown), "dora_modules": sum(lr.magnitude is not None for lr in self.low_rank.values()),
            "tensors": self.tensors, "ignored": dict(self.ignored),
        }

    def ignored_counts(self) -> str:
        """'LoHa 10, lora_mid 4': what is not applied, by kind."""
        return ", ".join(f"{k} {c}" for k, c in self.ignored.most_common())

    def _ignore(self, kind: str, keys: list[str]) -> None:
        self.ignored[kind] += len(keys)
        self.ignored_keys += keys


# --- alpha from metadata (diffusers and peft write no .alpha tensors) --------------------------------------------
ADAPTER_SOURCES = ("safetensors lora_adapter_metadata", "adapter_config.json")


def adapter_config(source: Source) -> tuple[dict, str] | None:
    """peft's LoRA config for a file: diffusers' ``lora_adapter_metadata`` in the safetensors header (keys prefixed
    ``transformer.``), else peft's ``adapter_config.json`` beside the file → ({r, lora_alpha, alpha_pattern,
    rank_pattern}, where it came from); None when neither is there (or the source is a state dict)."""
    if isinstance(source, Mapping):
        return None
    path = Path(source)
    if path.suffix == ".safetensors" and path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            raw = (f.metadata() or {}).get("lora_adapter_metadata")
        if raw:
            meta = json.loads(raw)
            prefixes = {k.split(".", 1)[0] for k in meta if "." in k and k.split(".", 1)[1] in ("r", "lora_alpha")}
            prefix = "transformer" if "transformer" in prefixes else next(iter(prefixes), None)
            if prefix:
                meta = {k.split(".", 1)[1]: v for k, v in meta.items() if k.startswith(prefix + ".")}
            return meta, ADAPTER_SOURCES[0]
    config = (path if path.is_dir() else path.parent) / "adapter_config.json"
    if config.is_file():
        return json.loads(config.read_text()), ADAPTER_SOURCES[1]
    return None


def _module_alpha(config: dict, module: str) -> float | None:
    """peft's rule: a key of ``alpha_pattern`` that matches the end of the module name wins, else ``lora_alpha``."""
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(alpha)
    return float(config["lora_alpha"]) if config.get("lora_alpha") is not None else None


def _file_module(prefix: str) -> str:
    """The file's own module name of a key prefix: ``transformer.blocks.0.attn1.to_q.lora_A`` → ``blocks.0.attn1.to_q``."""
    module = re.sub(r"\.(lora_[AB]|lora_down|lora_up)(\.default)?$", "", prefix)
    return module.split(".", 1)[1] if module.startswith(("transformer.", "diffusion_model.")) else module


def _unsupported_kind(key: str) -> str:
    leaf = key.rsplit(".", 1)[-1]  # hada_w1_a, lokr_w2, oft_blocks, …
    return next((name for marker, name in UNSUPPORTED if leaf.startswith(marker)), "unrecognised")


def read_lora(source: Source) -> LoraFile:
    """Parse a LoRA file (or state dict) of any style. Raises WeightsError on inconsistent pairs or no LoRA keys."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    keys: dict[str, list[str]] = {}  # module → its keys (to count what is ignored with it)
    raw_prefix: dict[str, str] = {}  # module → the file's own name for it
    unsupported_prefixes: dict[str, str] = {}  # file prefix → the unsupported kind found under it (LoHa, …)
    lora = LoraFile()
    for key, tensor in iter_tensors(source, ("*.safetensors", "*.pth", "*.pt", "*.bin")):
        lora.tensors += 1
        parsed = normalize_lora_key(key)
        if parsed is None:
            lora.unknown.append(key)
            kind = _unsupported_kind(key)
            if kind != "unrecognised":
                unsupported_prefixes[key.rsplit(".", 1)[0]] = kind
            lora._ignore(kind, [key])
            continue
        module, kind, style = parsed
        lora.styles[style] += 1
        if kind in ("diff", "diff_b", "diff_m"):
            param = {"diff": f"{module}.weight", "diff_b": f"{module}.bias", "diff_m": f"{module}.modulation"}[kind]
            lora.full[param] = tensor
        else:
            parts.setdefault(module, {})[kind] = tensor
            keys.setdefault(module, []).append(key)
            raw_prefix.setdefault(module, key.rsplit(".", 1)[0])
    config = adapter_config(source) if any("alpha" not in p for p in parts.values()) else None
    for module, p in parts.items():
        if "mid" in p:  # LoCon Tucker: the delta needs the mid factor, which cine does not apply
            lora._ignore("lora_mid", keys[module])
            continue
        if "down" not in p and "up" not in p:  # alpha / dora_scale of a module stored in another format (LoHa, LoKr)
            lora._ignore(unsupported_prefixes.get(raw_prefix[module], "alpha without factors"), keys[module])
            continue
        if "down" not in p or "up" not in p:
            have = ", ".join(sorted(p))
            raise WeightsError(f"LoRA module {module} has {have} but not both down/A and up/B matrices")
        down, up = p["down"], p["up"]
        if down.shape[0] != up.shape[1]:
            raise WeightsError(f"LoRA module {module}: down {tuple(down.shape)} and up {tuple(up.shape)} ranks differ")
        alpha, alpha_source = (float(p["alpha"]), "tensor") if "alpha" in p else (None, "none")
        if alpha is None and config is not None:
            alpha = _module_alpha(config[0], _file_module(raw_prefix[module]))
            alpha_source = config[1] if alpha is not None else "none"
        magnitude = p.get("dora")
        if magnitude is not None and magnitude.numel() != up.shape[0]:  # LyCORIS wd_on_output=False: per input column
            lora._ignore("dora_scale (input axis)", [k for k in keys[module] if "dora_scale" in k or "magnitude" in k])
            magnitude = None
        lora.low_rank[module] = LowRank(down=down, up=up.flatten(1) if up.ndim > 2 else up, alpha=alpha, bias=p.get("bias"),
                                        magnitude=magnitude.flatten() if magnitude is not None else None,
                                        alpha_source=alpha_source)
    if not lora.low_rank and not lora.full and set(lora.ignored) <= {"unrecognised"}:
        sample = ", ".join(lora.unknown[:3])
        raise WeightsError(f"no LoRA tensors recognised (first keys: {sample or 'none'})")
    return lora


def check_ignored(lora: LoraFile, what: str) -> None:
    """Refuse a file most of whose tensors would not be applied (one line, exit 4): it would not be the LoRA."""
    n = sum(lora.ignored.values())
    if 2 * n > lora.tensors:
        raise WeightsError(f"{what}: {n} of {lora.tensors} tensors would be ignored ({lora.ignored_counts()}); cine applies LoRA "
                           "(lora_down/up, lora_A/B, alpha), DoRA (dora_scale) and diff tensors — convert it to one of those")


def warn_ignored(lora: LoraFile, what: str) -> None:
    """Every load of a file with tensors that are not applied says so, with counts (ComfyUI: "lora key not loaded")."""
    n = sum(lora.ignored.values())
    if n:
        log.warning(f"warning: {what}: {n} of {lora.tensors} tensors not loaded ({lora.ignored_counts()}; "
                    f"e.g. {lora.ignored_keys[0]})")


def check_fit(lora: LoraFile, shapes: dict[str, tuple[int, ...]], what: str) -> None:
    """Every target must exist in the model with the shape the LoRA expects: a partial load is never silent."""
    missing = [t for t in lora.targets() if t not in shapes]
    wrong = [f"{t} {s}≠{shapes[t]}" for t, s in lora.targets().items() if t in shapes and tuple(shapes[t]) != tuple(s)]
    if missing or wrong:
        n = len(lora.targets())
        parts = []
        if wrong:
            parts.append(f"{len(wrong)} of {n} targets have another shape (e.g. {wrong[0]}; a LoRA for another model size?)")
        if missing:
            parts.append(f"{len(missing)} of {n} targets do not exist (e.g. {missing[0]}; an i2v LoRA on a t2v model?)")
        raise WeightsError(f"{what} does not fit this backbone: " + "; ".join(parts))
