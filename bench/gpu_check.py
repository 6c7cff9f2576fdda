"""The one-call GPU acceptance run (issue 21): everything cine claims for CUDA, measured on a real card in ~8 minutes.

    python bench/gpu_check.py --json $OUT/gpu_check.json          # on an H100/H200 (the device tool), all parts
    python bench/gpu_check.py --only pipeline stages --device cpu --smoke   # the logic on a CPU (tiny sizes)

Parts (each in its own subprocess where its memory figures must be its own; a failed part is recorded, the rest run):
  pipeline  the tiny self-test pipeline on CUDA, DiT resident and streamed (--offload none|blocks): the frames must
            be bit-identical (streaming moves weights, never changes numbers).
  caps      bench/gpu_caps.py: the 14B-shaped random hybrid DiT at 480p × 49 frames under 8/12/16/24 GB caps
            (set_per_process_memory_fraction), the plan choosing resident or streamed and the chunking; one step's
            max_memory_reserved against the plan.
  stages    per cap, the other device stages the plan puts on the card, at real size with random weights, each
            measured by max_memory_reserved against the plan's stage peak: the umT5-XXL text encode (when the plan
            puts it on the device) and the Wan VAE decode (whole or in the planned tiles), next to a placeholder
            for what the plan keeps resident beside them.
  speed     bench/dit_step.py: s/step of cine against diffusers' bf16 on the same random weights, 1.3B and 14B width
            (4 blocks of each, 81 frames 480p = 21,840 tokens), cine in bf16 and hybrid, with the kernels one step
            launches (torch.profiler).

Nothing here has run on a GPU yet: the sessions so far had none; `--device cpu --smoke` checks the logic.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from cinecli.core.sizes import human_bytes  # noqa: E402
from cinecli.plan.memory import GiB, Machine, NoFit, make_plan, vae_decode_bytes  # noqa: E402

PARTS = ("pipeline", "caps", "stages", "speed")
RESERVED = 0.4 * GiB  # a real card's driver and display (bench/gpu_caps.py)


def run(cmd: list[str], timeout: int) -> tuple[int, str, str]:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return res.returncode, res.stdout, res.stderr
    except subprocess.TimeoutExpired:
        return 124, "", f"timed out after {timeout} s"


# --- pipeline: resident and streamed give the same frames ----------------------------------------------------------
def part_pipeline(args) -> dict:
    import av
    import numpy as np

    from cinecli.generate.selftest import sample_image, write_backbone

    work = args.cache / "pipeline"
    preset = write_backbone(work / "selftest")
    sample_image(96, 64).save(work / "photo.png")
    frames = {}
    for offload in ("none", "blocks"):
        out = work / f"{offload}.mp4"
        code, _, err = run([sys.executable, "-m", "cinecli", "run", str(work / "photo.png"), "--preset", str(preset),
                            "-o", str(out), "--overwrite", "--seed", "7", "-q", "--device", args.device, "--offload",
                            offload, "--quantize", "hybrid"], 300)
        if code:
            return {"ok": False, "error": f"--offload {offload}: {err.strip().splitlines()[-1:]}"}
        with av.open(str(out)) as c:
            frames[offload] = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    same = bool(np.array_equal(frames["none"], frames["blocks"]))
    return {"ok": same, "bit_identical": same, "frames": int(frames["none"].shape[0])}


# --- caps: the DiT step under emulated cards (bench/gpu_caps.py) -------------------------------------------------
def part_caps(args) -> dict:
    out = args.cache / "caps.json"
    cmd = [sys.executable, str(ROOT / "bench" / "gpu_caps.py"), "--caps", *map(str, args.caps), "--json", str(out),
           "--device", args.device, "--cache", str(args.cache / "caps")]
    if args.smoke:
        cmd += ["--config", "tiny-i2v", "--frames", "5", "--size", "64x64", "--steps", "1"]
    code, stdout, err = run(cmd, 420)
    rows = json.loads(out.read_text()) if out.is_file() else []
    return {"ok": code == 0 and all(r.get("finished") for r in rows), "rows": rows, "table": stdout,
            "error": err.strip().splitlines()[-1:] if code else None}


# --- stages: text encoder and VAE decode against the plan, per cap ------------------------------------------------
def job(smoke: bool):
    from cinecli.plan.inputs import dit_sizes, image_encoder_params, text_encoder_params, vae_params
    from cinecli.plan.memory import Job

    frames, w, h = (5, 64, 64) if smoke else (49, 832, 480)
    scale = 1e-3 if smoke else 1  # smoke: encoders of a few MB, as the tiny configs the run builds
    return Job(dit={"hybrid": dit_sizes("tiny-i2v" if smoke else "wan2.1-i2v-14b")["hybrid"]}, frames=frames, width=w,
               height=h, steps=4, text_encoder_bytes=int(text_encoder_params(None) * 2 * scale),
               image_encoder_bytes=int(image_encoder_params(None) * 2 * scale), vae_bytes=int(vae_params(None) * 4 * scale),
               pinned_recipe="hybrid", quant_cached=frozenset({"hybrid"}))


def random_(module: torch.nn.Module, device) -> torch.nn.Module:
    module = module.to_empty(device=device)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 1 / max(1, p[0].numel()) ** 0.5 if p.ndim > 1 else 0.02)
    return module.eval()


def measure(device, fn) -> int:
    """max_memory_reserved over ``fn`` (CUDA), else the RSS peak."""
    from cinecli.core.timing import RssSampler

    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_reserved(device)
    with torch.no_grad(), RssSampler() as rss:
        fn()
    return rss.peak


def child_stages(args) -> dict:
    """One cap: the plan for the 14B hybrid job (prompt not cached), then its text encode and VAE decode."""
    from cinecli.core.devices import choose_device
    from cinecli.models.text_encoder import TEXT_ENCODER_CONFIGS
    from cinecli.models.wan_vae import VAE_CONFIGS, WanVAE

    device = choose_device(args.device)
    cuda = device.type == "cuda"
    total = torch.cuda.get_device_properties(device).total_memory if cuda else 64 * GiB
    cap = int(args.child * GiB - (RESERVED if cuda else 0))
    if cuda:
        torch.cuda.set_per_process_memory_fraction(cap / total, device)
    the_job = job(args.smoke)
    try:
        plan = make_plan(the_job, Machine(device.type, cap, 64 * GiB))
    except NoFit as err:
        return {"cap_gb": args.child, "plan": None, "error": f"no plan: {err.stage} needs {human_bytes(err.needed)}"}
    stages = {s.stage: s.device_peak_bytes for s in plan.stages}
    out = {"cap_gb": args.child, "plan": plan.to_json(), "measured": {}, "planned": {}}
    if plan.text_encoder == "device":
        from transformers import UMT5EncoderModel

        cfg = TEXT_ENCODER_CONFIGS["tiny" if args.smoke else "umt5-xxl"].to_hf()
        with torch.device("meta"):
            enc = UMT5EncoderModel(cfg).to(torch.bfloat16)
        enc = random_(enc, device)
        ids = torch.randint(0, cfg.vocab_size, (1, 512), device=device)
        out["measured"]["text encode"] = measure(device, lambda: enc(input_ids=ids))
        out["planned"]["text encode"] = stages["text encode"]
        del enc
    with torch.device("meta"):
        vae = WanVAE(VAE_CONFIGS["tiny" if args.smoke else "wan2.1"])
    vae = random_(vae, device)
    keep = stages["vae decode"] - vae_decode_bytes(the_job, plan.vae_tile, device.type)  # what stays beside it
    placeholder = torch.empty(max(0, keep - torch.cuda.memory_allocated(device)) if cuda else 0, dtype=torch.uint8,
                              device=device)
    latents = torch.randn(1, 16, 1 + (the_job.frames - 1) // 4, the_job.height // 8, the_job.width // 8, device=device)
    t0 = time.perf_counter()
    out["measured"]["vae decode"] = measure(device, lambda: vae.decode(latents, tile_size=plan.vae_tile,
                                                                       dtype=torch.float16))
    out["vae_decode_s"] = time.perf_counter() - t0
    out["planned"]["vae decode"] = stages["vae decode"]
    del placeholder
    return out


def part_stages(args) -> dict:
    rows = []
    for cap in args.caps:
        code, stdout, err = run([sys.executable, __file__, "--child", str(cap), "--device", args.device,
                                 "--cache", str(args.cache), *(["--smoke"] if args.smoke else [])], 300)
        rows.append(json.loads(stdout.strip().splitlines()[-1]) if code == 0 else
                    {"cap_gb": cap, "error": (err.strip().splitlines() or ["?"])[-1]})
    ok = all("error" not in r and all(r["measured"][k] <= r["planned"][k] for k in r["measured"]) for r in rows)
    return {"ok": ok, "rows": rows}


# --- speed: cine against diffusers -------------------------------------------------------------------------------
def part_speed(args) -> dict:
    rows = []
    shapes = [("tiny-i2v", 2, "5", "64", "64")] if args.smoke else \
        [(c, 4, "81", "480", "832") for c in ("wan2.1-fun-1.3b-inp", "wan2.1-i2v-14b")]
    for config, layers, frames, height, width in shapes:
        for recipe in ("none", "hybrid"):
            out = args.cache / f"speed-{config}-{recipe}.json"
            code, stdout, err = run([sys.executable, str(ROOT / "bench" / "dit_step.py"), "--config", config,
                                     "--layers", str(layers), "--frames", frames, "--height", height, "--width", width,
                                     "--device", args.device, "--quantize", recipe, "--steps", "2", "--profile",
                                     "--cache", str(args.cache / "speed"), "--json", str(out)], 400)
            rows.append(json.loads(out.read_text()) | {"recipe": recipe, "table": stdout} if code == 0 else
                        {"config": config, "recipe": recipe, "error": (err.strip().splitlines() or ["?"])[-1]})
    return {"ok": all("error" not in r for r in rows), "rows": rows}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", nargs="+", choices=PARTS, default=list(PARTS))
    p.add_argument("--caps", type=float, nargs="+", default=[8, 12, 16, 24])
    p.add_argument("--device", default="cuda")
    p.add_argument("--smoke", action="store_true", help="tiny sizes: the logic on any device")
    p.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "cine-gpu-check")
    p.add_argument("--json", type=Path)
    p.add_argument("--child", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    if args.child is not None:
        print(json.dumps(child_stages(args)))
        return
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    report = {"device": device, "torch": torch.__version__, "parts": {}}
    for part in args.only:
        t0 = time.perf_counter()
        try:
            result = globals()[f"part_{part}"](args)
        except Exception as exc:  # noqa: BLE001 - one part failing must not lose the others' figures
            result = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        result["seconds"] = round(time.perf_counter() - t0, 1)
        report["parts"][part] = result
        print(f"{part}: {'ok' if result.get('ok') else 'FAILED'} in {result['seconds']} s "
              f"{json.dumps({k: v for k, v in result.items() if k not in ('rows', 'table')})[:300]}", flush=True)
        if result.get("table"):
            print(result["table"], flush=True)
        if args.json:  # after each part: a run cut short keeps what it measured
            args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
