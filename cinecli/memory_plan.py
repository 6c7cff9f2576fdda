"""One memory plan: where every component of a run lives, decided before anything is downloaded or loaded.

Inputs are two plain records: what the machine has (``Machine``: free device memory, available host RAM, an
optional budget) and what the job needs (``Job``: the DiT config, component sizes, frames and frame size).
``make_plan`` tries the choices in order of preference and returns the first plan whose every stage fits:

  quantization  the least lossy recipe that fits, starting at the backbone's (none → fp8 → hybrid → compact);
                a recipe the user pinned (or a pre-quantized checkpoint) is kept as it is
  DiT           resident on the device, else streamed block by block (the device holds two blocks)
  text encoder  not loaded on a prompt-cache hit, else on the device, else on the CPU
  VAE           whole frames, else spatial tiles of ``VAE_TILE`` pixels ("vae_decode": "tiled" tiles the
                conditioning encode too)

Estimates follow the model code (see ``dit_step_bytes``, ``vae_encode_bytes``, ``vae_decode_bytes``): the
constants are live-tensor peaks traced through the real modules on the ``meta`` device at real widths (one
denoising step of WanDiT, the chunked Wan VAE), so they track tokens, frame size and frame count; weight bytes
per recipe are counted layer by layer from a meta-device DiT (memory_inputs.py). On the CPU the device *is* host
RAM, so a stage's ``device_peak_bytes`` and ``host_peak_bytes`` are the same number there, except that pages of a
memory-mapped source file (the 16-bit DiT while the first run converts it) count as host only: the OS reclaims them.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from .pipeline import VAE_TILE  # the pipeline's tile side: a tiled VAE never works on more than VAE_TILE² pixels
from .report import human_bytes as human

LADDER = ("none", "fp8", "hybrid", "compact")  # least lossy first
TEXT_ROWS = 128  # text rows assumed in the per-video cross-attention keys/values (prompts are shorter; 512 max)
GiB = 1 << 30

# Live-tensor peak of one denoising step, in bytes per (token × model width): traced with cinecli.models.wan_dit
# on meta tensors (attention as a flash/memory-efficient kernel, O(L) memory) for the 1.3B and 14B widths and
# 7.8k-75k tokens: 26.3 with 16-bit activations, 32.5 with fp32 activations (CPUs without native bf16). The fp32
# residual stream, fp32 RoPE'd q/k next to their 16-bit copies, v and the attention output make it up.
DIT_STEP_PER_TOKEN_DIM = {2: 26.3, 4: 32.5}
# Wan VAE (fp32), live-tensor peak per output pixel of one frame, traced the same way: the chunk working set at
# full resolution (96 channels × 4 frames through a causal ResidualBlock) plus every cached conv's 2-frame context;
# the clip itself (3 × T × 4 bytes per pixel) comes on top. Independent of T otherwise: the VAE works chunk by chunk.
VAE_ENCODE_PER_PIXEL = 14_070
VAE_DECODE_PER_PIXEL = 16_450
# Allocator and conv-kernel workspace the trace cannot see: the issue 9 table measured the VAE's anonymous RSS at
# 624x624 about 1.25x the traced live peak on a CPU (before the VAE's in-place norms; bench/memory.py re-measures);
# the DiT step runs a little over its trace.
VAE_SLACK = 1.25
DIT_SLACK = 1.1
TEXT_ENCODE_BYTES = 512 << 20  # umT5 activations for one 512-token prompt (64 heads × 512² fp32 bias and scores)
IMAGE_ENCODE_BYTES = 256 << 20  # CLIP ViT-H on 257 tokens


@dataclass(frozen=True)
class Machine:
    device: str  # "cuda" | "mps" | "cpu"
    device_bytes: int  # what the device can still give (CPU: host RAM)
    host_bytes: int  # available host RAM
    budget: int | None = None  # --memory-budget / CINE_MEMORY_BUDGET: caps the device (and host RAM on the CPU)

    @property
    def device_cap(self) -> int:
        return min(self.device_bytes, self.budget) if self.budget else self.device_bytes

    @property
    def host_cap(self) -> int:
        return min(self.host_bytes, self.budget) if self.budget and self.device != "cuda" else self.host_bytes


@dataclass(frozen=True)
class DiTSizes:
    """Bytes of one DiT at one recipe: everything outside the blocks, and the largest block."""

    total: int
    outside_blocks: int
    block: int
    layers: int
    dim: int

    @property
    def streamed(self) -> int:
        return self.outside_blocks + 2 * self.block  # double buffering: the block in use and the next one


@dataclass(frozen=True)
class Job:
    dit: dict[str, DiTSizes]  # recipe → sizes ("prequantized" alone for a checkpoint that comes quantized)
    frames: int
    width: int
    height: int
    steps: int
    text_encoder_bytes: int
    image_encoder_bytes: int
    vae_bytes: int
    act_bytes: int = 2  # activation element size: 2, or 4 on CPUs that emulate bf16
    default_recipe: str = "none"  # the backbone's recipe: where the ladder starts
    pinned_recipe: str | None = None  # --quantize, or "prequantized"
    prompt_cached: bool = False
    effect_bytes: int = 0  # unmerged effect LoRA (peft) weights
    fast_decode: bool = False
    tiny_vae_bytes: int = 0
    dit_source_bytes: int = 0  # a 16-bit checkpoint quantized at load: mapped while the first run converts it
    quant_cached: frozenset[str] = frozenset()  # recipes whose converted file is already in cine's cache
    offload: str = "auto"  # --offload: auto (the plan chooses), none (DiT resident), blocks (streamed)

    @property
    def tokens(self) -> int:
        return (1 + (self.frames - 1) // 4) * (self.height // 16) * (self.width // 16)


@dataclass
class Stage:
    stage: str  # a Timings stage name of the pipeline
    device_peak_bytes: int
    host_peak_bytes: int
    mapped_bytes: int = 0  # of host_peak: pages of a memory-mapped source file, which the OS can reclaim

    def need(self, device: bool) -> int:
        """What must fit: the peak less reclaimable mapped pages (counted wherever host RAM is the pool)."""
        return self.device_peak_bytes if device else self.host_peak_bytes - self.mapped_bytes


@dataclass
class MemoryPlan:
    dit: str  # "resident" | "streamed"
    quantize: str  # recipe name, "prequantized" or "none"
    text_encoder: str  # "device" | "cpu" | "cached"
    vae_decode: str  # "whole" | "tiled"
    stages: list[Stage] = field(default_factory=list)
    device: str = "cpu"
    dit_bytes: int = 0  # the DiT's weights at the chosen recipe

    def peak(self, which: str = "device_peak_bytes") -> int:
        return max((getattr(s, which) for s in self.stages), default=0)

    def to_json(self) -> dict:
        return {"dit": self.dit, "quantize": self.quantize, "text_encoder": self.text_encoder, "vae_decode": self.vae_decode,
                "stages": [{k: v for k, v in asdict(s).items() if k != "mapped_bytes"} for s in self.stages]}


class NoFit(Exception):
    """No plan fits: ``needed`` is the smallest peak of any plan (what a budget would have to allow)."""

    def __init__(self, needed: int, stage: str):
        super().__init__(stage)
        self.needed, self.stage = needed, stage


# --- estimates (bytes) -----------------------------------------------------------------------------------------------
def dit_step_bytes(job: Job, dim: int, layers: int) -> int:
    """One denoising step's activations plus the per-video context (every block's cross-attention keys/values)."""
    act = DIT_STEP_PER_TOKEN_DIM[job.act_bytes] * job.tokens * dim * DIT_SLACK
    kv = layers * (TEXT_ROWS + 257) * dim * 2 * 2  # k and v, 16-bit, text + image rows
    latents = 8 * 36 * job.tokens * 4 * 4  # x ‖ y, noise, velocity, fp32 at latent size (tokens × 4 pixels)
    return int(act + kv + latents)


def vae_encode_bytes(job: Job, tiled: bool) -> int:
    pixels = job.width * job.height
    work = min(pixels, VAE_TILE * VAE_TILE) if tiled else pixels
    return int(work * VAE_ENCODE_PER_PIXEL * VAE_SLACK + 12 * job.frames * pixels)  # + the conditioning clip


def vae_decode_bytes(job: Job, tiled: bool) -> int:
    pixels = job.width * job.height
    work = min(pixels, VAE_TILE * VAE_TILE) if tiled else pixels
    out = 12 * job.frames * pixels * (2 if tiled else 1)  # the clip (+ the blend accumulator when tiled)
    return int(work * VAE_DECODE_PER_PIXEL * VAE_SLACK + out)


def tiny_decode_bytes(job: Job) -> int:
    return int(job.width * job.height * 4 * 64 * 4 * 3 + 12 * job.frames * job.width * job.height)  # 64 ch, 4 frames


# --- the plan --------------------------------------------------------------------------------------------------------
def _stages(job: Job, m: Machine, recipe: str, streamed: bool, text: str, tiled: bool) -> list[Stage]:
    """Per-stage peaks for one set of choices, in pipeline order (names as Timings records them)."""
    on_cpu = m.device == "cpu"
    sizes = job.dit[recipe]
    dit_dev = sizes.streamed if streamed else sizes.total
    dit_host = 0 if on_cpu or not streamed else sizes.total  # streamed blocks wait in pinned host memory
    resident = job.image_encoder_bytes + job.vae_bytes + job.effect_bytes + (job.tiny_vae_bytes if job.fast_decode else 0)
    out: list[Stage] = []

    def add(name: str, dev: int, host: int, mapped: int = 0) -> None:
        if on_cpu:  # one pool: the device is host RAM
            out.append(Stage(name, int(dev + host - mapped), int(dev + host), int(mapped)))
        else:
            out.append(Stage(name, int(dev), int(host), int(mapped)))

    if text != "cached":
        t = job.text_encoder_bytes + TEXT_ENCODE_BYTES
        add("text encode", t if text == "device" else 0, t if text == "cpu" else 0)
    if recipe in ("none", "prequantized") or recipe in job.quant_cached:
        add("load dit", dit_dev, dit_host)
    else:  # first run: the 16-bit source is mapped while the quantized copy is built on the host, then written
        add("load dit", 0 if on_cpu else dit_dev, sizes.total + job.dit_source_bytes, mapped=job.dit_source_bytes)
    add("image encode", dit_dev + resident + IMAGE_ENCODE_BYTES, dit_host)
    add("vae encode", dit_dev + resident + vae_encode_bytes(job, tiled), dit_host)
    step = dit_step_bytes(job, sizes.dim, sizes.layers)
    for i in range(job.steps):
        add(f"denoise step {i + 1}/{job.steps}", dit_dev + resident + step, dit_host)
    if job.fast_decode:
        add("vae decode (tiny)", dit_dev + resident + tiny_decode_bytes(job), dit_host)
    else:
        add("vae decode", dit_dev + resident + vae_decode_bytes(job, tiled), dit_host)
    return out


def _needs(stages: list[Stage], m: Machine) -> tuple[int, int]:
    """(device, host) bytes the stages need at their peaks."""
    dev = max(s.need(device=True) for s in stages)
    host = max(s.need(device=False) + (s.device_peak_bytes if m.device == "mps" else 0) for s in stages)  # MPS: unified
    return dev, host


def _fits(stages: list[Stage], m: Machine) -> bool:
    dev, host = _needs(stages, m)
    return dev <= m.device_cap and host <= m.host_cap


def candidates(job: Job) -> list[tuple[str, bool]]:
    """(recipe, streamed) in order of preference: quality first (the least lossy recipe, resident, then streamed:
    streaming costs speed, never quality)."""
    if job.pinned_recipe is not None:
        recipes = [job.pinned_recipe]
    else:
        start = LADDER.index(job.default_recipe) if job.default_recipe in LADDER else 0
        recipes = [r for r in LADDER[start:] if r in job.dit]
    modes = {"none": (False,), "blocks": (True,)}.get(job.offload, (False, True))
    return [(r, streamed) for r in recipes for streamed in modes]


def make_plan(job: Job, m: Machine) -> MemoryPlan:
    """The first set of choices (see module doc) whose every stage fits; ``NoFit`` when none does."""
    texts = ["cached"] if job.prompt_cached else ["device", "cpu"] if m.device != "cpu" else ["cpu"]
    best: tuple[int, str] | None = None
    for recipe, streamed in candidates(job):
        for tiled in (False, True):
            for text in texts:
                stages = _stages(job, m, recipe, streamed, text, tiled)
                if _fits(stages, m):
                    return MemoryPlan("streamed" if streamed else "resident", recipe, text, "tiled" if tiled else "whole",
                                      stages, m.device, job.dit[recipe].total)
                dev, host = _needs(stages, m)
                short_on_device = dev > m.device_cap
                need = dev if short_on_device else host
                worst = max(stages, key=lambda s: s.need(device=short_on_device)).stage
                if best is None or need < best[0]:
                    best = (need, worst)
    assert best is not None
    raise NoFit(*best)


def advice(job: Job, m: Machine, err: NoFit) -> str:
    """One line: what does not fit, and what would (fewer frames, a smaller size, --fast-decode, a budget)."""
    where = f"{m.device} ({human(m.device_cap)} usable{', budget ' + human(m.budget) if m.budget else ''})"
    ways = []
    for frames in range(job.frames - 4, 0, -4):
        if _plans(replace(job, frames=frames), m):
            ways.append(f"--frames {frames}")
            break
    for scale in (0.75, 0.5, 0.35, 0.25):
        w, h = int(job.width * scale) // 16 * 16, int(job.height * scale) // 16 * 16
        if w and h and _plans(replace(job, width=w, height=h), m):
            ways.append(f"a smaller size ({w}x{h}, max_area {w * h} in a preset)")
            break
    if not job.fast_decode and job.tiny_vae_bytes and _plans(replace(job, fast_decode=True), m):
        ways.append("--fast-decode")
    ways.append(f"--memory-budget {human(math.ceil(err.needed / GiB * 10) / 10 * GiB)} on a machine that has it")
    return f"this job does not fit on {where}: {err.stage} needs {human(err.needed)}; it would fit with " + ", or ".join(ways)


def _plans(job: Job, m: Machine) -> bool:
    try:
        make_plan(job, m)
        return True
    except NoFit:
        return False
