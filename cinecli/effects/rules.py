"""Every value a user gives, checked in one place before anything loads: options, preset fields, launcher variables.

``RULES`` is the one table: a name → a rule that returns ``None`` for a good value or says what is wrong. The same
rule serves an option (``--frames``), a preset field (``frames = 0``) and a batch option, so ``cine run``,
``cine batch`` and presets accept exactly the same values. Add an option's rule here, not next to its use.

  check_options(values)        options of run/batch (a dict or dataclass; None means "not given")   → UsageError
  check_choices(...)           options that contradict each other (an effect word and --effect/--preset)
  check_preset(preset)         a resolved Preset's fields, naming the file and the field              → UsageError
  unused_option_warnings(...)  options that would do nothing in this run (warn, don't fail)
  parse_shard(value, env)      --shard i/N, or torchrun/accelerate RANK/WORLD_SIZE, or a Slurm array (stepped too)
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, is_dataclass

from ..core.errors import UsageError
from ..core.sizes import parse_size

# 2x the frame count Wan2.1 was trained on; longer clips degrade and waste memory. Here, not in pipeline.py, so
# the CLI can check values without importing torch.
MAX_FRAMES = 161

Rule = Callable[[object], "str | None"]  # a value → None when good, else what is wrong (one short phrase)


def number(low: float, high: float, integer: bool = True) -> Rule:
    """A finite number in [low, high] (an int where ``integer``)."""

    def rule(value: object) -> str | None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
            return f"must be {'a whole number' if integer else 'a number'}"
        if not math.isfinite(value):
            return "must be a finite number"
        if not low <= value <= high:
            return f"must be between {low:g} and {high:g}" if not integer else f"must be between {low} and {high}"
        return None

    return rule


def one_of(*choices: str) -> Rule:
    return lambda value: None if value in choices else f"must be one of {', '.join(choices)}"


def device_name(value: object) -> str | None:
    """The syntax of a device (whether it exists here is devices.choose_device's question: exit 7, not 2)."""
    if isinstance(value, str) and re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", value):
        return None
    return "must be auto, cpu, cuda, cuda:N or mps"


def timesteps(value: object) -> str | None:
    """A distilled sampler's schedule: at least one step, each in (0, 1000], strictly decreasing."""
    if not isinstance(value, (list, tuple)) or not value:
        return "must list at least one timestep, e.g. [1000, 750, 500, 250]"
    if any(number(0, 1000, integer=False)(t) or t <= 0 for t in value):
        return "must hold numbers in (0, 1000]"
    if any(a <= b for a, b in zip(value, value[1:])):
        return "must be strictly decreasing"
    return None


def _dtypes() -> tuple[str, ...]:
    from ..core.devices import DTYPES  # the one list of dtypes

    return ("auto", *DTYPES)


# The choices of the word-valued options live here, below everything that uses them (presets, the sampler, image
# fitting, slow motion), so checking a value never imports the module that acts on it.
SAMPLER_KINDS = ("distill", "euler", "unipc")
DISTILL_STEPS = ("renoise", "euler")  # distilled samplers: fresh noise each step (as trained) or deterministic x0 + σ·v
FITS = ("crop", "pad", "stretch")  # how a photo meets the model's frame (generate/image.py)
SLOWDOWNS = tuple(range(2, 9))  # 2..8: RIFE follows 16 fps motion to 8x (beyond, the model should make the motion)
INTERPOLATORS = ("rife", "minterpolate")  # learned RIFE v4.26 (default), FFmpeg's block matching (no weights)
FACTORS = number(2, 8)  # `cine interpolate --factor N`


def slowdown_problem(value: object) -> str | None:
    """The rule for ``--slowdown`` and a preset's ``slowdown``: 2 to 8, or off.

    1 is refused rather than read as "none": ``off`` says that without looking like a typo of a factor.
    """
    text = str(value).strip().lower()
    if not isinstance(value, bool) and (text == "off" or (text.isdigit() and int(text) in SLOWDOWNS)):
        return None
    return f"must be {SLOWDOWNS[0]} to {SLOWDOWNS[-1]} or off"


def parse_slowdown(value: str | int | None) -> int | None:
    """A checked ``--slowdown`` → 2 to 8; ``off`` → 1 (no up-sampling); None → None (the preset decides)."""
    if value is None:
        return None
    if problem := slowdown_problem(value):
        raise UsageError(f"--slowdown {value}: {problem}")
    return 1 if str(value).strip().lower() == "off" else int(value)


# The table. Keys are RunOptions/BatchOptions attribute names and preset/sampler field names; the option is
# --key with _ → - (OPTION_NAMES says otherwise).
RULES: dict[str, Rule] = {
    "frames": number(1, MAX_FRAMES),
    "fps": number(1, 240),
    "steps": number(1, 200),
    "seed": number(0, 2**64 - 1),  # torch.Generator.manual_seed takes 64 bits
    "crf": number(0, 51),  # libx264's scale
    "strength": number(-10, 10, integer=False),  # LoRA scale; beyond ±10 only produces noise or NaN
    "effect_strength": number(-10, 10, integer=False),
    "max_area": number(32 * 32, 4096 * 4096),  # pixels of the frame (480×832 = 399,360)
    "timesteps": timesteps,
    "shift": number(0.01, 100, integer=False),
    "guidance": number(0, 30, integer=False),
    "device": device_name,
    "dtype": lambda v: one_of(*_dtypes())(v),
    "fit": one_of(*FITS),
    "sampler": one_of(*SAMPLER_KINDS),
    "distill_step": one_of(*DISTILL_STEPS),
    "slowdown": slowdown_problem,  # 2 to 8, or off
    "interpolator": one_of(*INTERPOLATORS),
    "factor": FACTORS,
    "offload": one_of("auto", "none", "blocks"),  # DiT weights: the plan decides, all on the device, streamed blocks
    "memory_budget": lambda v: None if parse_size(v) else "must be a size like 8GB, 7.5G or 512MiB",  # memory_plan
}
OPTION_NAMES = {"quantize": "--quantize"}

def option_name(key: str) -> str:
    return OPTION_NAMES.get(key, "--" + key.replace("_", "-"))


def check_options(values: Mapping[str, object] | object) -> None:
    """Raise a one-line UsageError for the first given option that breaks its rule (``None`` = not given)."""
    if is_dataclass(values):
        values = asdict(values)
    for key, rule in RULES.items():
        value = values.get(key)
        if value is not None and (problem := rule(value)):
            raise UsageError(f"{option_name(key)} {value}: {problem}")


def check_fields(fields: Mapping[str, object], where: str) -> None:
    """The same rules for fields of a TOML file: ``where`` names the file (and table)."""
    for key, value in fields.items():
        if key in RULES and value is not None and (problem := RULES[key](value)):
            raise UsageError(f"{where}: {key} = {value!r}: {problem}")


def check_preset(preset) -> None:
    """A resolved Preset's own fields, its sampler and its backbone's sampler."""
    where = f"preset {preset.source}" if preset.source else f"preset {preset.name}"
    check_fields({"frames": preset.frames, "fps": preset.fps, "max_area": preset.max_area,
                  "effect_strength": preset.effect_strength}, where)
    for label, spec in ((f"{where} [sampler]", preset.sampler), (f"backbone {preset.backbone.name} sampler", preset.backbone.sampler)):
        if spec is not None:
            fields = {"guidance": spec.guidance, "shift": spec.shift}
            fields.update({"timesteps": spec.timesteps} if spec.kind == "distill" else {"steps": spec.steps})
            check_fields(fields, label)
    if preset.effect is not None:
        check_fields({"strength": preset.effect.strength}, f"LoRA card {preset.effect.name}")
        card, backbone = preset.effect, preset.backbone
        if backbone.model_type not in card.model_types:  # e.g. a Wan2.1 effect LoRA on Wan2.2's experts
            raise UsageError(f"effect LoRA {card.name} is for {'/'.join(card.model_types)} backbones; backbone "
                             f"{backbone.name} is {backbone.model_type} (Wan2.1 effect LoRAs do not carry over to "
                             "Wan2.2; a Wan2.2 card names model_types = [\"i2v-noclip\"])")


def check_choices(effect_word: str | None = None, effects: str | list | None = None, preset_file: object = None) -> None:
    """Choices that contradict each other: an effect named twice, or an effect and ``--preset``."""
    if effect_word and effects:
        raise UsageError(f"the effect is named twice ('{effect_word}' and --effect {effects}); name it once")
    if (effect_word or effects) and preset_file is not None:
        raise UsageError(f"both an effect ('{effect_word or effects}') and --preset {preset_file} given; the preset file "
                         "is an effect of its own, so pass one of them")


def unused_option_warnings(values: Mapping[str, object], preset, sampler=None) -> list[str]:
    """Options given that this run would ignore: say so rather than let the user believe they mattered.
    ``sampler`` is the one the run will use (the plan's: --sampler may differ from the preset's)."""
    out = []
    sampler = sampler or preset.effective_sampler
    # the pipeline encodes a negative prompt only for classifier-free guidance (SamplerSpec.uses_cfg)
    if values.get("negative_prompt") is not None and not sampler.uses_cfg:
        out.append(f"warning: --negative-prompt does nothing here: the {sampler.kind} sampler of backbone "
                   f"{preset.backbone.name} runs without classifier-free guidance")
    if values.get("strength") is not None and preset.effect is None:
        out.append(f"warning: --strength does nothing here: effect {preset.name} has no effect LoRA")
    return out


# --- shards from launchers -------------------------------------------------------------------------------------------
def _env_int(env: Mapping[str, str], name: str) -> int:
    try:
        return int(env[name])
    except ValueError:
        raise UsageError(f"{name}={env[name]!r} is not a whole number (set by the launcher; unset it or pass --shard i/N)") from None


def parse_shard(value: str | None, env: Mapping[str, str] | None = None) -> tuple[int, int]:
    """``i/N``, else torchrun/accelerate (RANK, WORLD_SIZE), else a Slurm array, else (0, 1).

    Slurm arrays: ``--array=0-31`` numbers tasks MIN..MAX; ``--array=0-31:2`` (SLURM_ARRAY_TASK_STEP=2) runs every
    second one, so the shard is (ID − MIN) / STEP of (MAX − MIN) / STEP + 1. Lists (``--array=1,4,9``) have no
    arithmetic: they are refused with the --shard to use instead.
    """
    env = os.environ if env is None else env
    if value:
        try:
            i, n = (int(x) for x in value.split("/"))
        except ValueError:
            raise UsageError(f"--shard {value}: expected i/N, e.g. 0/4") from None
        source = f"--shard {value}"
    elif "WORLD_SIZE" in env and "RANK" in env:
        i, n = _env_int(env, "RANK"), _env_int(env, "WORLD_SIZE")
        source = f"RANK={i} WORLD_SIZE={n}"
    elif "SLURM_ARRAY_TASK_COUNT" in env and "SLURM_ARRAY_TASK_ID" in env:
        task, n = _env_int(env, "SLURM_ARRAY_TASK_ID"), _env_int(env, "SLURM_ARRAY_TASK_COUNT")
        low = _env_int(env, "SLURM_ARRAY_TASK_MIN") if "SLURM_ARRAY_TASK_MIN" in env else 0
        step = _env_int(env, "SLURM_ARRAY_TASK_STEP") if "SLURM_ARRAY_TASK_STEP" in env else 1
        if step < 1:
            raise UsageError(f"SLURM_ARRAY_TASK_STEP={step} must be at least 1")
        spanned = (_env_int(env, "SLURM_ARRAY_TASK_MAX") - low) // step + 1 if "SLURM_ARRAY_TASK_MAX" in env else n
        i, off = divmod(task - low, step)
        source = f"Slurm array task {task} (min {low}, step {step}, count {n})"
        if off or spanned != n or not 0 <= i < n:
            raise UsageError(f"{source} is not on an evenly spaced range (an --array list?); pass --shard i/{n} "
                             "explicitly for each task")
    else:
        return 0, 1
    if n < 1 or not 0 <= i < n:
        raise UsageError(f"shard {i}/{n} from {source} is out of range (need 0 ≤ i < N)")
    return i, n
