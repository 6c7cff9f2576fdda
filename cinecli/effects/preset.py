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
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class LoraCard:
    name: str
    source: WeightRef
    trigger: str = ""
    strength: float = 1.0
    fits_dims: tuple[int, ...] = ()
    model_types: tuple[str, ...] = ("i2v",)
    description: str = ""
    url: str = ""




@dataclass(frozen=True)
class SamplerSpec:
    kind: str = "distill"  # "distill": x0-prediction at fixed timesteps, no CFG; "euler": flow Euler + CFG;
    # "unipc": diffusers' UniPCMultistepScheduler for flow matching + CFG (the official Wan solver)
    timesteps: tuple[float, ...] = (1000, 750, 500, 250)
    steps: int = 4
    shift: float = 5.0
    guidance: float = 1.0
    step: str = "renoise"  # distill only: "renoise" (fresh noise each step, as trained) or "euler" (deterministic)

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
    image_encoder: WeightRef
    model_type: str = "i2v"
    supports_last_frame: bool = False
    merge: tuple[LoraCard, ...] = ()
    sampler: SamplerSpec = field(default_factory=SamplerSpec)
    quantize: str | None = None  # recipe applied at load when the checkpoint is not pre-quantized
    tiny_vae: WeightRef | None = None
    description: str = ""
    negative_prompt: str = ""  # CFG backbones: the reference default (Wan's sample_neg_prompt), used unless overridden
    dit_config: str | None = None  # a DIT_CONFIGS name: lets the memory plan size the DiT before it is downloaded

    def components(self) -> dict[str, WeightRef]:
        refs = {"dit": self.dit, "vae": self.vae, "text_encoder": self.text_encoder, "tokenizer": self.tokenizer,
                "image_encoder": self.image_encoder}
        refs.update({f"lora:{card.name}": card.source for card in self.merge})
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
        return self.sampler or self.backbone.sampler

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
            refs[f"effect:{self.effect.name}"] = self.effect.source
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
    return spec


def parse_card(raw: dict, base: Path, name: str) -> LoraCard:
    return LoraCard(
        name=raw.get("name", name), source=parse_ref(raw.get("source"), base, f"LoRA {name} source"),
        trigger=raw.get("trigger", ""), strength=float(raw.get("strength", 1.0)),
        fits_dims=tuple(raw.get("fits_dims", ())), model_types=tuple(raw.get("model_types", ("i2v",))),
        description=raw.get("description", ""), url=raw.get("url", ""),
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
        refs = {k: parse_ref(raw.get(k), where, f"backbone {name} {k}") for k in
                ("dit", "vae", "text_encoder", "tokenizer", "image_encoder")}
        return Backbone(
            name=name, **refs, model_type=raw.get("model_type", "i2v"),
            supports_last_frame=bool(raw.get("supports_last_frame", False)),
            merge=tuple(self.card(c, where) for c in raw.get("merge", ())),
            sampler=parse_sampler(raw.get("sampler")) or SamplerSpec(), quantize=raw.get("quantize"),
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
