"""Use the Wan files people already have: find them in a ComfyUI, Wan2GP or plain folder by content.

``identify(path)`` reads only a file's header (safetensors or GGUF: key names, shapes, dtypes; never the tensor
data) and says what it is: a Wan2.1 DiT (t2v/i2v/flf2v, its width and precision), a Wan2.2 i2v expert (the 14B
shape without the CLIP branch), a umT5 text encoder, a CLIP vision tower, a Wan2.1 VAE, a LoRA (for which width and
task), RIFE's IFNet, or unknown. Pickles are not scanned (their header is the whole file), except ``.pkl``: RIFE's
``flownet.pkl`` is 25 MB, read memory-mapped through ``torch.load(weights_only=True)``. The two Wan2.2 experts have
identical shapes, so which one a file holds (high or low noise) comes from its metadata or, failing that, its name
(``…high_noise…``, ``…_HIGH…``); a file that says neither is listed with one line asking to name it.

Where to look, all of them, in this order: ``--models-dir DIR`` (the CLI sets ``CINE_MODELS_DIR``), the
``CINE_MODELS_DIR`` environment variable (several folders separated by ``os.pathsep``), and ``models_dirs`` in
the user config ``<user_config_dir>/config.toml`` (``cine models scan DIR --remember`` adds one).

``with_local(backbone, refs)`` swaps each hub reference that is not in the Hugging Face cache for a found file
that fits the backbone, so a run uses it instead of downloading:
  dit            same task (``model_type``), and the width every LoRA card of the job ``fits_dims``; among several
                 fitting files the largest (the highest precision) wins. A two-expert backbone takes its
                 ``dit`` from the high-noise experts found and ``dit_low_noise`` from the low-noise ones. The 480P and 720P 14B models have the
                 same shapes: headers cannot tell them apart, so the file used is printed (``cine models list``).
  text_encoder   a umT5 encoder as wide as the DiT's text input;  image_encoder  a CLIP tower as wide as its
                 image input;  vae  a Wan2.1 VAE (16 latent channels).
LoRAs and tokenizers are never swapped: LoRAs of one shape are indistinguishable by header, and ComfyUI folders
hold no tokenizer. A used file is hashed once (sha256, size, mtime) into the lock file's ``local`` table, as
downloads are; nothing is copied or moved.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..core.dirs import config_dir
from ..core.errors import UsageError, WeightsError
from ..effects.preset import Backbone, WeightRef
from ..weights import lock
from ..weights.files import read_header
from ..weights.keys import normalize_dit_keys, normalize_lora_key

SCANNED = (".safetensors", ".sft", ".gguf", ".pkl")  # .pkl: RIFE's flownet.pkl (read with weights_only=True)
PICKLE_READ_LIMIT = 256 << 20  # a legacy pickle is read whole: only files of about flownet.pkl's size (25 MB)
SIZES = {5120: "14B", 1536: "1.3B"}
_GGUF_FLOATS = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}  # GGUF's own type names
_PRECISION = {torch.float8_e4m3fn: "fp8", torch.float8_e5m2: "fp8 e5m2", torch.int8: "int8", torch.bfloat16: "bf16",
              torch.float16: "fp16", torch.float32: "fp32"}


@dataclass
class Found:
    path: Path
    kind: str  # dit | text_encoder | image_encoder | vae | lora | rife | unknown
    label: str  # what a person reads: "DiT i2v 14B fp8 scaled"
    info: dict = field(default_factory=dict)  # model_type, dim, text_dim, image_dim, precision, …
    bytes: int = 0

    def as_dict(self) -> dict:
        return {"path": str(self.path), "kind": self.kind, "label": self.label, "bytes": self.bytes, **self.info}


def _size(dim: int) -> str:
    return SIZES.get(dim, f"dim {dim}")


def _precision(path: Path, header: dict, weights: list[str]) -> str:
    if path.suffix == ".gguf":
        from ..weights.gguf import block_types

        kinds = Counter(block_types(path).values())
        if kinds:
            return "GGUF " + kinds.most_common(1)[0][0]
        return "GGUF " + _GGUF_FLOATS.get(Counter(header[k][1] for k in weights).most_common(1)[0][0], "?")
    from .recipes import read_metadata

    if (meta := read_metadata(path)) is not None:  # cine's own quantized file (cine quantize, the DiT cache)
        return f"cine {meta.get('recipe', 'quantized')}"
    dtype = Counter(header[k][1] for k in weights).most_common(1)[0][0] if weights else torch.float32
    name = _PRECISION.get(dtype, str(dtype))
    if dtype == torch.float8_e4m3fn and any(k == "scaled_fp8" or k.endswith(".scale_weight") for k in header):
        name += " scaled"  # ComfyUI: one scale per tensor
    elif dtype in (torch.float8_e4m3fn, torch.int8) and any(k.endswith(".weight_scale") for k in header):
        name += " scaled per channel (lightx2v)"  # lightx2v: a scale per output channel
    return name


_ROLE = {"high_noise": re.compile(r"high[\W_]*noise|(?:^|[\W_])high(?:[\W_]|$)", re.I),
         "low_noise": re.compile(r"low[\W_]*noise|(?:^|[\W_])low(?:[\W_]|$)", re.I)}


def expert_role(path: Path) -> str | None:
    """A Wan2.2 expert's role, "high_noise" or "low_noise": from the safetensors metadata when it says, else from
    the file name; None when neither tells (or both words appear)."""
    texts = []
    if path.suffix in (".safetensors", ".sft"):
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                texts.append(" ".join(str(v) for v in (f.metadata() or {}).values()))
        except Exception:  # a header that read as weights but not as metadata: the name still may tell
            pass
    texts.append(path.name)
    for text in texts:
        roles = [role for role, pattern in _ROLE.items() if pattern.search(text)]
        if len(roles) == 1:
            return roles[0]
    return None


def _as_dit(path: Path, header: dict) -> Found | None:
    from .dit_loader import infer_config

    try:
        names = normalize_dit_keys(header)
        cfg = infer_config({names[k]: header[k][0] for k in names})
    except (KeyError, WeightsError):
        return None
    weights = [k for k in names if names[k].startswith("blocks.") and names[k].endswith(".weight") and len(header[k][0]) == 2]
    prec = _precision(path, header, weights)
    info = {"model_type": cfg.model_type, "dim": cfg.dim, "layers": cfg.num_layers, "text_dim": cfg.text_dim,
            "image_dim": cfg.image_dim, "precision": prec}
    if cfg.model_type == "i2v-noclip":  # Wan2.2 A14B: which expert is it?
        info["expert"] = role = expert_role(path)
        what = role.replace("_", "-") + " expert" if role else "expert (high or low noise? put high_noise or low_noise in its name)"
        return Found(path, "dit", f"DiT Wan2.2 i2v {_size(cfg.dim)} {prec}, {what}", info)
    return Found(path, "dit", f"DiT {cfg.model_type} {_size(cfg.dim)} {prec}", info)


def _as_text_encoder(path: Path, header: dict) -> Found | None:
    from .text_encoder import TEXT_ENCODER_CONFIGS, infer_text_config, text_encoder_key_map

    try:
        names = text_encoder_key_map(list(header))
        cfg = infer_text_config({names[k]: header[k][0] for k in names})
    except (WeightsError, KeyError):
        return None
    name = "umT5-XXL" if cfg == TEXT_ENCODER_CONFIGS["umt5-xxl"] else f"umT5 dim {cfg.dim}"
    prec = _precision(path, header, [k for k in names if ".layer." in names[k] and len(header[k][0]) == 2])
    return Found(path, "text_encoder", f"{name} {prec}", {"dim": cfg.dim, "precision": prec})


def _as_image_encoder(path: Path, header: dict) -> Found | None:
    from .image_encoder import IMAGE_ENCODER_CONFIGS, convert_to_tower, image_encoder_key_map, infer_image_config

    try:
        names = image_encoder_key_map(list(header))
        meta = ((names[k], torch.empty(header[k][0], device="meta")) for k in names)
        cfg = infer_image_config({n: tuple(t.shape) for n, t in convert_to_tower(meta)})
    except (WeightsError, KeyError, RuntimeError):
        return None
    name = "CLIP ViT-H/14" if cfg == IMAGE_ENCODER_CONFIGS["vit-h-14"] else f"CLIP vision dim {cfg.dim}"
    prec = _precision(path, header, [k for k in names if len(header[k][0]) == 2])
    return Found(path, "image_encoder", f"{name} {prec}", {"dim": cfg.dim, "precision": prec})


def _as_vae(path: Path, header: dict) -> Found | None:
    from .vae_loader import infer_vae_config, normalize_vae_keys

    try:
        names = normalize_vae_keys(list(header))
        canonical = {names[k]: header[k][0] for k in names}
    except KeyError:
        return None
    try:
        infer_vae_config(canonical)
    except WeightsError:
        z = canonical.get("conv2.weight", (0,))[0]
        return Found(path, "unknown", f"VAE with {z} latent channels (not Wan2.1's 16)", {})
    return Found(path, "vae", "Wan2.1 VAE", {"precision": _precision(path, header, list(names))})


def _as_lora(path: Path, header: dict) -> Found | None:
    parsed = {k: normalize_lora_key(k) for k in header}
    known = {k: v for k, v in parsed.items() if v is not None}
    if not known or len(known) < len(header) / 2:
        return None
    dims = Counter(header[k][0][1] for k, (module, kind, _) in known.items()
                   if kind == "down" and module.rsplit(".", 1)[-1] in ("q", "k", "v", "o") and len(header[k][0]) == 2)
    dim = dims.most_common(1)[0][0] if dims else None
    task = "i2v" if any("k_img" in m or "v_img" in m or "img_emb" in m for m, _, _ in known.values()) else "t2v or i2v"
    what = f"LoRA for {_size(dim)} {task}" if dim else "LoRA (full deltas)"
    return Found(path, "lora", what, {"dim": dim, "model_type": task})


def _as_rife(path: Path, header: dict) -> Found | None:
    from .rife import V4_26, is_rife_state

    if not is_rife_state(header):
        return None
    head = next((shape for k, (shape, _) in header.items() if k.endswith("encode.cnn3.weight")), None)
    fits = head is not None and head[1] == V4_26.head_channels  # ConvTranspose2d weight [in, out, k, k]
    return Found(path, "rife", "RIFE IFNet v4.25/4.26" if fits else "RIFE IFNet (another version)", {"fits": fits})


def identify(path: Path) -> Found:
    """What one weight file is, from its header only."""
    path = Path(path)
    size = path.stat().st_size
    if path.suffix == ".pkl" and size > PICKLE_READ_LIMIT:
        return Found(path, "unknown", "pickle, too large to be RIFE's flownet.pkl (not read)", bytes=size)
    try:
        header = read_header(path)
    except WeightsError as exc:
        return Found(path, "unknown", f"unreadable ({str(exc)[:80]})", bytes=size)
    for probe in (_as_rife, _as_lora, _as_dit, _as_vae, _as_text_encoder, _as_image_encoder):
        found = probe(path, header)
        if found is not None:
            found.bytes = size
            return found
    if path.suffix == ".gguf":
        from ..weights.gguf import architecture

        return Found(path, "unknown", f"GGUF, architecture {architecture(path)!r} (not used by cine)", bytes=size)
    return Found(path, "unknown", "unknown", bytes=size)


def scan(folder: Path) -> list[Found]:
    """Every weight file under ``folder`` (recursively, hidden folders skipped), identified."""
    folder = Path(folder).expanduser()
    if folder.is_file():  # one file: identify it
        return [identify(folder)]
    if not folder.is_dir():
        raise UsageError(f"models folder not found: {folder}")
    files = sorted(p for p in folder.rglob("*") if p.suffix in SCANNED and p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    return [identify(p) for p in files]


# --- where to look -----------------------------------------------------------------------------------------------
def config_path() -> Path:
    return config_dir() / "config.toml"


def models_dirs() -> list[Path]:
    """The folders to look in: CINE_MODELS_DIR (``--models-dir`` sets it), then the user config's ``models_dirs``."""
    import tomllib

    dirs = [Path(p).expanduser() for p in os.environ.get("CINE_MODELS_DIR", "").split(os.pathsep) if p.strip()]
    for d in dirs:
        if not d.is_dir():  # as --models-dir: a folder that is not there is a mistake to say, not to skip
            raise UsageError(f"CINE_MODELS_DIR: {d} is not a folder")
    if config_path().is_file():
        try:
            dirs += [Path(p).expanduser() for p in tomllib.loads(config_path().read_text()).get("models_dirs", [])]
        except (tomllib.TOMLDecodeError, OSError) as exc:
            raise UsageError(f"malformed user config {config_path()}: {exc}") from None
    return list(dict.fromkeys(dirs))


def remember(folder: Path) -> Path:
    """Add ``folder`` to ``models_dirs`` in the user config (other settings there are kept)."""
    import json

    import tomllib

    path = config_path()
    text = path.read_text() if path.is_file() else ""
    current = tomllib.loads(text).get("models_dirs", []) if text else []
    folder = str(Path(folder).expanduser().resolve())
    if folder in current:
        return path
    lines = [line for line in text.splitlines() if not line.startswith("models_dirs")]
    path.parent.mkdir(parents=True, exist_ok=True)
    # json.dumps writes a valid TOML array of basic strings; the key goes first so it stays at the top level.
    path.write_text("\n".join([f"models_dirs = {json.dumps([*current, folder])}", *lines]) + "\n")
    return path


# --- matching a backbone --------------------------------------------------------------------------------------------
def _dit_dims(backbone: Backbone, cards) -> set[int] | None:
    dims = [set(c.fits_dims) for c in cards if c.fits_dims]
    return set.intersection(*dims) if dims else None


def choose(backbone: Backbone, found: list[Found], cards=(), dit: dict | None = None) -> dict[str, Found]:
    """Which found file serves each component of ``backbone`` (``dit``: the DiT's info when it is not scanned)."""
    out: dict[str, Found] = {}
    dims = _dit_dims(backbone, cards)
    dits = [f for f in found if f.kind == "dit" and f.info["model_type"] == backbone.model_type
            and (dims is None or f.info["dim"] in dims)]
    if backbone.dit_low_noise is not None:  # two experts: each label from the files of its role
        for label, role in (("dit", "high_noise"), ("dit_low_noise", "low_noise")):
            fits = [f for f in dits if f.info.get("expert") == role]
            if fits:
                out[label] = max(fits, key=lambda f: f.bytes)
    elif dits:
        out["dit"] = max(dits, key=lambda f: f.bytes)
    if "dit" in out:
        dit = out["dit"].info
    for kind, key in (("text_encoder", "text_dim"), ("image_encoder", "image_dim")):
        fits = [f for f in found if f.kind == kind and (dit is None or f.info["dim"] == dit[key])]
        if fits:
            out[kind] = max(fits, key=lambda f: f.bytes)
    vaes = [f for f in found if f.kind == "vae"]
    if vaes:
        out["vae"] = max(vaes, key=lambda f: f.bytes)
    return out


def record(path: Path) -> dict:
    """sha256 of a used local file in the lock's ``local`` table; re-hashed only when its size or mtime changed
    (lock.check_local, the one place that does this for every local weight file)."""
    lock.note_local([path])
    return lock.read_lock()["local"][str(path.resolve())]


def with_local(backbone: Backbone, refs: dict[str, WeightRef], cards=(), hash_files: bool = True) -> dict[str, WeightRef]:
    """``refs`` with each backbone component missing from the cache replaced by a fitting file of the models dirs."""
    from ..weights.hub import locate

    folders = [f for f in models_dirs() if f.is_dir()]  # a configured folder on an unplugged disk is skipped
    if not folders:
        return refs
    missing = {label for label in ("dit", "dit_low_noise", "text_encoder", "image_encoder", "vae")
               if label in refs and refs[label].repo is not None and locate(refs[label]).path is None}
    if not missing:
        return refs
    found = [f for folder in folders for f in scan(folder)]
    dit = None
    if "dit" not in missing and (located := locate(refs["dit"])).path is not None:
        dit = _dit_info(located.path)
    chosen = choose(backbone, found, cards, dit)
    out = dict(refs)
    experts = {"dit", "dit_low_noise"}
    if experts <= refs.keys() and len(missing & experts) == 1 and not experts <= chosen.keys():
        missing -= experts  # two experts come from one place: never a local high-noise file beside a hub low-noise one
    for label in missing & chosen.keys():
        if label not in experts and "dit" in missing and "dit" not in chosen:
            continue  # the encoders must fit the DiT the run will use; without a local DiT that is the hub's
        out[label] = WeightRef(path=chosen[label].path)
    if hash_files:
        record_used(out, refs)
    return out


def record_used(refs: dict[str, WeightRef], asked: dict[str, WeightRef]) -> None:
    """Hash into the lock the models-dir files that ``refs`` uses in place of the ``asked`` hub references."""
    for label, ref in refs.items():
        if ref != asked.get(label) and ref.path is not None:
            record(ref.path)


def _dit_info(path: Path) -> dict | None:
    from ..weights.files import component_folder
    from .dit_loader import DIT_PATTERNS

    try:
        found = _as_dit(path, read_header(component_folder(path, "transformer"), DIT_PATTERNS))
    except WeightsError:
        return None
    return found.info if found else None


def local_refs(preset, fast_decode: bool = False, hash_files: bool = True) -> dict[str, WeightRef]:
    """A preset's weight references with the models dirs' files in place of missing hub ones."""
    cards = [*preset.backbone.merge, *([preset.effect] if preset.effect else [])]
    return with_local(preset.backbone, preset.weights(fast_decode), cards, hash_files)


__all__ = ["Found", "choose", "identify", "local_refs", "models_dirs", "record", "record_used", "remember", "scan", "with_local"]
