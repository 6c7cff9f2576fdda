"""One memory plan: where every component of a run lives, decided before anything is downloaded or loaded.

Inputs are two plain records: what the machine has (``Machine``: free device memory, available host RAM, an
optional budget) and what the job needs (``Job``: the DiT config, component sizes, frames and frame size).
``make_plan`` tries the choices in order of preference and returns the first plan whose every stage fits:

  quantization  the least lossy recipe that fits, starting at the backbone's (none → fp8 → hybrid → compact);
                a recipe the user pinned (or a pre-quantized checkpoint) is kept as it is
  DiT           resident on the device, else streamed block by block (the device holds two blocks)
  text encoder  not loaded on a prompt-cache hit, else on the device, else on the CPU
  VAE           whole frames, else spatial tiles of the largest side in ``VAE_TILES`` that fits ("vae_decode":
                "tiled", ``vae_tile`` the side; the conditioning encode is tiled alike)

A two-expert backbone (Wan2.2 A14B, ``Job.experts`` 2) runs one expert at a time (models/experts.py), so a step
holds one expert plus the rest, never two: on the CPU the idle expert's pages are dropped; streamed, the device
holds the active expert's two blocks and both experts' small non-block parts, the host both experts' blocks;
resident, one expert is on the device and the idle one waits in host memory until they trade places at the switch.

Estimates follow the model code (see ``dit_step_bytes``, ``vae_encode_bytes``, ``vae_decode_bytes``): the
constants are live-tensor peaks traced through the real modules on the ``meta`` device at real widths (one
denoising step of WanDiT, the chunked Wan VAE), so they track tokens, frame size and frame count; weight bytes
per recipe are counted layer by layer from a meta-device DiT (memory_inputs.py). On the CPU the device *is* host
RAM, so a stage's ``device_peak_bytes`` and ``host_peak_bytes`` are the same number there; and there every
component is a memory-mapped file whose pages leave the process when its stage ends (pipeline.py,
``load.release_pages``), so a CPU stage holds the runtime, its own component and its activations, nothing else:
CLIP for the image encode, the VAE encoder or decoder, the DiT (whole, or one block at a time when streamed).
Host peaks include the process itself (``RUNTIME_BYTES``), so they compare with a measured RSS (bench/memory.py).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from ..core.limits import LIMITS, DeviceLimits
from ..core.sizes import human_bytes as human

HEAD_DIM = 128  # every Wan2.1/2.2 DiT (wan_dit.DiTConfig.head_dim)
TOKEN_CHUNK_ELEMENTS = 1 << 22  # wan_dit.TOKEN_CHUNK_ELEMENTS: the block's default token chunk (tokens × width)
VAE_TILES = (256, 192, 128)  # tile sides the plan may choose, largest (fewest seams, least overlap) first
TILED_COST = 1.5  # a tiled VAE decode takes ~1.5x the untiled one (256-px tiles, 480x832, issue 23): whole frames first
LADDER = ("none", "fp8", "hybrid", "compact")  # least lossy first
TEXT_ROWS = 128  # text rows assumed in the per-video cross-attention keys/values (prompts are shorter; 512 max)
GiB = 1 << 30

# One denoising step (models/wan_dit.Block over token chunks), traced on meta tensors at real widths (1.3B and 14B,
# 7.8k and 20k tokens; tests re-trace it). Attention phase: the fp32 residual stream plus the whole-sequence q, k,
# v, i.e. (4 + 3·act) bytes per token·width, fitted as 11.5 (16-bit) / 17.0 (fp32) plus chunk-sized temporaries.
# FFN phase: the residual stream plus, for quantized or upcast FFN weights, both FFN weights held in the activation
# dtype (layers.weights_held) and the FFN chunk. A step peaks at the larger of the two.
DIT_STEP_PER_TOKEN_DIM = {2: 11.5, 4: 17.0}
DIT_STEP_CHUNKS = {2: 75 << 20, 4: 85 << 20}
DIT_FFN_CHUNK = 150 << 20
# Wan VAE (fp32), live-tensor peak per output pixel of one frame, traced the same way: the chunk working set at
# full resolution (96 channels × 4 frames through a causal ResidualBlock) plus every cached conv's 2-frame context;
# the clip itself (3 × T × 4 bytes per pixel) comes on top. Independent of T otherwise: the VAE works chunk by chunk.
VAE_ENCODE_PER_PIXEL = 14_070
VAE_DECODE_PER_PIXEL = 16_450
VAE_ENCODER_SHARE = 0.4224  # of the Wan VAE's weights: the encoder (+ conv1) 214 MB, the decoder (+ conv2) 293 MB
# Allocator and conv-kernel workspace the trace cannot see (glibc arenas, oneDNN scratch), fitted on the CPU by
# bench/memory.py with the runtime counted apart (RUNTIME_BYTES): 49 frames at 832x464 in 192-px tiles, the tiled
# encode's working set peaked at 1.63x the trace and the decode's at 1.82x. Elsewhere 1.25 (GPUs are unmeasured).
VAE_SLACK = {"cpu": (1.65, 1.85)}  # (encode, decode)
VAE_SLACK_DEFAULT = (1.25, 1.25)
# The DiT step: on the CPU the measured RSS of a 19.6k-token step (1.3B, fp32 activations, streamed, the heap trimmed
# after each block by streaming.PagedBlocks) was the runtime, one block's weights and 1.05x the traced activations;
# 1.1 elsewhere (unmeasured on GPUs).
DIT_SLACK = {"cpu": 1.05}
DIT_SLACK_DEFAULT = 1.1
# The process before any weights: Python, torch, cinecli and the model code it imports (transformers' CLIP and
# umT5 classes, peft: both import torch._dynamo, 0.12 GB on their own). bench/memory.py: a bare `import torch,
# cinecli` is 0.23 GB RSS, a run is 0.38 GB once planned and 0.42 GB with the DiT mapped.
RUNTIME_BYTES = 384 << 20
TEXT_ENCODE_BYTES = 512 << 20  # umT5 activations for one 512-token prompt (64 heads × 512² fp32 bias and scores)
IMAGE_ENCODE_BYTES = 128 << 20  # CLIP ViT-H on 257 tokens (bench/memory.py: 0.05 GB over the loaded weights)
# RIFE (models/rife.py), fp32, per padded pixel of each in-between frame of a batch (output/interpolate.py batches
# up to RIFE_BATCH timesteps of a pair): the full-resolution block's ~90 live channels (its 28-channel input, the
# 13-channel output, both frames, warped frames and features, flow, mask, grid) are 360 bytes; the CPU allocator
# holds about twice that: bench/rife_speed.py --frames 2 (832x480 padded to 832x512, x4 = batches of 3) peaked at
# 1.3 GB RSS, ~1.0 GB over the process and weights, i.e. ~780 bytes per pixel and frame of the batch.
RIFE_PER_PIXEL = 800
RIFE_BATCH = 8
RIFE_WEIGHT_BYTES = 22_659_104  # IFNet v4.26's fp32 parameters (the file adds training-only modules, not loaded)


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
    ffn_dim: int = 0  # the FFN width (a step holds both FFN weights in the activation dtype); 0 when unknown

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
    weight_bytes: int = 2  # element size of unquantized weights (--dtype)
    default_recipe: str = "none"  # the backbone's recipe: where the ladder starts
    pinned_recipe: str | None = None  # --quantize, or "prequantized"
    prompt_cached: bool = False
    effect_bytes: int = 0  # unmerged effect LoRA (peft) weights
    fast_decode: bool = False
    tiny_vae_bytes: int = 0
    quant_cached: frozenset[str] = frozenset()  # recipes whose converted file is already in cine's cache
    offload: str = "auto"  # --offload: auto (the plan chooses), none (DiT resident), blocks (streamed)
    # 16-bit DiT weights a load holds in its own memory, not as file pages: cast from the file's dtype (the
    # official fp32 shards) or rewritten by a backbone LoRA merge. 0 when the load is zero-copy.
    dit_private_bytes: int = 0
    interp_factor: int = 1  # frames synthesized after decoding: ×2 of --fast-frames times --slowdown
    interpolator: str = "rife"  # "rife" (a model on the device) or "minterpolate" (FFmpeg on the host)
    delivered_frames: int = 0  # the clip at the generation's pace (--fast-frames: 2·frames−1); 0: frames
    experts: int = 1  # DiTs of one architecture that take turns (Wan2.2 A14B: high noise, then low noise)

    @property
    def output_frames(self) -> int:
        return (self.frames - 1) * self.interp_factor + 1

    @property
    def tokens(self) -> int:
        return (1 + (self.frames - 1) // 4) * (self.height // 16) * (self.width // 16)


@dataclass
class Stage:
    stage: str  # a Timings stage name of the pipeline
    device_peak_bytes: int
    host_peak_bytes: int

    def need(self, device: bool) -> int:
        """What must fit on the device (``device``) or in host RAM."""
        return self.device_peak_bytes if device else self.host_peak_bytes


@dataclass
class MemoryPlan:
    dit: str  # "resident" | "streamed"
    quantize: str  # recipe name, "prequantized" or "none"
    text_encoder: str  # "device" | "cpu" | "cached"
    vae_decode: str  # "whole" | "tiled"
    stages: list[Stage] = field(default_factory=list)
    device: str = "cpu"
    dit_bytes: int = 0  # the DiT's weights at the chosen recipe
    vae_tile: int | None = None  # the tile side (pixels) when "tiled"
    chunking: str = "chunked"  # how DiT blocks split their work (CHUNKINGS; wan_dit.Chunking)
    frames: int = 0  # generated by the model
    delivered_frames: int = 0  # after --fast-frames' ×2 interpolation (= frames without it)
    output_frames: int = 0  # in the MP4, after --slowdown too
    experts: int = 1  # DiTs that take turns, each ``dit_bytes`` (one in use at a time)

    def peak(self, which: str = "device_peak_bytes") -> int:
        return max((getattr(s, which) for s in self.stages), default=0)

    def to_json(self) -> dict:
        out = {"dit": self.dit, "quantize": self.quantize, "text_encoder": self.text_encoder, "vae_decode": self.vae_decode,
               "vae_tile": self.vae_tile, "chunking": self.chunking, "frames": self.frames,
               "delivered_frames": self.delivered_frames, "output_frames": self.output_frames,
               "stages": [asdict(s) for s in self.stages]}
        if self.experts > 1:
            out["experts"] = self.experts
        return out


class NoFit(Exception):
    """No plan fits: ``needed`` is the smallest peak of any plan (what a budget would have to allow)."""

    def __init__(self, needed: int, stage: str):
        super().__init__(stage)
        self.needed, self.stage = needed, stage


# --- estimates (bytes) -----------------------------------------------------------------------------------------------
def dit_block_bytes(tokens: int, dim: int, ffn_dim: int, act: int, held: int) -> int:
    """Live activations of one block: the larger of its attention and FFN phases (see DIT_STEP_PER_TOKEN_DIM);
    ``held``: bytes per element of the FFN weights held in the activation dtype (0 when used as stored)."""
    attention = DIT_STEP_PER_TOKEN_DIM[act] * tokens * dim + DIT_STEP_CHUNKS[act]
    ffn = 4 * tokens * dim + 2 * dim * ffn_dim * held + DIT_FFN_CHUNK
    return int(max(attention, ffn))


def dit_whole_block_bytes(tokens: int, dim: int, ffn_dim: int, act: int) -> int:
    """Live activations of one block run over the whole sequence at once (wan_dit.Chunking.whole): the attention
    phase holds the fp32 residual stream, the modulated input, q, k, v and the fp32 RoPE temporaries of one of them
    ((16 + 6·act) bytes per token·width, with the attention output and its projection); the FFN phase the stream,
    its input and output, and the hidden layer before and after GELU."""
    attention = (16 + 6 * act) * tokens * dim
    ffn = (4 + 2 * act) * tokens * dim + 2 * act * tokens * ffn_dim
    return int(max(attention, ffn))


def block_linear_params(dim: int, ffn_dim: int) -> int:
    """Linear weights of one block: self-attention q/k/v/o, cross-attention q/k/v/o and the image k/v, the FFN."""
    return 10 * dim * dim + 2 * dim * ffn_dim


CHUNKINGS = ("whole", "held", "chunked")  # fewest kernel launches first (wan_dit.Chunking; bench/ops.py counts them)
# What each chunking does, as --dry-run says it. On the CPU, query chunks over contiguous [B, H, L, D] q/k/v cost
# no more than one whole-sequence SDPA call (bench/attention.py --layouts), so bounded memory is not traded for speed.
CHUNKING_SAYS = {
    "whole": "one attention call over the whole sequence, every weight converted once per block",
    "held": "attention queries and per-token work in chunks, every weight converted once per block",
    "chunked": "attention queries and per-token work in chunks, FFN weights converted once per block",
}


def dit_step_bytes(job: Job, sizes: DiTSizes, recipe: str, device: str = "cuda", chunking: str = "chunked") -> int:
    """One denoising step's activations plus the per-video context (every block's cross-attention keys/values).

    ``chunking``: "chunked" bounds every temporary (the CPU's way; the FFN weights held in the activation dtype when
    they are converted); "held" adds every other converted weight of the block (each dequantized once per block
    call); "whole" runs the block over the whole sequence with every weight held.
    """
    a = job.act_bytes
    converted = recipe != "none" or job.weight_bytes != a  # weights dequantized or upcast per call
    held = a if converted else 0  # FFN weights converted (dequantized or upcast)
    kv = sizes.layers * (TEXT_ROWS + 257) * sizes.dim * 2 * 2  # k and v, 16-bit, text + image rows
    latents = 8 * 36 * job.tokens * 4 * 4  # x ‖ y, noise, velocity, fp32 at latent size (tokens × 4 pixels)
    slack = DIT_SLACK.get(device, DIT_SLACK_DEFAULT)
    block = dit_block_bytes(job.tokens, sizes.dim, sizes.ffn_dim, a, held)
    other_weights = 10 * sizes.dim * sizes.dim * a if converted else 0  # the rest of the block, held (not the FFN)
    if chunking == "held":
        block += other_weights
    elif chunking == "whole":
        block = dit_whole_block_bytes(job.tokens, sizes.dim, sizes.ffn_dim, a) + (
            block_linear_params(sizes.dim, sizes.ffn_dim) * a if converted else 0)
    return int(block * slack + kv + latents + attention_scores_bytes(job.tokens, sizes.dim, LIMITS[device]))


def attention_scores_bytes(tokens: int, dim: int, lim: DeviceLimits) -> int:
    """The fp32 score matrix and its softmax that one attention call makes where SDPA materialises them (MPS),
    for the query chunk the model runs (wan_dit.Chunking.for_device); 0 where the kernel is fused."""
    if not lim.fp32_scores:
        return 0
    heads = dim // HEAD_DIM
    queries = min(tokens, max(1, TOKEN_CHUNK_ELEMENTS // dim))
    one = heads * queries * tokens * 4
    if lim.max_tensor_bytes:
        one = min(one, lim.max_tensor_bytes // 2)
    return 2 * one


def vae_encode_bytes(job: Job, tile: int | None, device: str = "cuda") -> int:
    pixels = job.width * job.height
    work = min(pixels, tile * tile) if tile else pixels
    slack = VAE_SLACK.get(device, VAE_SLACK_DEFAULT)[0]
    return int(work * VAE_ENCODE_PER_PIXEL * slack + 12 * job.frames * pixels)  # + the conditioning clip


def vae_decode_bytes(job: Job, tile: int | None, device: str = "cuda") -> int:
    pixels = job.width * job.height
    work = min(pixels, tile * tile) if tile else pixels
    slack = VAE_SLACK.get(device, VAE_SLACK_DEFAULT)[1]
    return int(work * VAE_DECODE_PER_PIXEL * slack + 6 * job.frames * pixels)  # + the float16 clip tiles blend into


def tiny_decode_bytes(job: Job) -> int:
    return int(job.width * job.height * 4 * 64 * 4 * 3 + 12 * job.frames * job.width * job.height)  # 64 ch, 4 frames


def convert_bytes(sizes: DiTSizes) -> int:
    """Quantizing at load, layer by layer as it is written (recipes.write_quantized): the largest layer's source
    pages, its fp32 copy and the INT4 quantizer's temporaries, about 28 bytes per weight (bench/memory.py
    measured 0.36 GB of heap over the baseline converting the 1.3B's 1536×8960 FFN layers)."""
    return 28 * sizes.dim * max(sizes.ffn_dim, sizes.dim)


# --- the plan --------------------------------------------------------------------------------------------------------
def _stages(job: Job, m: Machine, recipe: str, streamed: bool, text: str, tile: int | None,
            chunking: str = "chunked") -> list[Stage]:
    """Per-stage peaks for one set of choices, in pipeline order (names as Timings records them)."""
    on_cpu = m.device == "cpu"
    sizes = job.dit[recipe]
    out: list[Stage] = []
    if on_cpu:  # one pool, and each stage holds only its own component's pages (module doc)
        dit = sizes.outside_blocks + sizes.block if streamed else sizes.total  # streamed: one block at a time
        if recipe == "none" and job.dit_private_bytes:  # private pages cannot be dropped after each block,
            dit = sizes.total * job.experts  # nor a parked expert's (its cast or merged copy stays in memory)
        keep = {"clip": job.image_encoder_bytes, "vae encode": job.vae_bytes * VAE_ENCODER_SHARE,
                "dit": dit + job.effect_bytes, "vae decode": job.vae_bytes * (1 - VAE_ENCODER_SHARE)}
        dit_host = 0
    else:  # everything loaded stays on the device; streamed blocks wait in pinned host memory
        idle = job.experts - 1  # the other experts: their non-block parts on the device when streamed, else on the host
        dit = sizes.streamed + idle * sizes.outside_blocks if streamed else sizes.total
        always = dit + job.image_encoder_bytes + job.vae_bytes + job.effect_bytes + (job.tiny_vae_bytes if job.fast_decode else 0)
        keep = dict.fromkeys(("clip", "vae encode", "dit", "vae decode"), always)
        dit_host = job.experts * sizes.total if streamed else idle * sizes.total

    def add(name: str, dev: int, host: int) -> None:
        if on_cpu:  # the device is host RAM
            out.append(Stage(name, int(RUNTIME_BYTES + dev + host), int(RUNTIME_BYTES + dev + host)))
        else:
            out.append(Stage(name, int(dev), int(RUNTIME_BYTES + host)))

    if text != "cached":
        t = job.text_encoder_bytes + TEXT_ENCODE_BYTES
        add("text encode", t if text == "device" else 0, t if text == "cpu" else 0)
    # CPU: mapped, nothing read yet. A first run converts layer by layer on the host, then maps cine's cache; a
    # cast or merged source is whole in memory before its conversion starts.
    converted = recipe in ("none", "prequantized") or recipe in job.quant_cached
    first_run = 0 if converted else job.dit_private_bytes + convert_bytes(sizes)
    # Two resident experts load mapped on the host and move to the device at their first step.
    add("load dit", 0 if on_cpu or (job.experts > 1 and not streamed) else dit, dit_host + first_run)
    if job.image_encoder_bytes:  # none for a model that takes no CLIP features (Wan2.2's i2v)
        add("image encode", keep["clip"] + IMAGE_ENCODE_BYTES, dit_host)
    add("vae encode", keep["vae encode"] + vae_encode_bytes(job, tile, m.device), dit_host)
    step = dit_step_bytes(job, sizes, recipe, m.device, chunking)
    for i in range(job.steps):
        add(f"denoise step {i + 1}/{job.steps}", keep["dit"] + step, dit_host)
    if job.fast_decode:
        add("vae decode (tiny)", keep["vae decode"] + job.tiny_vae_bytes + tiny_decode_bytes(job), dit_host)
    else:
        add("vae decode", keep["vae decode"] + vae_decode_bytes(job, tile, m.device), dit_host)
    if job.interp_factor > 1:
        add(f"interpolate {job.interpolator} x{job.interp_factor}", *interpolate_bytes(job, on_cpu))
    return out


def interpolate_bytes(job: Job, on_cpu: bool) -> tuple[int, int]:
    """(device, host) bytes of interpolating the decoded clip: the uint8 clip in and out on the host, and RIFE's
    weights and one batch of in-between frames where the model runs (padded to 64-px multiples)."""
    clip = 3 * job.width * job.height * (job.frames + job.output_frames)
    if job.interpolator != "rife":
        return 0, clip + 2 * 3 * job.width * job.height * 4  # FFmpeg's graph holds a few frames
    pad = lambda n: -(-n // 64) * 64  # noqa: E731
    batch = min(job.interp_factor - 1, RIFE_BATCH)
    model = RIFE_WEIGHT_BYTES + RIFE_PER_PIXEL * pad(job.width) * pad(job.height) * batch
    return (0, model + clip) if on_cpu else (model, clip)


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
    # CUDA's fused attention makes no score matrix, and its kernels are fast enough that a step of small chunks is
    # launch-bound (issue 21: ~600k launches per 14B step): the largest chunking that fits. Elsewhere bounded chunks.
    # The CPU holds a block's converted weights for the block call when that fits (each quantized weight decoded
    # once, not once per token chunk: issue 23), with bounded chunks; MPS keeps its score-capped chunks.
    chunkings = CHUNKINGS if m.device == "cuda" else ("held", "chunked") if m.device == "cpu" else ("chunked",)
    best: tuple[int, str] | None = None
    for recipe, streamed in candidates(job):
        for tile in (None, *VAE_TILES):
            for text, chunking in ((t, c) for t in texts for c in chunkings):
                stages = _stages(job, m, recipe, streamed, text, tile, chunking)
                if _fits(stages, m):
                    return MemoryPlan("streamed" if streamed else "resident", recipe, text, "tiled" if tile else "whole",
                                      stages, m.device, job.dit[recipe].total, tile, chunking, job.frames,
                                      job.delivered_frames or job.frames, job.output_frames, job.experts)
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
    ways.append(f"--memory-budget {math.ceil(err.needed / 1e8) / 10:g}GB on a machine that has it")  # GB = 10⁹
    return f"this job does not fit on {where}: {err.stage} needs {human(err.needed)}; it would fit with " + ", or ".join(ways)


def _plans(job: Job, m: Machine) -> bool:
    try:
        make_plan(job, m)
        return True
    except NoFit:
        return False
