"""Memory at real size: `cine run` end to end on the CPU, RSS sampled per stage, planned vs measured peak.

    .venv/bin/python bench/memory.py                     # 480p (832x480), 49 frames, --quantize hybrid
    .venv/bin/python bench/memory.py --frames 17         # shorter: the VAE and DiT activations scale with frames
    .venv/bin/python bench/memory.py --write-only        # only write the weights

Weights: random, at the real sizes of the Wan2.1-Fun-1.3B-InP stack, written once under $CINE_BENCH_DIR
(default /tmp/cine-bench, ~16 GB) and reused:
  dit/diffusion_pytorch_model.safetensors   1.3B DiT (dim 1536, 30 layers), original Wan keys, bf16 (as Fun-1.3B-InP)
  umt5-xxl-enc-bf16.safetensors             the full umT5-XXL encoder (5.7B), transformers keys, bf16 (ComfyUI layout)
  clip_vision_h.safetensors                 CLIP ViT-H/14 vision tower, transformers keys, bf16 (ComfyUI layout)
  Wan2.1_VAE.pth                            the Wan VAE, original keys, fp32 weights-only pickle
  tokenizer/                                the self-test word tokenizer (the real umT5 one cannot be downloaded)
The Fun repo ships the encoders as .pth pickles; safetensors is used here so 11 GB can be written one tensor at a
time. Both load memory-mapped.

Run: (1) `import torch, cinecli` alone (the baseline RSS); (2) the prompt is encoded into a private prompt cache
in its own process (stages "load text_encoder", "text encode"); (3) `cine run` with the prompt cached. The parent
samples /proc/PID/status (VmRSS, RssAnon, RssFile) every 50 ms; the child logs stage starts/ends
(CINE_STAGE_LOG, timing.py), so every sample lands in a stage. Planned numbers come from
`cine run … --dry-run --json` → plan.stages (n/a where the run has no plan yet).
Target (issue 9): the cached-prompt run adds at most 1.8 GB RSS over the baseline; the plan within 15% per stage.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(os.environ.get("CINE_BENCH_DIR", "/tmp/cine-bench"))
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GB = 1e9
PROMPT = "the camera orbits around the frozen subject, cinematic"



# --- random weights at real sizes, written one chunk at a time -------------------------------------------------------
class _Noise:
    """A pool of N(0, 1) values reused at moving offsets: fast to write gigabytes, and no two layers are equal."""

    def __init__(self, n: int = 1 << 24, seed: int = 0):
        self.pool = torch.randn(n, generator=torch.Generator().manual_seed(seed))
        self.pos = 0

    def take(self, n: int) -> torch.Tensor:
        if self.pos + n > self.pool.numel():
            self.pos = (self.pos * 7919 + 1) % (self.pool.numel() // 2)
        out = self.pool[self.pos:self.pos + n]
        self.pos += n
        return out


def _values(name: str, shape: tuple[int, ...], noise: _Noise, start: int, n: int) -> torch.Tensor:
    """Flat values [start, start+n) of tensor ``name``: norms near 1, projections ~ N(0, 1/fan_in), the rest small."""
    x = noise.take(n)
    if "norm" in name or name.endswith("gamma"):
        return 1 + 0.05 * x
    if len(shape) >= 2 and "modulation" not in name:
        fan_in = max(1, int(torch.tensor(shape[1:]).prod()))
        return x / fan_in**0.5
    return 0.02 * x


def write_random(path: Path, specs: dict[str, tuple[tuple[int, ...], torch.dtype]], seed: int) -> None:
    """A safetensors file of random tensors, streamed: memory stays at one 4M-element chunk."""
    from cinecli.weights.files import write_safetensors

    def pieces():
        noise = _Noise(seed=seed)
        for key, (shape, dtype) in specs.items():
            total, chunk = int(torch.Size(shape).numel()), 1 << 22
            for s in range(0, total, chunk):
                yield _values(key, shape, noise, s, min(chunk, total - s)).to(dtype)

    write_safetensors(path, specs, pieces(), {"format": "pt"})


def _meta_specs(factory, dtype: torch.dtype, skip: tuple[str, ...] = ()) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    with torch.device("meta"):
        model = factory()
    return {k: (tuple(v.shape), dtype) for k, v in model.state_dict().items() if not k.startswith(skip)}


def write_weights(root: Path = ROOT) -> Path:
    """The 1.3B stack at real size under ``root`` (each file written once). Returns the preset file."""
    from transformers import CLIPVisionModel, UMT5EncoderModel

    from cinecli.generate.selftest import sample_image, write_tokenizer
    from cinecli.models.image_encoder import IMAGE_ENCODER_CONFIGS
    from cinecli.models.text_encoder import TEXT_ENCODER_CONFIGS
    from cinecli.models.wan_dit import DIT_CONFIGS, WanDiT
    from cinecli.models.wan_vae import WanVAE

    root.mkdir(parents=True, exist_ok=True)
    (root / "dit").mkdir(exist_ok=True)
    jobs = [
        (root / "dit" / "diffusion_pytorch_model.safetensors",
         lambda: _meta_specs(lambda: WanDiT(DIT_CONFIGS["wan2.1-fun-1.3b-inp"]), torch.bfloat16)),
        (root / "umt5-xxl-enc-bf16.safetensors",
         lambda: _meta_specs(lambda: UMT5EncoderModel(TEXT_ENCODER_CONFIGS["umt5-xxl"].to_hf()), torch.bfloat16,
                             skip=("encoder.embed_tokens",))),  # tied to shared.weight: stored once
        (root / "clip_vision_h.safetensors",
         lambda: _meta_specs(lambda: CLIPVisionModel(IMAGE_ENCODER_CONFIGS["vit-h-14"].to_hf()), torch.bfloat16)),
    ]
    for seed, (path, specs) in enumerate(jobs):
        if not path.exists():
            t0 = time.time()
            write_random(path, specs(), seed)
            print(f"wrote {path} ({path.stat().st_size / GB:.2f} GB, {time.time() - t0:.0f} s)", file=sys.stderr)
    vae = root / "Wan2.1_VAE.pth"
    if not vae.exists():
        model, noise = WanVAE(), _Noise(seed=9)
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(_values(name, tuple(p.shape), noise, 0, p.numel()).view(p.shape))
        torch.save(model.state_dict(), vae.with_suffix(".tmp"))
        vae.with_suffix(".tmp").replace(vae)
    if not (root / "tokenizer").exists():
        write_tokenizer(root / "tokenizer")
    photo = root / "photo-832x480.png"
    if not photo.exists():
        sample_image(832, 480).save(photo)
    preset = root / "bench.toml"
    preset.write_text(
        'name = "bench-1.3b"\ndescription = "random weights at the real sizes of Wan2.1-Fun-1.3B-InP (bench/memory.py)"\n'
        f'prompt = "{PROMPT}"\nframes = 49\nfps = 16\nmax_area = 399360\n\n'
        '[backbone]\nname = "bench-fun-1.3b"\nmodel_type = "i2v"\nsupports_last_frame = true\n'
        'dit = { path = "dit" }\nvae = { path = "Wan2.1_VAE.pth" }\n'
        'text_encoder = { path = "umt5-xxl-enc-bf16.safetensors" }\ntokenizer = { path = "tokenizer" }\n'
        'image_encoder = { path = "clip_vision_h.safetensors" }\n'
        'sampler = { kind = "distill", timesteps = [1000, 750, 500, 250], shift = 5.0 }\n')
    return preset


# --- measuring a child process ---------------------------------------------------------------------------------------
def _status(pid: int) -> tuple[int, int, int] | None:
    """(VmRSS, RssAnon, RssFile) in bytes of a live process."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "RssAnon", "RssFile")))
    except (OSError, ValueError):
        return None
    kb = lambda k: int(fields.get(k, "0 kB").split()[0]) * 1024  # noqa: E731
    return kb("VmRSS"), kb("RssAnon"), kb("RssFile")


def stage_rows(samples: list[tuple[float, int, int, int]], events: list[dict]) -> list[dict]:
    """Samples (t, rss, anon, file) + stage start/end events → one row per stage, in order, and the whole process."""
    rows, open_at = [], {}
    for ev in events:
        if ev["event"] == "start":
            open_at[ev["stage"]] = ev["t"]
            continue
        t0, t1 = open_at.pop(ev["stage"], ev["t"]), ev["t"]
        # a stage shorter than the sampling interval gets the sample nearest its end (if one is that near)
        near = [s for s in samples if abs(s[0] - t1) <= 0.2]
        inside = [s for s in samples if t0 <= s[0] <= t1] or near[:1]
        if not inside:
            rows.append({"stage": ev["stage"], "seconds": t1 - t0, "peak_rss": None, "peak_anon": None,
                         "peak_file": None, "end_rss": None})
            continue
        peak = max(inside, key=lambda s: s[1])
        end = min(near or inside, key=lambda s: abs(s[0] - t1))
        rows.append({"stage": ev["stage"], "seconds": t1 - t0, "peak_rss": peak[1], "peak_anon": peak[2],
                     "peak_file": peak[3], "end_rss": end[1]})
    for stage, t0 in open_at.items():  # still running (a run cut short): peak so far
        inside = [s for s in samples if s[0] >= t0]
        if inside:
            peak = max(inside, key=lambda s: s[1])
            rows.append({"stage": f"{stage} (unfinished)", "seconds": inside[-1][0] - t0, "peak_rss": peak[1],
                         "peak_anon": peak[2], "peak_file": peak[3], "end_rss": inside[-1][1]})
    rows.append({"stage": "(whole process)", "seconds": (samples[-1][0] - samples[0][0]) if samples else 0,
                 "peak_rss": max((s[1] for s in samples), default=0), "peak_anon": max((s[2] for s in samples), default=0),
                 "peak_file": max((s[3] for s in samples), default=0), "end_rss": samples[-1][1] if samples else 0})
    return rows


def _read_jsonl(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def measured(cmd: list[str], env: dict[str, str], log: Path) -> tuple[list[dict], int, str]:
    """Run ``cmd``, sampling its RSS into ``log``.samples; → (per-stage rows in order, exit code, stderr tail)."""
    samples_file = log.with_suffix(".samples")
    for f in (log, samples_file):
        f.unlink(missing_ok=True)
    proc = subprocess.Popen(cmd, env={**env, "CINE_STAGE_LOG": str(log)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(proc.stderr), daemon=True)
    reader.start()
    with open(samples_file, "w") as out:  # on disk as it goes: a run cut short still has its table (--from-logs)
        while proc.poll() is None:
            s = _status(proc.pid)
            if s:
                out.write(json.dumps([time.time(), *s]) + "\n")
            time.sleep(0.05)
    reader.join()
    proc.stdout.read()
    return stage_rows(_read_jsonl(samples_file), _read_jsonl(log)), proc.returncode, "".join(err[-20:])


def baseline_rss(env: dict[str, str]) -> int:
    code = "import torch, cinecli; print(open('/proc/self/status').read())"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    return next(int(line.split()[1]) * 1024 for line in out.splitlines() if line.startswith("VmRSS"))


def encode_prompt_child(preset_file: str) -> None:
    """Child: encode the preset's prompt into the prompt cache with one text-encoder load, under Timings."""
    from cinecli.core.timing import Timings
    from cinecli.effects.preset import Catalog
    from cinecli.generate.pipeline import Generator, Request, final_prompt
    from cinecli.weights.hub import resolve_all

    preset = Catalog(extra_preset=Path(preset_file)).resolve(None)
    paths = resolve_all(preset.weights(), "bench/memory.py")
    gen = Generator(preset.backbone, paths, torch.device("cpu"), torch.bfloat16, timings=Timings())
    gen.encode_prompts([final_prompt(Request(image="-", preset=preset))])


def planned(cine: list[str], env: dict[str, str]) -> dict[str, dict]:
    """stage → {"device_peak_bytes", "host_peak_bytes"} from the dry run's plan, if it has one."""
    out = subprocess.run([*cine, "--dry-run", "--json"], env=env, capture_output=True, text=True)
    try:
        doc = json.loads(out.stdout)
    except json.JSONDecodeError:
        return {}
    return {s["stage"]: s for s in (doc.get("plan") or {}).get("stages", [])} if isinstance(doc.get("plan"), dict) else {}


def _gb(b: float | None) -> str:
    return "n/a" if b is None else f"{b / GB:.2f}"


def print_table(rows: list[dict], plan: dict[str, dict], base: int, label: str) -> None:
    print("\n| stage | s | planned host peak GB | planned device peak GB | measured peak RSS GB | anon GB | file GB | RSS at end GB |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        p = plan.get(r["stage"], {})
        print(f"| {r['stage']} | {r['seconds']:.0f} | {_gb(p.get('host_peak_bytes'))} | {_gb(p.get('device_peak_bytes'))} | "
              f"{_gb(r['peak_rss'])} | {_gb(r['peak_anon'])} | {_gb(r['peak_file'])} | {_gb(r['end_rss'])} |")
    whole = rows[-1]["peak_rss"]
    print(f"\ncached-prompt run: peak {whole / GB:.2f} GB = baseline {base / GB:.2f} GB + {(whole - base) / GB:.2f} GB "
          f"(target: + 1.80 GB); {label}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=49)
    ap.add_argument("--quantize", default="hybrid")
    ap.add_argument("--steps", type=int, help="denoising steps (each step peaks alike: 1 measures the same peak sooner)")
    ap.add_argument("--budget", help="--memory-budget for the run, e.g. 1.85GiB (the 1.8 GB-over-baseline target)")
    ap.add_argument("--write-only", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the table here")
    ap.add_argument("--from-logs", action="store_true",
                    help="print the table of the last run from its logs under $CINE_BENCH_DIR (also a run cut short)")
    ap.add_argument("--samples", type=Path, help="with --from-logs: RSS samples of the run from another sampler")
    ap.add_argument("--child-encode", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_encode:
        return encode_prompt_child(args.child_encode)
    preset = write_weights()
    if args.write_only:
        return
    env = {**os.environ, "CINE_CACHE_DIR": str(ROOT / "cache"), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    base = baseline_rss(env)
    cine = [str(Path(sys.executable).parent / "cine"), "run", str(ROOT / "photo-832x480.png"), "--preset", str(preset),
            "--frames", str(args.frames), "--quantize", args.quantize, "--device", "cpu", "--seed", "0",
            "-o", str(ROOT / f"out-{args.frames}.mp4"), "--overwrite", "-q"]
    cine += ["--steps", str(args.steps)] if args.steps else []
    cine += ["--memory-budget", args.budget] if args.budget else []
    label = f"{args.frames} frames 832x480, --quantize {args.quantize}, steps {args.steps or 'preset'}, budget {args.budget}"
    if args.from_logs:
        plan = planned(cine, env)
        samples = _read_jsonl(args.samples or ROOT / "stages-run.samples")
        rows = stage_rows([tuple(s[:4]) for s in samples], _read_jsonl(ROOT / "stages-run.jsonl"))
        text = stage_rows([tuple(s[:4]) for s in _read_jsonl(ROOT / "stages-text.samples")], _read_jsonl(ROOT / "stages-text.jsonl"))
        return print_table(text[:-1] + rows, plan, base, label + " (from the logs of the last run)")
    print(f"baseline `import torch, cinecli`: {base / GB:.2f} GB RSS; command: {' '.join(cine)}", flush=True)
    text_rows, rc, err = measured([sys.executable, __file__, "--child-encode", str(preset)], env, ROOT / "stages-text.jsonl")
    if rc:
        sys.exit(f"prompt encoding failed ({rc}):\n{err}")
    plan = planned(cine, env)  # after the prompt is cached: the plan of the run below
    print(f"planned: {json.dumps(plan)}", flush=True)
    t0 = time.time()
    rows, rc, err = measured(cine, env, ROOT / "stages-run.jsonl")
    if rc:
        print(f"cine run failed ({rc}) after {time.time() - t0:.0f} s:\n{err}", file=sys.stderr)
    rows = text_rows[:-1] + rows
    print_table(rows, plan, base, f"{label}, exit {rc}")
    if args.json:
        args.json.write_text(json.dumps({"baseline_rss": base, "frames": args.frames, "command": cine, "rows": rows,
                                         "plan": plan, "exit": rc}, indent=1))


if __name__ == "__main__":
    main()
