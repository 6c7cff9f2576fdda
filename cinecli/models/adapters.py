"""LoRAs on a loaded DiT: merged once (backbone LoRAs such as the 4-step distillation) or attached unmerged
through peft and switched per job (effect LoRAs), so changing effects never reloads the backbone.

Unmerged effects: every low-rank delta becomes a peft ``lora`` adapter on its module (scale and strength folded
into ``lora_B``, peft's own scaling left at 1). Full deltas (``diff``, ``diff_b``, ``diff_m`` — not low-rank, so
not peft-shaped) are applied to the parameter when the effect is switched on; the originals of just those
parameters are kept to restore them exactly when it is switched off. Switching A → B → A therefore gives the
same output as A alone, and the backbone weights end exactly as they began.

DoRA modules (a magnitude per output row) go through peft's ``use_dora`` when unmerged and are merged as
W ← m ⊙ (W + strength·ΔW) / ‖W + strength·ΔW‖, which is what peft computes. Tensors of formats cine does not apply
(LoHa, LoKr, ``lora_mid``…) are counted in a warning on every load; a file that is mostly such tensors is refused.
"""

from __future__ import annotations

import re
import warnings

import torch
import torch.nn as nn

from ..core.errors import WeightsError
from ..weights import Source
from ..weights.lora_file import LoraFile, LowRank, check_fit, check_ignored, read_lora, warn_ignored
from .gguf_linear import GGUFLinear
from .quant import QuantLinear, quantize


def _load(lora: Source | LoraFile) -> LoraFile:
    return lora if isinstance(lora, LoraFile) else read_lora(lora)


def _param_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    """Logical parameter shapes under checkpoint names: a peft-wrapped ``q.base_layer.weight`` counts as
    ``q.weight``, and a quantized layer's weight has its unpacked [out, in] shape."""
    shapes = {name.replace(".base_layer.", "."): tuple(p.shape) for name, p in model.named_parameters() if ".lora_" not in name}
    for name, module in model.named_modules():
        if isinstance(module, (QuantLinear, GGUFLinear)):
            shapes[f"{name.replace('.base_layer', '')}.weight"] = (module.out_features, module.in_features)
    return shapes


def _param(model: nn.Module, name: str) -> torch.Tensor:
    module_name, _, leaf = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    if hasattr(module, "base_layer"):  # peft wrapper: the real weight lives on the wrapped layer
        module = module.base_layer
    return getattr(module, leaf)


def _add_delta(model: nn.Module, name: str, delta: torch.Tensor, strength: float) -> None:
    """param ← param + strength·delta in fp32, cast back; a quantized weight is dequantized, added, requantized."""
    module_name, _, leaf = name.rpartition(".")
    layer = model.get_submodule(module_name) if module_name else model
    layer = getattr(layer, "base_layer", layer)
    if isinstance(layer, GGUFLinear) and leaf == "weight":
        raise WeightsError(f"{name}: a full weight delta (.diff) cannot be added to a GGUF layer; use a 16-bit backbone")
    if isinstance(layer, QuantLinear) and leaf == "weight":
        merged = layer.dequantized(torch.float32) + strength * delta.float().to(layer.weight.device)
        layer.weight.data, layer.weight_scale.data = quantize(merged, layer.fmt)
        return
    p = getattr(layer, leaf)
    p.copy_((p.float() + strength * delta.float().to(p.device)).to(p.dtype))


def _dora_delta(model: nn.Module, module: str, lr: LowRank, strength: float) -> torch.Tensor:
    """The change DoRA makes to ``module.weight``, fp32: m ⊙ (W + s·ΔW) / ‖W + s·ΔW‖_row − W."""
    layer = model.get_submodule(module)
    layer = getattr(layer, "base_layer", layer)
    w = layer.dequantized(torch.float32) if isinstance(layer, QuantLinear) else layer.weight.float()
    merged = w + strength * lr.delta(torch.float32).to(w.device)
    norm = merged.flatten(1).norm(dim=1).view(-1, *[1] * (w.ndim - 1))  # one norm per output row (peft's)
    return lr.magnitude.float().to(w.device).view_as(norm) * merged / norm - w


@torch.no_grad()
def merge_into(model: nn.Module, lora: Source | LoraFile, strength: float = 1.0, what: str = "LoRA") -> LoraFile:
    """Add ``strength`` × every delta of ``lora`` into the model's weights, permanently (fp32 math, cast back)."""
    lora = _load(lora)
    check_ignored(lora, what)
    check_fit(lora, _param_shapes(model), what)
    warn_ignored(lora, what)
    for module, lr in lora.low_rank.items():
        layer = model.get_submodule(module)
        if isinstance(getattr(layer, "base_layer", layer), GGUFLinear):  # GGML blocks: kept factored, added per call
            if lr.magnitude is not None or f"{module}.weight" in lora.full:
                raise WeightsError(f"{what}: DoRA and full deltas cannot be merged into GGUF layers ({module})")
            getattr(layer, "base_layer", layer).merge_low_rank(lr.down, lr.up, lr.scale * strength)
        elif lr.magnitude is not None:
            _add_delta(model, f"{module}.weight", _dora_delta(model, module, lr, strength), 1.0)
        else:
            _add_delta(model, f"{module}.weight", lr.delta(torch.float32), strength)
        if lr.bias is not None:
            _add_delta(model, f"{module}.bias", lr.bias, strength)
    for name, delta in lora.full.items():
        _add_delta(model, name, delta, strength)
    return lora


class Effects:
    """Unmerged effect LoRAs on one DiT; ``use(name)`` switches which one is active (``None``: none)."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.loaded: dict[str, LoraFile] = {}
        self.strengths: dict[str, float] = {}
        self.active: str | None = None
        self._originals: dict[str, torch.Tensor] = {}  # parameter → untouched copy, for full deltas only

    def load(self, name: str, lora: Source | LoraFile, strength: float = 1.0) -> LoraFile:
        """Attach ``lora`` as adapter ``name`` (inactive until ``use``). Refuses a LoRA that does not fit."""
        from peft import LoraConfig, inject_adapter_in_model

        if name in self.loaded:
            raise ValueError(f"effect {name} is already loaded")
        lora = _load(lora)
        check_ignored(lora, f"LoRA {name}")
        check_fit(lora, _param_shapes(self.model), f"LoRA {name}")

        def is_quantized(module: str) -> bool:
            layer = self.model.get_submodule(module)
            return isinstance(getattr(layer, "base_layer", layer), (QuantLinear, GGUFLinear))

        quantized = [p for p in lora.full if p.endswith(".weight") and is_quantized(p.rpartition(".")[0])]
        if quantized:
            raise WeightsError(f"LoRA {name} has full weight deltas (.diff) for quantized layers (e.g. {quantized[0]}): "
                               "use it on the 16-bit backbone, or merge it before quantizing")
        modules = sorted(lora.low_rank)
        dora = [m for m in modules if lora.low_rank[m].magnitude is not None]
        if any(is_quantized(m) for m in dora):  # peft's DoRA reads the base weight, which is packed here
            raise WeightsError(f"LoRA {name} is a DoRA on quantized layers: use it on the 16-bit backbone, or merge it "
                               "before quantizing")
        warn_ignored(lora, f"LoRA {name}")
        for group, use_dora in (([m for m in modules if m not in dora], False), (dora, True)):
            if not group:
                continue
            ranks = {re.escape(m): lora.low_rank[m].rank for m in group}
            config = LoraConfig(r=max(ranks.values()), lora_alpha=max(ranks.values()), target_modules=group,
                                rank_pattern=ranks, alpha_pattern=ranks, lora_dropout=0.0, init_lora_weights=False,
                                use_dora=use_dora)
            with warnings.catch_warnings():  # several adapters on one model is what Effects is for
                warnings.filterwarnings("ignore", message="Already found a `peft_config`")
                inject_adapter_in_model(config, self.model, adapter_name=name)
        if modules:
            dtype = getattr(self.model, "dtype", torch.float32)  # adapters compute in the activation dtype
            with torch.no_grad():
                for m in modules:
                    layer, lr = self.model.get_submodule(m), lora.low_rank[m]
                    a, b = layer.lora_A[name], layer.lora_B[name]
                    a.weight.data = lr.down.reshape(a.weight.shape).to(a.weight.device, dtype)
                    b.weight.data = (lr.up * (lr.scale * strength)).reshape(b.weight.shape).to(b.weight.device, dtype)
                    layer.scaling[name] = 1.0
                    if lr.magnitude is not None:  # peft: output rows rescaled to m / ‖W + B·A‖
                        mag = layer.lora_magnitude_vector[name].weight
                        mag.data = lr.magnitude.reshape(mag.shape).to(mag.device, dtype)
                    if lr.bias is not None:  # peft's lora_B has no bias: keep it with the full deltas
                        lora.full[f"{m}.bias"] = lora.full.get(f"{m}.bias", 0) + lr.bias
        self.loaded[name] = lora
        self.strengths[name] = strength
        self._activate_layers(self.active)
        return lora

    def _activate_layers(self, name: str | None) -> None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        for module in self.model.modules():
            if isinstance(module, BaseTunerLayer):
                if name is not None and name in module.lora_A:
                    module.enable_adapters(True)
                    module.set_adapter(name)
                else:
                    module.enable_adapters(False)

    @torch.no_grad()
    def use(self, name: str | None) -> None:
        """Make ``name`` the active effect (or none). Cheap: no weights are reloaded."""
        if name is not None and name not in self.loaded:
            raise WeightsError(f"effect {name} is not loaded (loaded: {', '.join(self.loaded) or 'none'})")
        if name == self.active:
            return
        for pname, original in self._originals.items():  # undo the previous effect's full deltas exactly
            _param(self.model, pname).copy_(original)
        if name is not None:
            for pname, delta in self.loaded[name].full.items():
                if pname not in self._originals:
                    self._originals[pname] = _param(self.model, pname).detach().clone()
                _add_delta(self.model, pname, delta, self.strengths[name])
        self._activate_layers(name)
        self.active = name
