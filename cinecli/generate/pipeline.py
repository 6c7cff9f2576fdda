"""Photo → clip: conditioning, 4-step generation and decoding on one loaded backbone.

A ``Generator`` holds the components of one backbone on one device and serves many requests (batch runs load
once). Each request is planned first (``plan``: sizes, frames, seed, prompt — no model needed, which is what
``--dry-run`` prints), then run stage by stage under ``Timings`` so the report sees every stage.

Memory order for one request: the text encoder (11 GB for umT5-XXL) loads only on a prompt-cache miss and is
freed before the DiT loads. The other components stay loaded (batches reuse them), but on the CPU, where their
weights are memory-mapped files, each one's pages leave the process when its stage ends (``release_pages``:
CLIP after the image encode, the VAE after encoding, the DiT before the decode), so a stage holds only its own
component's weights; the next request refaults them from the page cache.

A two-expert backbone (Wan2.2-I2V-A14B) loads both DiTs, each with its own effect adapters, and runs one at a time
(``models/experts.py``): the sampler says which expert a step needs, and the other is parked at the switch. It
takes no CLIP features: the photo reaches it only through ``y``, so no image encoder is loaded.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import secrets
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from .. import __version__
from ..core.devices import device_rules, image_encoder_dtype, on_host, release_cached, text_encoder_dtype
from ..core.errors import InputError, UsageError
from ..core.limits import is_out_of_memory
from ..core.timing import Timings
from ..effects.preset import Backbone, Preset, SamplerSpec
from ..effects.rules import MAX_FRAMES
from ..output.slowdown import output_frames as upsampled_frames
from . import prompt_cache
from .image import check_pair, enlarge_notice, fit_image, read_image, target_size, to_tensor
from .sampler import choose_sampler, rescale_boundary, sample

VAE_TILE, VAE_TILE_OVERLAP = 256, 32  # pixels; tiles spread evenly (480x832: 2x4 tiles, 1.3x the pixels)


@dataclass
class Request:
    image: str | Path | bytes
    preset: Preset
    output: str = "-"
    seed: int | None = None
    frames: int | None = None
    fps: int | None = None
    fit: str = "crop"
    last_frame: str | Path | None = None
    prompt: str | None = None
    negative_prompt: str | None = None
    steps: int | None = None
    effect_strength: float | None = None
    sampler: str | None = None  # --sampler: distill | euler | unipc (None: the preset's or backbone's)
    distill_step: str | None = None  # --distill-step: renoise | euler (None: the backbone's)
    slowdown: int | None = None  # None: the preset's
    fast_frames: bool = False  # --fast-frames: generate (F−1)/2+1 frames, interpolate ×2 back to F


@dataclass
class Plan:
    """Everything decided before any model loads."""

    width: int
    height: int
    frames: int
    fps: int
    seed: int
    prompt: str
    negative_prompt: str
    sampler: SamplerSpec
    notices: list[str] = field(default_factory=list)
    slowdown: int = 1  # frames synthesized after decoding: frames → (frames − 1)·slowdown + 1, same fps
    fast_frames: bool = False  # ``frames`` is half the clip's (+1): interpolation ×2 makes the rest
    interpolator: str | None = None  # what synthesizes frames ("rife", "minterpolate"): run.py decides

    @property
    def interp_factor(self) -> int:
        """The one interpolation factor after decoding: fast mode's ×2 times the slowdown."""
        return self.slowdown * (2 if self.fast_frames else 1)

    @property
    def delivered_frames(self) -> int:
        """The clip's frame count at the generation's pace (what --frames asked for): fast mode's ×2 done."""
        return upsampled_frames(self.frames, 2 if self.fast_frames else 1)

    @property
    def output_frames(self) -> int:
        return upsampled_frames(self.frames, self.interp_factor)

    @property
    def latent_shape(self) -> tuple[int, int, int, int]:
        return (16, 1 + (self.frames - 1) // 4, self.height // 8, self.width // 8)

    @property
    def tokens(self) -> int:
        _, f, h, w = self.latent_shape
        return f * (h // 2) * (w // 2)


def round_frames(frames: int) -> int:
    """Nearest 4k+1 (the VAE compresses time 4x after the first frame), at least 1."""
    return max(1, min(MAX_FRAMES, 4 * round((frames - 1) / 4) + 1))


def final_prompt(request: Request) -> str:
    """The prompt a request runs with: the user's or the preset's, with the effect's trigger words in front."""
    prompt = request.prompt or request.preset.prompt
    trigger = request.preset.effect.trigger if request.preset.effect else ""
    if trigger and trigger not in prompt:
        prompt = f"{trigger}, {prompt}"  # effect LoRAs only fire on their trigger words
    return prompt


def plan(request: Request, image_size: tuple[int, int]) -> Plan:
    preset = request.preset
    notices = []
    frames = request.frames or preset.frames
    if frames < 1:
        raise UsageError(f"--frames must be at least 1, got {frames}")
    if round_frames(frames) != frames:
        notices.append(f"frames {frames} → {round_frames(frames)} (the model needs 4k+1 frames, at most {MAX_FRAMES})")
        frames = round_frames(frames)
    fast = request.fast_frames
    if fast and frames < 9:
        notices.append(f"warning: --fast-frames needs at least 9 frames; generating all {frames}")
        fast = False
    elif fast:
        if (frames - 1) % 8:  # half of F−1 must stay a multiple of 4 (the VAE's 4k+1)
            even = min(MAX_FRAMES, 8 * round((frames - 1) / 8) + 1)
            notices.append(f"frames {frames} → {even} (--fast-frames generates (F−1)/2+1 frames, which must be 4k+1)")
            frames = even
        frames = (frames - 1) // 2 + 1  # generated; interpolation ×2 delivers the rest
    sampler, sampler_notices = choose_sampler(preset.effective_sampler, request.sampler, request.distill_step,
                                              preset.backbone.name)
    notices += sampler_notices
    if request.steps is not None:
        if request.steps < 1:
            raise UsageError(f"--steps must be at least 1, got {request.steps}")
        if sampler.kind == "distill" and request.steps != sampler.num_steps:
            notices.append(f"warning: this backbone is distilled for {sampler.num_steps} steps; {request.steps} steps "
                           "leave its trained schedule and usually look worse")
            sampler = replace(rescale_boundary(sampler, request.steps),
                              timesteps=tuple(1000 * (1 - i / request.steps) for i in range(request.steps)))
        else:
            sampler = replace(sampler, steps=request.steps)
    prompt = final_prompt(request)
    try:
        width, height = target_size(*image_size, preset.max_area)
    except InputError as exc:  # name the file: a batch has many
        raise InputError(f"{'stdin' if str(request.image) == '-' else request.image}: {exc}") from None
    notices += enlarge_notice(image_size, (width, height))
    slowdown = request.slowdown or preset.slowdown
    if slowdown > 1 and frames < 2:
        notices.append(f"warning: --slowdown {slowdown} does nothing to a single frame (--frames {frames})")
    seed = request.seed if request.seed is not None else secrets.randbelow(2**31)
    return Plan(width, height, frames, request.fps or preset.fps, seed, prompt,
                preset.negative_for(sampler, request.negative_prompt), sampler, notices, slowdown=slowdown,
                fast_frames=fast)


def condition_mask(frames: int, lat_h: int, lat_w: int, last_frame: bool) -> torch.Tensor:
    """Which pixel frames are given (1) → the 4 mask channels per latent frame: [4, F_lat, lat_h, lat_w].

    Pixel frame 0 is repeated 4x so it fills latent 0's four sub-frames; the rest fold 4 by 4 (reference §D.4).
    """
    known = torch.zeros(frames)
    known[0] = 1
    if last_frame:
        known[-1] = 1
    folded = torch.cat([known[:1].repeat(4), known[1:]]).view(-1, 4).T  # [4, F_lat]
    return folded[:, :, None, None].expand(4, folded.shape[1], lat_h, lat_w).contiguous()


@dataclass
class Generator:
    """One backbone's components on one device, loaded on first use."""

    backbone: Backbone
    paths: dict[str, Path]  # component → local path (from weights.hub.resolve_all)
    device: torch.device
    dtype: torch.dtype
    timings: Timings | None = None
    quantize: str | None = None  # recipe to apply at load (overrides the backbone's)
    fast_decode: bool = False  # decode with the tiny VAE (TAEW2.1): much faster, lower fidelity
    text_device: torch.device | None = None  # where the text encoder runs (memory plan: "cpu" when the device is short)
    # VAE encode/decode in blended spatial tiles of this many pixels (None: whole frames). Bounds the VAE's
    # activations (~29 kB per pixel of a tile untiled: 11 GB for a 624x624 frame) whatever the frame size.
    vae_tile: int | None = VAE_TILE
    # Smaller tile sides to retry the decode with after an out-of-memory error (the plan's ladder below vae_tile):
    # the latents of minutes of denoising are kept, not lost to a decode that did not fit.
    vae_retry_tiles: tuple[int, ...] = ()
    # Keep the DiT blocks in host memory and stream them to the device one block ahead (models/streaming.py).
    stream_blocks: bool = False
    # How the DiT's blocks split their work (plan.memory.CHUNKINGS): "whole" sequence with every weight held, weights
    # "held" over bounded chunks, or bounded "chunked" (the loader's default for the device).
    chunking: str = "chunked"
    _tiny: object = None
    # Per expert ("high_noise"; "low_noise" too on a two-expert backbone): models.adapters.Effects on its DiT,
    # effect LoRAs attached unmerged and switched per job.
    _effects: dict = field(default_factory=dict)
    _experts: object = None  # models.experts.Experts: the loaded DiTs, one in use at a time
    _vae: object = None
    _clip: object = None

    def _stage(self, name: str):
        return self.timings.stage(name) if self.timings is not None else contextlib.nullcontext()

    @contextlib.contextmanager
    def _load(self, name: str):
        """A loading stage: reading files is host work (an emulated device checks only what reaches it, through
        devices.to_device)."""
        with self._stage(name), on_host():
            yield

    # --- components -----------------------------------------------------------------------------------------------
    def text_context(self, prompt: str) -> torch.Tensor:
        """[L, 4096] states for ``prompt``: from the cache, or by loading the text encoder once (then freed)."""
        with self._stage("text cache lookup"):
            identity = prompt_cache.encoder_identity(self.paths["text_encoder"])
            cached = prompt_cache.lookup(identity, prompt)
        if cached is not None:
            return cached.to(self.device)
        return self.encode_prompts([prompt], identity)[0].to(self.device)

    def encode_prompts(self, prompts: list[str], identity: str | None = None) -> list[torch.Tensor]:
        """Encode and cache every prompt not cached yet with one text-encoder load, then free the encoder.

        Batches call this for all their prompts before the DiT loads, so the 11 GB encoder and the DiT are never
        resident together and load once per batch, not once per new prompt.
        """
        identity = identity or prompt_cache.encoder_identity(self.paths["text_encoder"])
        found = {p: prompt_cache.lookup(identity, p) for p in dict.fromkeys(prompts)}
        todo = [p for p, context in found.items() if context is None]
        if todo:
            where = self.text_device or self.device
            with self._load("load text_encoder"):  # imports inside the stage: their cost is part of loading
                from ..models.text_encoder import load_text_encoder

                enc = load_text_encoder(self.paths["text_encoder"], tokenizer=self.paths["tokenizer"], device=where,
                                        dtype=text_encoder_dtype(where, self.device, self.dtype))
            on_device = contextlib.nullcontext() if where == self.device else on_host()  # the plan's CPU fallback
            with self._stage("text encode"), torch.no_grad(), on_device:
                for i in range(0, len(todo), 16):  # 16 prompts per encoder call bounds its activations
                    for p, context in zip(todo[i:i + 16], enc.encode(todo[i:i + 16])):
                        found[p] = context.cpu()
                        prompt_cache.store(identity, p, context)
                del enc
                gc.collect()  # free the encoder before the DiT loads
                from ..models.load import trim_heap

                trim_heap()
        return [found[p] for p in prompts]

    @property
    def clip(self):
        if self._clip is None:
            with self._load("load image_encoder"):
                from ..models.image_encoder import load_image_encoder

                self._clip = load_image_encoder(self.paths["image_encoder"], device=self.device,
                                                dtype=image_encoder_dtype(self.device, self.dtype), weight_dtype=self.dtype)
        return self._clip

    @property
    def vae(self):
        if self._vae is None:
            with self._load("load vae"):
                from ..models.vae_loader import load_vae

                self._vae = load_vae(self.paths["vae"], device=self.device)  # devices.vae_dtype: bf16 where native
        return self._vae

    @property
    def tiny_vae(self):
        if self._tiny is None:
            with self._load("load tiny_vae"):
                from ..models.vae_loader import load_tiny_vae

                self._tiny = load_tiny_vae(self.paths["tiny_vae"], device=self.device)
        return self._tiny

    @property
    def experts(self):
        """Every DiT of the backbone, loaded (each its own stage): a ``models.experts.Experts``, one in use at a time."""
        if self._experts is None:
            from ..models.experts import Experts

            self._experts = Experts(self.device, self.stream_blocks)
        for expert in self.backbone.experts:
            if expert not in self._experts.models:
                self._load_expert(expert)
        return self._experts

    @property
    def dit(self):
        """The (first, high-noise) DiT."""
        return self.experts.models["high_noise"]

    def _load_expert(self, expert: str) -> None:
        label = "dit" if expert == "high_noise" else f"dit_{expert}"
        with self._load("load dit" if expert == "high_noise" else f"load dit ({expert.replace('_', ' ')})"):
            from ..models import load_dit
            from ..models.adapters import Effects, merge_into
            from ..models.quant_cache import is_prequantized, load_quantized

            recipe = self.quantize or self.backbone.quantize
            merges = [(self.paths[card.labels("lora")[expert]], card.strength, card.name)
                      for card in self.backbone.merge if expert in card.files()]
            # Streamed blocks load on the host, and so do experts that trade places on the device (Experts.activate);
            # streaming moves the rest to the device below.
            where = torch.device("cpu") if self.stream_blocks or len(self.backbone.experts) > 1 else self.device
            if recipe and recipe != "none" and not is_prequantized(self.paths[label]):
                # quantized once per expert, then memory-mapped from cine's cache
                from ..models.recipes import get_recipe

                dit = load_quantized(self.paths[label], get_recipe(recipe), merges, device=where, dtype=self.dtype)
            else:
                dit = load_dit(self.paths[label], device=where, dtype=self.dtype)
                for path, strength, name in merges:  # backbone LoRAs (the 4-step distillation): merged once
                    merge_into(dit, path, strength=strength, what=f"LoRA {name}")
            if self.stream_blocks:
                from ..models.streaming import stream_blocks

                stream_blocks(dit, self.device)
            elif where != self.device:  # activations as on the device it will run on (effect adapters follow it)
                from ..core.devices import activation_dtype, limits
                from ..models.wan_dit import Chunking

                dit.compute_dtype = activation_dtype(self.device, dit.patch_embedding.weight.dtype)
                dit.chunking = Chunking.for_device(limits(self.device))
            dit.chunking = chunking_for(self.chunking, dit.chunking)
            self._experts.add(expert, dit)
            self._effects[expert] = Effects(dit)

    def use_effect(self, preset: Preset, strength: float | None = None) -> None:
        """Switch each DiT to the preset's effect LoRA (attached on first use; no backbone reload), or none. A pair
        gives each expert its own file; a single file goes to the experts its card names (the others run bare)."""
        experts = self.experts  # loads the DiTs (their own stages) if needed
        card = preset.effect
        strength = effect_strength(preset, strength)
        labels = card.labels() if card is not None else {}
        for expert in experts.models:
            effects = self._effects[expert]
            if expert not in labels:
                effects.use(None)
                continue
            key = f"{card.name}@{strength:g}"
            if key not in effects.loaded:
                which = f" ({expert.replace('_', ' ')})" if len(experts.models) > 1 else ""
                with self._stage(f"load effect {card.name}{which}"):
                    effects.load(key, self.paths[labels[expert]], strength=strength)
            effects.use(key)

    @property
    def quant_recipe(self) -> str:
        dit = self._experts.models.get("high_noise") if self._experts is not None else None
        return getattr(dit, "quant_recipe", None) or self.quantize or self.backbone.quantize or "none"

    def nonfinite_hint(self) -> str:
        from ..models.recipes import RECIPES

        recipe = self.quant_recipe
        if self.dtype == torch.float16:  # Wan overflows fp16's range (devices.default_dtype)
            return " in fp16; try --dtype bf16 (or fp32 where bf16 is not supported)"
        if recipe in RECIPES and RECIPES[recipe].next_safer:
            return f" with quantization recipe '{recipe}'; try --quantize {RECIPES[recipe].next_safer}"
        if recipe != "none":
            return f" with quantization '{recipe}'; try the 16-bit checkpoint"
        return "; try --dtype fp32"

    # --- one request ----------------------------------------------------------------------------------------------
    def generate(self, request: Request, the_plan: Plan, image) -> torch.Tensor:
        """Run one planned request → video [3, T, H, W] in [-1, 1] on the CPU, in the decoder's output dtype (float16
        from the Wan VAE): only frames_to_uint8 reads it, a frame at a time.

        On an emulated device (CINE_EMULATE_DEVICE) every tensor made here is checked against its limits."""
        with device_rules(self.device):
            return self._generate(request, the_plan, image)

    def _generate(self, request: Request, the_plan: Plan, image) -> torch.Tensor:
        preset, p = request.preset, the_plan
        if request.last_frame is not None and not self.backbone.supports_last_frame:
            raise UsageError(f"backbone {self.backbone.name} does not support --last-frame "
                             "(use a backbone with supports_last_frame, e.g. wan2.1-fun-1.3b-inp)")
        _, f_lat, lat_h, lat_w = p.latent_shape
        with self._stage("prepare image"):
            first = to_tensor(fit_image(image, (p.width, p.height), request.fit))  # [3, H, W]
            last = None
            if request.last_frame is not None:
                end = read_image(request.last_frame)
                check_pair(image.size, end.size, request.last_frame)  # a burst pair: same orientation, fitted alike
                last = to_tensor(fit_image(end, (p.width, p.height), request.fit))
        text = self.text_context(p.prompt)
        negative = self.text_context(p.negative_prompt) if p.sampler.uses_cfg else None

        experts = self.experts  # loads (each its own stage) before the stages that use them
        config = experts.models["high_noise"].config
        clip = self.clip if config.has_image_input else None  # Wan2.2's i2v takes no CLIP features
        vae = self.vae
        if self.fast_decode:
            self.tiny_vae  # noqa: B018
        self.use_effect(preset, request.effect_strength)
        from ..models.load import release_pages

        clip_fea = None
        if clip is not None:
            with self._stage("image encode"):
                clip_fea = clip.encode(first[None].to(self.device))  # [1, 257, 1280]
                if config.model_type == "flf2v":
                    clip_fea = torch.cat([clip_fea, clip.encode((last if last is not None else first)[None].to(self.device))], 1)
                release_pages(clip.model)
        with self._stage("vae encode"):
            video = torch.zeros(3, p.frames, p.height, p.width)
            video[:, 0] = first
            if last is not None:
                video[:, -1] = last
            cond_latent = vae.encode(video[None].to(self.device), tile_size=self.vae_tile,
                                     tile_overlap=VAE_TILE_OVERLAP)  # [1, 16, F_lat, lat_h, lat_w]
            mask = condition_mask(p.frames, lat_h, lat_w, last is not None)[None].to(self.device)
            y = torch.cat([mask, cond_latent.float()], dim=1)  # [1, 20, F_lat, lat_h, lat_w]
            del video
            release_pages(vae)

        contexts: dict[str, tuple] = {}  # expert → (context, negative context): text/image embeddings once per video

        def context(expert: str) -> tuple:
            """The expert's conditioning, made when it first runs (its cross-attention keys/values come from its
            own weights); the other expert's is dropped then, as that expert is parked."""
            if expert not in contexts:
                contexts.clear()
                dit = experts.activate(expert)
                contexts[expert] = (dit.prepare_context(text[None].to(self.device), clip_fea),
                                    dit.prepare_context(negative[None].to(self.device), clip_fea) if negative is not None else None)
            return contexts[expert]

        def denoiser(expert: str):
            def denoise(x: torch.Tensor, t: torch.Tensor, cond: bool) -> torch.Tensor:
                ctx, ctx_neg = context(expert)
                return experts.activate(expert)(x, t, ctx if cond else ctx_neg, y=y)

            return denoise

        with torch.no_grad(), self._stage("prepare context"):
            context("high_noise")
        with torch.no_grad():
            generator = torch.Generator().manual_seed(p.seed)
            hint = self.nonfinite_hint()
            latents = sample(denoiser("high_noise"), p.sampler, (1, *p.latent_shape), generator, self.device,
                             step_hook=lambda i, n: self._stage(f"denoise step {i + 1}/{n}"), nonfinite_hint=hint,
                             low_noise=denoiser("low_noise") if "low_noise" in experts.models else None)
            contexts.clear()
            y = None  # the conditioning latents are done with (the closures above read it per step)
            experts.release()
        if self.fast_decode:
            tiny = self.tiny_vae
            with self._stage("vae decode (tiny)"):
                return tiny.decode(latents)[0].cpu()
        with self._stage("vae decode"):
            video = self._decode(vae, latents)
            release_pages(vae)
            return video

    def _decode(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """latents → [3, T, H, W] float16 on the CPU (the clip only ever becomes 8-bit frames: WanVAE.decode), in
        the plan's tiles; after an out-of-memory error, again from the same latents in the next smaller tiles."""
        tile, retries = self.vae_tile, list(self.vae_retry_tiles)
        while True:
            try:
                return vae.decode(latents, tile_size=tile, tile_overlap=VAE_TILE_OVERLAP, dtype=torch.float16)[0].cpu()
            except Exception as exc:
                if not is_out_of_memory(exc) or not retries:
                    raise
                release_cached(self.device)
                tile = retries.pop(0)
                print(f"cine: notice: the VAE decode ran out of memory; retrying in {tile}-px tiles", file=sys.stderr)


def chunking_for(name: str, default):
    """The plan's chunking name → a ``wan_dit.Chunking`` (``default``: the loader's, for its device)."""
    from ..models.wan_dit import Chunking

    if name == "whole":
        return Chunking.whole(default.score_bytes)
    if name == "held":
        return replace(default, hold_weights=True)
    return default


def sampler_settings(spec: SamplerSpec) -> dict:
    """The sampler settings that change the video beyond its kind and steps (MP4 metadata and report)."""
    switch = {k: v for k, v in (("boundary_step_index", spec.boundary_step_index), ("boundary", spec.boundary))
              if v is not None}  # two-expert backbones: where the low-noise expert takes over
    if spec.kind == "distill":
        return {"distill_step": spec.step, "shift": spec.shift, **switch}
    return {"shift": spec.shift, "guidance": spec.guidance, **switch}


def effect_strength(preset: Preset, strength: float | None = None) -> float | None:
    """The effect LoRA's strength a run uses: --strength, else the preset's, else the LoRA card's (None: no LoRA)."""
    if preset.effect is None:
        return None
    if strength is not None:
        return strength
    return preset.effect_strength if preset.effect_strength is not None else preset.effect.strength


def lora_files(preset: Preset, gen: Generator) -> dict[str, str]:
    """Every LoRA the clip was made with → its file as shared files name it, with its sha256 (hub: repo/file@rev)."""
    from ..weights.lock import describe

    out = {}
    cards = [("lora", c) for c in gen.backbone.merge] + ([("effect", preset.effect)] if preset.effect else [])
    for kind, card in cards:
        files = card.files()
        named = []  # (expert, label, name)
        for expert, label in card.labels(kind).items():
            if expert not in gen.backbone.experts or label in (n for _, n, _ in named):
                continue  # one file for several experts: named once
            path, ref = gen.paths.get(label), files[expert]
            text = describe(ref, path)
            # A local file not in the lock yet: hashed now, once per file version (a batch names it in every item).
            # A hub file is named by repo/file(@revision) already.
            if ref.path is not None and "sha256:" not in text and path is not None and Path(path).is_file():
                stat = Path(path).stat()
                text = f"{Path(path).name} sha256:{_file_sha256(str(path), stat.st_size, stat.st_mtime_ns)[:16]}"
            named.append((expert, label, text))
        out[card.name] = named[0][2] if len(named) == 1 else {expert: text for expert, _, text in named}
    return out


@functools.lru_cache(maxsize=64)
def _file_sha256(path: str, size: int, mtime_ns: int) -> str:
    """weights.lock.sha256 of a file, remembered per (path, size, mtime): never read twice in one process."""
    from ..weights.lock import sha256

    return sha256(Path(path))


def metadata(request: Request, the_plan: Plan, gen: Generator, crf: int) -> dict:
    """What goes into the MP4 (and `cine info` shows): every setting that changes the pixels."""
    preset = request.preset
    return {
        "cine": __version__, "effect": preset.name, "seed": the_plan.seed, "prompt": the_plan.prompt,
        "negative_prompt": the_plan.negative_prompt, "backbone": gen.backbone.name, "dit": _describe_dit(gen),
        **({"dit_low_noise": _describe_dit(gen, "dit_low_noise")} if gen.backbone.dit_low_noise else {}),
        "loras": [c.name for c in gen.backbone.merge] + ([preset.effect.name] if preset.effect else []),
        "steps": the_plan.sampler.num_steps, "sampler": the_plan.sampler.kind, "frames": the_plan.frames,
        **sampler_settings(the_plan.sampler),
        "fps": the_plan.fps, "width": the_plan.width, "height": the_plan.height,
        "dtype": str(gen.dtype).removeprefix("torch."), "quantization": gen.quant_recipe,
        "slowdown": the_plan.slowdown, "output_frames": the_plan.output_frames,
        "fast_frames": the_plan.fast_frames, "delivered_frames": the_plan.delivered_frames,
        "interpolation": the_plan.interpolator if the_plan.interp_factor > 1 else None,
        "last_frame": Path(str(request.last_frame)).name if request.last_frame is not None else None,
        "effect_strength": effect_strength(preset, request.effect_strength), "fit": request.fit,
        "fast_decode": gen.fast_decode, "crf": crf, "lora_files": lora_files(preset, gen),
    }


def _describe_dit(gen: Generator, label: str = "dit") -> str:
    """A DiT as the MP4 names it: hub repo/file, or file name + sha256 for local weights (never a local path)."""
    from ..weights.lock import describe

    return describe(gen.backbone.components()[label], gen.paths.get(label))
