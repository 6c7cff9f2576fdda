"""Effect presets: an effect name resolves to a shared backbone plus an effect LoRA, a prompt and settings.

Where presets come from, first match wins:
  1. ``--preset FILE`` (one TOML file);
  2. the user's config dir: ``<platformdirs user_config_dir("cine")>/presets/*.toml`` (and ``backbones.toml``,
     ``loras/*.toml`` beside them);
  3. the presets and LoRA cards shipped with cine (``presets/``, ``loras/`` in the source tree and the wheel).

A preset names its backbone (a table of ``backbones.toml``) and its effect LoRA (a card in ``loras/``) by name,
or defines either inline. Weight references are ``{repo, file[, revision]}`` or ``{path}``; relative paths are
taken relative to the TOML file that holds them.
"""

from __future__ import annotations

import difflib
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import tomllib

from ..core.dirs import config_dir
from ..core.errors import UsageError as PresetError  # an unknown effect or a malformed preset is a usage problem
from .rules import DISTILL_STEPS, SAMPLER_KINDS, check_fields, check_preset, parse_slowdown


@dataclass(frozen=True)
class WeightRef:
    """Where one component's weights live: a hub repo file (glob, folder/ or shard index) or a local path."""

    repo: str | None = None
    file: str | None = None
    revision: str | None = None
    path: Path | None = None
    bytes: int | None = field(default=None, compare=False)  # declared download size: --dry-run before the download

    def __str__(self) -> str:
        if self.path is not None:
            return str(self.path)
        return f"{self.repo}/{self.file}" + (f"@{self.revision}" if self.revision else "")


EXPERTS = ("high_noise", "low_noise")  # a two-expert backbone's DiTs (Wan2.2 A14B), in the order they run


@dataclass(frozen=True)
class LoraCard:
    """An effect or backbone LoRA. For a two-expert backbone it comes as a high/low pair (``source`` is the
    high-noise file, ``low_noise`` the other), or as one file applied to the ``experts`` the card names."""

    name: str
    source: WeightRef
    trigger: str = ""
    strength: float = 1.0
    fits_dims: tuple[int, ...] = ()
    model_types: tuple[str, ...] = ("i2v",)
    description: str = ""
    url: str = ""
    low_noise: WeightRef | None = None  # the pair's low-noise file (then ``source`` is the high-noise one)
    experts: tuple[str, ...] = EXPERTS  # a single file on a two-expert backbone: the experts it applies to

    def files(self) -> dict[str, WeightRef]:
        """Expert → the file it gets (a one-DiT backbone reads only "high_noise": its one DiT runs every step)."""
        if self.low_noise is not None:
            return {"high_noise": self.source, "low_noise": self.low_noise}
        return dict.fromkeys(self.experts, self.source)

    def labels(self, kind: str = "effect") -> dict[str, str]:
        """Expert → the weight label of its file (``effect:NAME``, the pair's low-noise file ``effect:NAME:low_noise``)."""
        return {e: f"{kind}:{self.name}" + (":low_noise" if self.low_noise is not None and e == "low_noise" else "")
                for e in self.files()}



@dataclass(frozen=True)
class SamplerSpec:
    kind: str = "distill"  # "distill": x0-prediction at fixed timesteps, no CFG; "euler": flow Euler + CFG;
    # "unipc": diffusers' UniPCMultistepScheduler for flow matching + CFG (the official Wan solver)
    timesteps: tuple[float, ...] = (1000, 750, 500, 250)
    steps: int = 4
    shift: float = 5.0
    guidance: float = 1.0
    step: str = "renoise"  # distill only: "renoise" (fresh noise each step, as trained) or "euler" (deterministic)
    # Two-expert backbones: where the high-noise expert hands over to the low-noise one. ``boundary_step_index``:
    # steps before this index run the high-noise expert (LightX2V's distilled list); ``boundary``: a fraction of
    # the 1000 timesteps, the high-noise expert while t >= boundary·1000 (Wan2.2's image2video.py). The index wins.
    boundary_step_index: int | None = None
    boundary: float | None = None

    @property
    def num_steps(self) -> int:
        return len(self.timesteps) if self.kind == "distill" else self.steps

    @property
    def uses_cfg(self) -> bool:
        """Whether each step runs a second, negative-prompt pass (classifier-free guidance)."""
        return self.kind != "distill" and self.guidance != 1.0


@dataclass(frozen=True)
class Backbone:
    name: str
    dit: WeightRef
    vae: WeightRef
    text_encoder: WeightRef
    tokenizer: WeightRef
    image_encoder: WeightRef | None  # None: the model takes no CLIP features (Wan2.2's i2v experts)
    model_type: str = "i2v"
    supports_last_frame: bool = False
    merge: tuple[LoraCard, ...] = ()
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    quantize: str | None = None  # recipe applied at load when the checkpoint is not pre-quantized
    tiny_vae: WeightRef | None = None
    description: str = ""
    negative_prompt: str = ""  # CFG backbones: the reference default (Wan's sample_neg_prompt), used unless overridden
    dit_config: str | None = None  # a DIT_CONFIGS name: lets the memory plan size the DiT before it is downloaded
    # A two-expert backbone (Wan2.2 A14B): ``dit`` is the high-noise expert, this the low-noise one; the sampler's
    # boundary says which runs each step.
    dit_low_noise: WeightRef | None = None

    @property
    def experts(self) -> tuple[str, ...]:
        """The DiT experts in the order they run: ("high_noise", "low_noise"), or ("high_noise",) for one DiT."""
        return EXPERTS if self.dit_low_noise is not None else EXPERTS[:1]

    def components(self) -> dict[str, WeightRef]:
        refs = {"dit": self.dit, **({"dit_low_noise": self.dit_low_noise} if self.dit_low_noise else {}),
                "vae": self.vae, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer}
        if self.image_encoder is not None:
            refs["image_encoder"] = self.image_encoder
        for card in self.merge:
            refs.update({label: card.files()[e] for e, label in card.labels("lora").items() if e in self.experts})
        return refs


@dataclass(frozen=True)
class Preset:
    name: str
    backbone: Backbone
    prompt: str
    effect: LoraCard | None = None
    effect_strength: float | None = None
    negative_prompt: str | None = None  # None: the backbone's
    frames: int = 49
    fps: int = 16
    max_area: int = 480 * 832
    slowdown: int = 1  # temporal up-sampling after decoding (output/interpolate.py); 1 = none
    sampler: SamplerSpec | None = None  # None: the backbone's
    aliases: tuple[str, ...] = ()
    description: str = ""
    source: Path | None = None

    @property
    def effective_sampler(self) -> SamplerSpec:
        """The preset's sampler, else the backbone's; a preset's table that names no expert switch keeps the
        backbone's (a two-expert backbone needs one)."""
        spec, own = self.sampler or self.backbone.sampler, self.backbone.sampler
        if spec.boundary_step_index is None and spec.boundary is None:
            index = own.boundary_step_index  # the same share of a schedule of another length
            index = round(index * spec.num_steps / own.num_steps) if index is not None else None
            spec = replace(spec, boundary_step_index=index, boundary=own.boundary)
        return spec

    def negative_for(self, sampler: SamplerSpec, override: str | None = None) -> str:
        """The negative prompt a run encodes: ``override`` (--negative-prompt), the preset's, else the backbone's;
        "" when the sampler runs no CFG pass (nothing would read it)."""
        if not sampler.uses_cfg:
            return ""
        for text in (override, self.negative_prompt):
            if text is not None:
                return text
        return self.backbone.negative_prompt

    def weights(self, fast_decode: bool = False) -> dict[str, WeightRef]:
        """Every weight reference a run of this preset needs, by component label."""
        refs = self.backbone.components()
        if self.effect is not None:
            files = self.effect.files()
            refs.update({label: files[e] for e, label in self.effect.labels().items() if e in self.backbone.experts})
        if fast_decode:
            if self.backbone.tiny_vae is None:
                raise PresetError(f"backbone {self.backbone.name} names no tiny_vae for --fast-decode")
            refs["tiny_vae"] = self.backbone.tiny_vae
        return refs


_WARNED: set[str] = set()


# --- where TOML files live --------------------------------------------------------------------------------------------
def builtin_dir(kind: str) -> Path:
    """``presets`` or ``loras`` shipped with cine: inside the wheel (cinecli/presets) or the source tree."""
    try:
        from importlib.resources import files

        path = Path(str(files(f"cinecli.{kind}")))
        if path.is_dir():
            return path
    except (ModuleNotFoundError, TypeError):
        pass
    return Path(__file__).resolve().parents[2] / kind


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise PresetError(f"cannot read preset file {path}: {exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise PresetError(f"malformed TOML in {path}: {exc}") from None


# --- parsing ---------------------------------------------------------------------------------------------------------
def parse_ref(raw: dict | str | None, base: Path, what: str) -> WeightRef:
    if isinstance(raw, str):
        raw = {"path": raw}
    if not isinstance(raw, dict) or not ({"repo", "file"} <= raw.keys() or "path" in raw):
        raise PresetError(f"{what}: expected {{repo = ..., file = ...}} or {{path = ...}}, got {raw!r}")
    size = int(raw["bytes"]) if raw.get("bytes") is not None else None
    if "path" in raw:
        path = Path(raw["path"]).expanduser()
        return WeightRef(path=path if path.is_absolute() else (base / path).resolve(), bytes=size)
    return WeightRef(repo=raw["repo"], file=raw["file"], revision=raw.get("revision"), bytes=size)


def parse_sampler(raw: dict | None) -> SamplerSpec | None:
    if raw is None:
        return None
    try:
        spec = SamplerSpec(**{k: tuple(v) if k == "timesteps" else v for k, v in raw.items()})
    except TypeError as exc:
        raise PresetError(f"bad sampler settings {raw!r}: {exc}") from None
    if spec.kind not in SAMPLER_KINDS:
        raise PresetError(f"unknown sampler kind '{spec.kind}' ({', '.join(SAMPLER_KINDS)})")
    if spec.step not in DISTILL_STEPS:
        raise PresetError(f"unknown distill step '{spec.step}' ({' or '.join(DISTILL_STEPS)})")
    index, boundary = spec.boundary_step_index, spec.boundary
    if index is not None and (isinstance(index, bool) or not isinstance(index, int) or index < 0):
        raise PresetError(f"sampler boundary_step_index must be a whole number ≥ 0, got {index!r}")
    if boundary is not None and (isinstance(boundary, bool) or not isinstance(boundary, (int, float))
                                 or not 0 <= boundary <= 1):
        raise PresetError(f"sampler boundary must be a fraction of the timesteps in [0, 1], got {boundary!r}")
    return spec


def parse_card(raw: dict, base: Path, name: str) -> LoraCard:
    """A LoRA card: ``source = {...}`` (one file; ``experts = ["high_noise"]`` limits it to one expert of a
    two-expert backbone), or a pair ``high_noise = {...}`` and ``low_noise = {...}``."""
    pair = "high_noise" in raw or "low_noise" in raw
    if pair and not {"high_noise", "low_noise"} <= raw.keys():
        raise PresetError(f"LoRA {name}: a pair names both files, high_noise = {{...}} and low_noise = {{...}}")
    if pair and "source" in raw:
        raise PresetError(f"LoRA {name}: give source (one file) or high_noise and low_noise (a pair), not both")
    experts = tuple(raw.get("experts", EXPERTS))
    if not experts or any(e not in EXPERTS for e in experts):
        raise PresetError(f"LoRA {name}: experts must name high_noise and/or low_noise, got {list(experts)}")
    return LoraCard(
        name=raw.get("name", name),
        source=parse_ref(raw.get("high_noise" if pair else "source"), base, f"LoRA {name} {'high_noise' if pair else 'source'}"),
        trigger=raw.get("trigger", ""), strength=float(raw.get("strength", 1.0)),
        fits_dims=tuple(raw.get("fits_dims", ())), model_types=tuple(raw.get("model_types", ("i2v",))),
        description=raw.get("description", ""), url=raw.get("url", ""),
        low_noise=parse_ref(raw["low_noise"], base, f"LoRA {name} low_noise") if pair else None, experts=experts,
    )


def _slowdown(value: object, path: Path) -> int:
    """A preset's ``slowdown`` (2 to 8 or "off"; checked by the --slowdown rule) → the factor; absent → 1."""
    check_fields({"slowdown": value}, f"preset {path}")
    return parse_slowdown(value) or 1


PRESET_KEYS = ("name", "description", "prompt", "negative_prompt", "backbone", "effect", "effect_strength", "frames",
               "fps", "max_area", "slowdown", "sampler", "aliases")


def _warn_unknown_keys(data: dict, path: Path) -> None:
    """A key cine does not read (``frams = 49``) would silently do nothing: say so once, with the likely key."""
    for key in data:
        if key not in PRESET_KEYS:
            close = difflib.get_close_matches(key, PRESET_KEYS, n=1, cutoff=0.6)
            text = f"preset {path}: unknown key '{key}'" + (f" (did you mean '{close[0]}'?)" if close else "") + "; it is ignored"
            if text not in _WARNED:
                _WARNED.add(text)
                sys.stderr.write(f"cine: warning: {text}\n")


class Catalog:
    """All backbones, LoRA cards and presets visible to this run (user definitions shadow built-in ones)."""

    def __init__(self, extra_preset: Path | None = None, search_user_dir: bool = True):
        dirs = [builtin_dir("presets")]
        lora_dirs = [builtin_dir("loras")]
        if search_user_dir:
            dirs.append(config_dir() / "presets")
            lora_dirs.append(config_dir() / "loras")
        self.backbones: dict[str, tuple[dict, Path]] = {}
        self.cards: dict[str, tuple[dict, Path]] = {}
        self.presets: dict[str, tuple[dict, Path]] = {}
        self.problems: dict[str, str] = {}  # user files skipped (name → why): one bad file must not break the rest
        self.extra: tuple[dict, Path] | None = None
        shadowed: dict[str, tuple[dict, Path]] = {}
        user_backbones = config_dir() / "backbones.toml"  # where the README points (presets/backbones.toml too)
        for d in dirs:  # later directories shadow earlier ones
            files = sorted(d.glob("*.toml")) if d.is_dir() else []
            if search_user_dir and d == dirs[-1] and user_backbones.is_file():
                files = [user_backbones, *files]
            for path in files:
                if (data := self._read(path, user=d != dirs[0])) is None:
                    continue
                if path.name == "backbones.toml":
                    self.backbones.update({k: (v, path.parent) for k, v in data.items()})
                else:
                    name = data.get("name", path.stem)
                    if name in self.presets:
                        shadowed[name] = self.presets[name]
                    self.presets[name] = (data, path)
        for d in lora_dirs:
            for path in sorted(d.glob("*.toml")) if d.is_dir() else []:
                if (data := self._read(path, user=d != lora_dirs[0])) is not None:
                    self.cards[data.get("name", path.stem)] = (data, path.parent)
        for name, (_, path) in list(self.presets.items()):  # user presets must resolve, or they are set aside
            if search_user_dir and path.parent != dirs[0]:
                try:
                    self.resolve(name)
                except (PresetError, AttributeError, KeyError, TypeError, ValueError) as exc:  # sampler = "x", …
                    self._skip(name, str(exc) if isinstance(exc, PresetError) else f"preset {path}: {exc!r}")
                    if name in shadowed:
                        self.presets[name] = shadowed[name]
                    else:
                        del self.presets[name]
        if extra_preset is not None:
            if not Path(extra_preset).is_file():
                raise PresetError(f"preset file not found: {extra_preset}")
            self.extra = (_read_toml(Path(extra_preset)), Path(extra_preset))

    def _read(self, path: Path, user: bool) -> dict | None:
        """A TOML file's data; a broken user file is skipped with a warning (a shipped one is a bug: it raises)."""
        try:
            return _read_toml(path)
        except PresetError as exc:
            if not user:
                raise
            self._skip(path.stem, str(exc))
            return None

    def _skip(self, name: str, problem: str) -> None:
        self.problems[name] = problem
        if problem not in _WARNED:  # many Catalogs per process (CLI, run, batch workers): one warning each
            _WARNED.add(problem)
            sys.stderr.write(f"cine: warning: skipping user preset '{name}': {problem.splitlines()[0]}\n")

    def names(self) -> list[str]:
        return sorted(self.presets)

    def aliases(self) -> dict[str, str]:
        out = {}
        for name, (data, _) in self.presets.items():
            out.update({a: name for a in data.get("aliases", ())})
            out[name] = name
        return out

    def card(self, ref: str | dict, base: Path) -> LoraCard:
        if isinstance(ref, dict):
            return parse_card(ref, base, ref.get("name", "inline"))
        if ref not in self.cards:
            raise PresetError(f"unknown LoRA card '{ref}' (known: {', '.join(sorted(self.cards))})")
        data, where = self.cards[ref]
        return parse_card(data, where, ref)

    def backbone(self, ref: str | dict, base: Path) -> Backbone:
        if isinstance(ref, dict):
            name, raw, where = ref.get("name", "inline"), ref, base
        elif ref in self.backbones:
            name, (raw, where) = ref, self.backbones[ref]
        else:
            raise PresetError(f"unknown backbone '{ref}' (known: {', '.join(sorted(self.backbones))})")
        refs = {k: parse_ref(raw.get(k), where, f"backbone {name} {k}") for k in ("dit", "vae", "text_encoder", "tokenizer")}
        model_type = raw.get("model_type", "i2v")
        no_clip = model_type == "i2v-noclip" and "image_encoder" not in raw  # Wan2.2's i2v: the photo enters through y
        refs["image_encoder"] = None if no_clip else parse_ref(raw.get("image_encoder"), where, f"backbone {name} image_encoder")
        low = parse_ref(raw["dit_low_noise"], where, f"backbone {name} dit_low_noise") if "dit_low_noise" in raw else None
        sampler = parse_sampler(raw.get("sampler")) or SamplerSpec()
        if low is not None and sampler.boundary_step_index is None and sampler.boundary is None:
            raise PresetError(f"backbone {name} has two experts (dit, dit_low_noise) but its sampler names no switch: "
                              "boundary_step_index or boundary")
        return Backbone(
            name=name, **refs, model_type=model_type, dit_low_noise=low,
            supports_last_frame=bool(raw.get("supports_last_frame", False)),
            merge=tuple(self.card(c, where) for c in raw.get("merge", ())),
            sampler=sampler, quantize=raw.get("quantize"),
            tiny_vae=parse_ref(raw["tiny_vae"], where, f"backbone {name} tiny_vae") if "tiny_vae" in raw else None,
            description=raw.get("description", ""), negative_prompt=raw.get("negative_prompt", ""),
            dit_config=raw.get("dit_config"),
        )

    def resolve(self, effect: str | None, backbone: str | None = None) -> Preset:
        """An effect name or alias (or the ``--preset`` file when ``effect`` is None) → a full Preset."""
        if self.extra is not None and (effect is None or effect == self.extra[0].get("name")):
            data, path = self.extra
            base = path.parent
        else:
            if effect is None:
                raise PresetError("no effect given")
            aliases = self.aliases()
            key = effect.strip().lower()
            if key not in aliases and key in self.problems:
                raise PresetError(self.problems[key])
            if key not in aliases:
                close = difflib.get_close_matches(key, list(aliases), n=1, cutoff=0.5)
                hint = f"; did you mean '{aliases[close[0]]}'?" if close else ""
                raise PresetError(f"unknown effect '{effect}'{hint} (effects: {', '.join(self.names())})")
            data, path = self.presets[aliases[key]]
            base = path.parent
        name = data.get("name", path.stem)
        _warn_unknown_keys(data, path)
        try:
            bb = self.backbone(backbone or data["backbone"], base)
            preset = Preset(
                name=name, backbone=bb, prompt=data["prompt"],
                effect=self.card(data["effect"], base) if data.get("effect") else None,
                effect_strength=data.get("effect_strength"), negative_prompt=data.get("negative_prompt"),
                frames=int(data.get("frames", 49)), fps=int(data.get("fps", 16)), max_area=int(data.get("max_area", 480 * 832)),
                slowdown=_slowdown(data.get("slowdown"), path),
                sampler=parse_sampler(data.get("sampler")), aliases=tuple(data.get("aliases", ())),
                description=data.get("description", ""), source=path,
            )
        except KeyError as exc:
            raise PresetError(f"preset {path} lacks the required field {exc}") from None
        except (TypeError, ValueError) as exc:  # e.g. frames = "many"
            raise PresetError(f"preset {path}: a field has the wrong type ({exc})") from None
        check_preset(preset)  # the same rules as the options: frames = 0 fails like --frames 0
        return preset
