"""``cine doctor``: what this machine has (versions, devices, codecs, caches, weights) and a full self-test.

The self-test writes the tiny random-weight backbone (cinecli.generate.selftest) into cine's cache and runs the real
pipeline on it — every loader, the sampler, the VAE, the MP4 writer — then decodes the MP4 back and prints the
timing report. It needs no download, so it tells a broken install from missing weights.
"""

from __future__ import annotations

import importlib.metadata as md
import json
import platform
import shlex
import tempfile
from pathlib import Path

from .. import __version__
from ..core import dirs

PACKAGES = ("torch", "transformers", "peft", "safetensors", "huggingface_hub", "av", "pillow", "typer", "rich", "platformdirs")


def environment() -> dict:
    import av
    import torch

    from ..core.devices import native_matmul
    from ..effects.preset import Catalog
    from ..models.attention import backend_for
    from ..run import weights_needed

    versions = {"cine": __version__, "python": platform.python_version()}
    for pkg in PACKAGES:
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    devices = [{"device": "cpu", "name": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                "native_bf16_matmul": native_matmul("cpu", torch.bfloat16)}]
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        prop = torch.cuda.get_device_properties(i)
        devices.append({"device": f"cuda:{i}", "name": prop.name, "memory_bytes": prop.total_memory,
                        "capability": f"{prop.major}.{prop.minor}", "fp8": (prop.major, prop.minor) >= (8, 9)})
    if torch.backends.mps.is_available():
        devices.append({"device": "mps", "name": "Apple MPS"})
    probe = torch.zeros(1, 1, 1, 8)
    catalog = Catalog()
    weights: dict[str, dict] = {}  # one entry per distinct file set, with the effects that use it
    for name in catalog.names():
        for component, w in weights_needed(catalog.resolve(name)).items():
            entry = weights.setdefault(w["ref"], {**w, "component": component, "effects": []})
            entry["effects"].append(name)
    from huggingface_hub import constants

    return {
        "versions": versions,
        "devices": devices,
        "attention_backend": backend_for(probe),
        "codecs": {"libx264": "libx264" in av.codecs_available, "ffmpeg": ".".join(map(str, av.library_versions.get("libavformat", ())))},
        "cache": {"hf_hub_cache": constants.HF_HUB_CACHE, "hf_hub_offline": bool(constants.HF_HUB_OFFLINE),
                  "cine_cache": str(dirs.cache_dir()), "user_presets": str(dirs.config_dir())},
        "weights": weights,
        "preset_problems": catalog.problems,  # user presets skipped: malformed TOML, bad fields
    }


def selftest(device: str = "auto", console=None) -> dict:
    """Run the whole pipeline on the tiny backbone; returns the timing report plus the decoded check."""
    from transformers.utils import logging as hf_logging

    from ..generate.selftest import sample_image, write_backbone
    from ..output.video import read_info
    from ..run import RunOptions, run_one

    hf_logging.disable_progress_bar()
    preset = write_backbone(dirs.cache_dir() / "selftest")
    example_photo = preset.parent / "sample.png"  # kept beside the preset, so the printed example runs as it is
    if not example_photo.exists():
        sample_image().save(example_photo)
    with tempfile.TemporaryDirectory(prefix="cine-doctor-") as tmp:
        photo = Path(tmp) / "photo.png"
        sample_image().save(photo)
        out = Path(tmp) / "selftest.mp4"
        report_file = Path(tmp) / "report.json"
        opts = RunOptions(image=str(photo), output=str(out), preset_file=preset, seed=0, device=device, dtype="fp32",
                          report_file=report_file, quiet=True)
        import contextlib
        import io

        with contextlib.redirect_stdout(io.StringIO()):  # run_one prints the path; doctor prints its own summary
            run_one(opts, console)
        info = read_info(out)
        report = json.loads(report_file.read_text())
    report["decoded"] = {k: info[k] for k in ("frames", "width", "height", "fps", "codec")}
    report["preset"] = str(preset)
    report["example"] = f"cine run {shlex.quote(str(example_photo))} --preset {shlex.quote(str(preset))} -o selftest.mp4"
    return report


def run_doctor(as_json: bool, run_selftest: bool = True, device: str = "auto", console=None) -> int:
    env = environment()
    result = {"environment": env}
    code = 0
    if run_selftest:
        try:
            result["selftest"] = selftest(device, console)
            result["selftest_ok"] = True
        except Exception as exc:  # doctor reports, never crashes
            result["selftest_ok"] = False
            result["selftest_error"] = f"{type(exc).__name__}: {exc}"
            code = 1
    if as_json:
        print(json.dumps(result, indent=2, default=str))
        return code
    lines = ["cine doctor", "  versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)]
    for d in env["devices"]:
        lines.append("  device: " + ", ".join(f"{k}={v}" for k, v in d.items()))
    lines.append(f"  attention: {env['attention_backend']}; libx264: {env['codecs']['libx264']}")
    lines.append(f"  caches: HF {env['cache']['hf_hub_cache']} (offline={env['cache']['hf_hub_offline']}), "
                 f"cine {env['cache']['cine_cache']}, user presets {env['cache']['user_presets']}")
    lines += [f"  skipped user preset {name}: {problem}" for name, problem in env["preset_problems"].items()]
    present = sum(w["present"] for w in env["weights"].values())
    lines.append(f"  weights: {present} of {len(env['weights'])} file sets the presets need are present")
    for ref, w in env["weights"].items():
        lines.append(f"    {'ok     ' if w['present'] else 'missing'} {w['component']:24s} {ref}  ({', '.join(w['effects'])})")
    if run_selftest:
        if result["selftest_ok"]:
            r = result["selftest"]
            lines.append(f"  self-test: ok — {r['decoded']['frames']} frames {r['decoded']['width']}x{r['decoded']['height']} "
                         f"decoded back; total {r['total_s']:.2f} s on {r['device']}")
            lines += [f"    {name:28s} {seconds:8.3f} s" for name, seconds in r["stages"].items()]
            lines += [f"  self-test preset: {r['preset']}", f"  try it: {r['example']}"]
        else:
            lines.append(f"  self-test: FAILED — {result['selftest_error']}")
    print("\n".join(lines))
    return code
