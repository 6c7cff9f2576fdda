"""``cine quantize SRC -o DST --recipe hybrid``: write a self-describing quantized DiT checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import typer

from ..core.errors import OutputError, UsageError
from .common import handle_errors, stderr_console


def parse_overrides(items: list[str]) -> dict[str, str]:
    out = {}
    for item in items:
        pattern, sep, fmt = item.partition("=")
        if not sep or not pattern or not fmt:
            raise UsageError(f"--override '{item}': expected MODULE_GLOB=FORMAT, e.g. 'blocks.0.*=int8'")
        out[pattern] = fmt
    return out


def pipeline_psnr(reference, quantized, vae, seed: int = 0, frames: int = 9, size: int = 64) -> float:
    """PSNR (dB) of decoded frames: a fixed 4-step run of ``quantized`` against the same run of ``reference``.

    Fixed synthetic conditioning (text states, CLIP features, first-frame latent) from a seeded generator, so the
    number depends only on the weights.
    """
    import torch

    from ..effects.preset import SamplerSpec
    from ..generate.pipeline import condition_mask
    from ..generate.sampler import sample

    cfg = reference.config
    g = torch.Generator().manual_seed(seed)
    lat = (16, 1 + (frames - 1) // 4, size // 8, size // 8)
    context = torch.randn(1, 16, cfg.text_dim, generator=g)
    clip = torch.randn(1, 514 if cfg.model_type == "flf2v" else 257, cfg.image_dim, generator=g) if cfg.has_image_input else None
    y = torch.cat([condition_mask(frames, lat[2], lat[3], False)[None], torch.randn(1, *lat, generator=g)], 1) if cfg.has_latent_input else None
    videos = []
    for model in (reference, quantized):
        with torch.no_grad():
            ctx = model.prepare_context(context, clip)
            latents = sample(lambda x, t, cond: model(x, t, ctx, y=y), SamplerSpec(), (1, *lat), torch.Generator().manual_seed(seed),
                             torch.device("cpu"))
            videos.append(vae.decode(latents).float().clamp(-1, 1))
    mse = ((videos[0] - videos[1]) / 2).pow(2).mean().item()  # frames in [0, 1]
    return float("inf") if mse == 0 else 10 * math.log10(1.0 / mse)


def _find_vae(src: Path) -> Path | None:
    for folder in (src if src.is_dir() else src.parent, (src if src.is_dir() else src.parent).parent):
        for name in ("Wan2.1_VAE.pth", "wan_2.1_vae.safetensors", "vae"):
            if (folder / name).exists():
                return folder / name
    return None


@handle_errors
def quantize(
    src: Path = typer.Argument(..., help="DiT weights in any layout load_dit accepts."),
    output: Path = typer.Option(..., "-o", "--output", help="The quantized .safetensors file to write."),
    recipe: str = typer.Option("hybrid", "--recipe", help="hybrid, compact, fp8, int8 or none."),
    override: list[str] = typer.Option([], "--override", help="MODULE_GLOB=FORMAT, first match wins (e.g. 'blocks.0.*=int8')."),
    check: bool = typer.Option(False, "--check", help="Compare a fixed 4-step run against the bf16 model: PSNR of decoded frames."),
    vae: Optional[Path] = typer.Option(None, "--vae", help="VAE for --check (default: Wan2.1_VAE.pth next to SRC)."),
    as_json: bool = typer.Option(False, "--json", help="JSON report on stdout."),
    overwrite: bool = typer.Option(False, "--overwrite"),
    debug: bool = typer.Option(False, "--debug"),
) -> None:
    """Quantize a DiT (weights only: FP8/INT8 per channel, INT4 per group of 64) into one self-describing file."""
    import copy

    from ..models import load_dit
    from ..models.recipes import check_overrides, get_recipe, quantize_dit, write_quantized
    from ..output.video import check_writable

    if output.suffix != ".safetensors":
        raise UsageError("-o must name a .safetensors file")
    check_writable(output, overwrite)
    the_recipe = get_recipe(recipe, parse_overrides(override))
    vae_path = vae or (_find_vae(src) if check else None)
    if check and vae_path is None:
        raise UsageError("--check needs a VAE: pass --vae PATH")
    console = stderr_console(quiet=as_json)
    model = load_dit(src, device="cpu", dtype="bf16")
    if model.quant_layers:
        raise UsageError(f"{src} is already quantized ({model.quant_recipe}); quantize the bf16/fp16 original")
    bytes_before = sum(p.numel() for p in model.parameters()) * 2  # as a bf16 checkpoint
    reference = copy.deepcopy(model) if check else None
    check_overrides(the_recipe, model)
    layers = quantize_dit(model, the_recipe, measure=True)
    try:
        bytes_after = write_quantized(model, output)
    except OSError as exc:
        raise OutputError(f"cannot write {output}: {exc.strerror or exc}") from None
    by_format: dict[str, list[float]] = {}
    for info in layers.values():
        by_format.setdefault(info["format"], []).append(info["rel_rms_error"])
    doc = {
        "output": str(output), "recipe": the_recipe.name, "overrides": the_recipe.overrides, "layers": len(layers),
        "bytes_before": bytes_before, "bytes_after": bytes_after, "file_bytes": output.stat().st_size,
        "ratio": round(bytes_after / bytes_before, 4),
        "error_by_format": {f: {"layers": len(e), "mean_rel_rms": sum(e) / len(e), "max_rel_rms": max(e)} for f, e in by_format.items()},
        "per_layer": layers,
    }
    if check:
        from ..models.vae_loader import load_vae

        quantized = load_dit(output, device="cpu", dtype="bf16")
        doc["check_psnr_db"] = pipeline_psnr(reference, quantized, load_vae(vae_path))
    if as_json:
        print(json.dumps(doc, indent=2))
        return
    console.print(f"{the_recipe.name}: {len(layers)} layers quantized, {bytes_before / 1e9:.3f} GB → {bytes_after / 1e9:.3f} GB "
                  f"({doc['ratio']:.1%})", highlight=False)
    for fmt, e in doc["error_by_format"].items():
        console.print(f"  {fmt:8s} {e['layers']:4d} layers  relative RMS error mean {e['mean_rel_rms']:.2%} max {e['max_rel_rms']:.2%}", highlight=False)
    if check:
        console.print(f"  --check: PSNR of decoded frames vs bf16: {doc['check_psnr_db']:.2f} dB", highlight=False)
    print(output)
