"""The Wan2.1 video VAE (``Wan2.1_VAE.pth``): video in [-1, 1] ↔ normalised 16-channel latents.

Compression is 4× in time and 8× in space: a clip of ``T = 1 + 4k`` frames ``[B, 3, T, H, W]`` becomes latents
``[B, 16, 1 + k, H/8, W/8]``. Latents are *normalised* with the per-channel mean/std of the reference
(``(mu - mean) / std``), which is the space the DiT and the tiny decoder work in.

Module names equal the original checkpoint's keys (``encoder.downsamples.5.time_conv.weight``, ``conv1.weight``…);
diffusers names are mapped back by ``vae_loader``. Chunking and causal caching follow the reference exactly
(wan2.1-reference.md §C.5), see ``wan_vae_blocks``. Optional spatial tiling bounds memory for large frames.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from .load import trim_heap
from .wan_vae_blocks import CausalCache, CausalConv3d, Decoder3d, Encoder3d

# Per-channel statistics of Wan2.1 latents (reference ``WanVAE.__init__``; same as diffusers' config).
LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
               3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)

TIME_FACTOR = 4   # frames per latent frame (after the first)
SPACE_FACTOR = 8  # pixels per latent pixel


@dataclass(frozen=True)
class WanVAEConfig:
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)  # the decoder upsamples in reverse order
    latents_mean: tuple[float, ...] = field(default=LATENTS_MEAN, repr=False)
    latents_std: tuple[float, ...] = field(default=LATENTS_STD, repr=False)


VAE_CONFIGS: dict[str, WanVAEConfig] = {
    "wan2.1": WanVAEConfig(),            # Wan2.1_VAE.pth, ~127 M parameters
    "tiny": WanVAEConfig(base_dim=8),    # same topology, ~0.9 M parameters: tests only
}


class WanVAE(nn.Module):
    """Wan2.1 VAE. Compute dtype = parameter dtype (fp32 as the reference, or bf16/fp16); I/O is fp32."""

    def __init__(self, cfg: WanVAEConfig = VAE_CONFIGS["wan2.1"]) -> None:
        super().__init__()
        if len(cfg.latents_mean) != cfg.z_dim or len(cfg.latents_std) != cfg.z_dim:
            raise ValueError(f"latents_mean/std need {cfg.z_dim} values (z_dim)")
        self.cfg = cfg
        z = cfg.z_dim
        self.encoder = Encoder3d(cfg.base_dim, z, cfg.dim_mult, cfg.num_res_blocks, cfg.temporal_downsample)
        self.conv1 = CausalConv3d(z * 2, z * 2, 1)  # "quant conv": mu ‖ log-var
        self.conv2 = CausalConv3d(z, z, 1)          # "post-quant conv"
        self.decoder = Decoder3d(cfg.base_dim, z, cfg.dim_mult, cfg.num_res_blocks, cfg.temporal_downsample[::-1])

    @property
    def dtype(self) -> torch.dtype:
        return self.conv2.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.conv2.weight.device

    def _stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """mean, std as fp32 [1, z, 1, 1, 1] on the model's device (plain tensors: not part of the checkpoint)."""
        shape = (1, self.cfg.z_dim, 1, 1, 1)
        mean = torch.tensor(self.cfg.latents_mean, dtype=torch.float32, device=self.device).view(shape)
        std = torch.tensor(self.cfg.latents_std, dtype=torch.float32, device=self.device).view(shape)
        return mean, std

    # --- public API ----------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode(self, video: torch.Tensor, *, tile_size: int | None = None, tile_overlap: int = 64) -> torch.Tensor:
        """Video [B, 3, T, H, W] in [-1, 1], T = 1 + 4k, H and W multiples of 8 → normalised latents
        [B, z, 1 + k, H/8, W/8] fp32 (``(mu - mean) / std``; the posterior mean, never a sample).

        ``tile_size`` (pixels, multiple of 8): encode overlapping ``tile_size²`` tiles when a frame is larger,
        blending ``tile_overlap`` pixels; lowers peak memory at a small cost in fidelity near tile seams.
        """
        b, c, t, h, w = video.shape
        if c != 3 or (t - 1) % TIME_FACTOR or h % SPACE_FACTOR or w % SPACE_FACTOR:
            raise ValueError(f"video must be [B, 3, 1+4k, 8m, 8n], got {list(video.shape)}")
        x = video.to(device=self.device, dtype=self.dtype)
        if tile_size is not None and max(h, w) > tile_size:
            _check_tiles(tile_size, tile_overlap)
            mu = _tiled(x, self._encode_mu, tile_size, tile_overlap, scale=1 / SPACE_FACTOR)
        else:
            mu = self._encode_mu(x)
        mean, std = self._stats()
        return (mu - mean) * (1.0 / std)  # the reference multiplies by 1/std

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, *, tile_size: int | None = None, tile_overlap: int = 64,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Normalised latents [B, z, T', h, w] → video [B, 3, 1 + 4(T'-1), 8h, 8w] in ``dtype``, clamped to [-1, 1].

        ``tile_size`` / ``tile_overlap`` are in output pixels (multiples of 8), see ``encode``. ``dtype``: of the
        clip-sized result (and the tiles' blend accumulator). float16 halves it (0.12 GB for 49 frames at 832x480)
        and is as good for 8-bit video: it resolves 1/2048 near ±1, 16x finer than a uint8 step (frames differ by one
        level at rounding ties only, on under 1% of the pixels; tests/test_vae.py).
        """
        if latents.ndim != 5 or latents.shape[1] != self.cfg.z_dim:
            raise ValueError(f"latents must be [B, {self.cfg.z_dim}, T, h, w], got {list(latents.shape)}")
        mean, std = self._stats()
        z = latents.to(device=self.device, dtype=torch.float32) * std + mean  # un-normalise in fp32
        h, w = z.shape[-2:]
        if tile_size is not None and max(h, w) * SPACE_FACTOR > tile_size:
            _check_tiles(tile_size, tile_overlap)
            out = _tiled(z, self._decode_pixels, tile_size // SPACE_FACTOR, tile_overlap // SPACE_FACTOR,
                         scale=SPACE_FACTOR, dtype=dtype)
        else:
            out = self._decode_pixels(z, dtype)
        return out.clamp_(-1.0, 1.0)

    # --- chunked passes (reference §C.5) ----------------------------------------------------------------------------

    def _encode_mu(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, 1+4k, H, W] (model dtype) → un-normalised mu [B, z, 1+k, H/8, W/8] fp32."""
        b, _, t, h, w = x.shape
        n = 1 + (t - 1) // TIME_FACTOR
        mu = torch.empty(b, self.cfg.z_dim, n, h // SPACE_FACTOR, w // SPACE_FACTOR, device=x.device)
        cache = CausalCache()
        for i in range(n):
            # Frame 0 alone, then 4 frames per chunk: each chunk yields exactly one latent frame.
            start, stop = (0, 1) if i == 0 else (1 + TIME_FACTOR * (i - 1), 1 + TIME_FACTOR * i)
            cache.start_chunk()
            hidden = self.encoder(x[:, :, start:stop], cache)  # [B, 2z, 1, H/8, W/8]
            # conv1 is 1×1×1, so applying it per chunk equals the reference's pass over the concatenation.
            mu[:, :, i : i + 1] = self.conv1(hidden)[:, : self.cfg.z_dim].float()
            del hidden
            _return_heap(x)
        return mu

    def _decode_pixels(self, z: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Un-normalised latents [B, z, T', h, w] fp32 → video [B, 3, 1+4(T'-1), 8h, 8w] in ``dtype``, unclamped."""
        b, _, n, h, w = z.shape
        x = self.conv2(z.to(self.dtype))  # 1×1×1 over all latent frames at once, as the reference
        out = torch.empty(b, 3, 1 + TIME_FACTOR * (n - 1), h * SPACE_FACTOR, w * SPACE_FACTOR, device=z.device, dtype=dtype)
        cache = CausalCache()
        for i in range(n):
            # One latent per chunk: latent 0 → frame 0, latent i → frames 4i-3 … 4i.
            cache.start_chunk()
            frames = self.decoder(x[:, :, i : i + 1], cache)  # [B, 3, 1 or 4, 8h, 8w]
            start = 0 if i == 0 else 1 + TIME_FACTOR * (i - 1)
            out[:, :, start : start + frames.shape[2]] = frames
            del frames
            _return_heap(z)
        return out


def _return_heap(x: torch.Tensor) -> None:
    """On the CPU, hand the chunk's freed activations back to the system before the next chunk.

    A chunk frees hundreds of MB in blocks under glibc's mmap threshold (32 MB); glibc keeps them, and over a
    tiled 49-frame decode the kept heap crept RSS up by 0.14 GB (bench/memory.py). ``malloc_trim`` costs
    milliseconds against seconds of convolution per chunk.
    """
    if x.device.type == "cpu":
        trim_heap()


# --- spatial tiling ------------------------------------------------------------------------------------------------


def _check_tiles(tile_size: int, tile_overlap: int) -> None:
    if tile_size % SPACE_FACTOR or tile_overlap % SPACE_FACTOR or not 0 <= tile_overlap < tile_size:
        raise ValueError(f"tile_size ({tile_size}) and tile_overlap ({tile_overlap}) must be multiples of 8 "
                         "with 0 ≤ overlap < size")


def _tile_starts(size: int, tile: int, overlap: int, align: int = 1) -> list[int]:
    """Start offsets of the fewest tiles of length ``tile`` that cover ``size`` overlapping by ≥ ``overlap``,
    spread evenly (multiples of ``align``): 480 px in 256-px tiles is [0, 224], not [0, 224] plus a sliver tile."""
    if size <= tile:
        return [0]
    n = -(-(size - overlap) // (tile - overlap))  # ceil
    while True:
        starts = [min(size - tile, round(i * (size - tile) / (n - 1) / align) * align) for i in range(n)]
        starts[-1] = size - tile
        if all(b - a <= tile - overlap for a, b in zip(starts, starts[1:])):
            return starts
        n += 1  # alignment rounding left a gap too wide: one more tile


def _ramp(length: int, rise: int, fall: int, device: torch.device) -> torch.Tensor:
    """1-D blend weights [length]: linear ramps over the ``rise`` / ``fall`` pixels shared with each neighbour.

    Facing ramps over the same overlap sum to 1; weights stay > 0 everywhere.
    """
    w = torch.ones(length, device=device)
    for o, flip in ((min(rise, length), False), (min(fall, length), True)):
        if o > 0:
            ramp = torch.arange(1, o + 1, device=device, dtype=torch.float32) / (o + 1)
            part = w[-o:] if flip else w[:o]
            part.copy_(torch.minimum(part, ramp.flip(0) if flip else ramp))
    return w


def _tiled(x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], tile: int, overlap: int,
           scale: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Apply ``fn`` to overlapping spatial tiles of x [B, C, T, H, W] and blend the results into a ``dtype`` tensor.

    ``fn`` maps an h×w tile to an (h·scale)×(w·scale) fp32 result; ``tile``/``overlap`` are in input pixels.
    """
    height, width = x.shape[-2:]
    align = round(1 / scale) if scale < 1 else 1  # encoder tiles start on whole latent pixels
    ys, xs = _tile_starts(height, tile, overlap, align), _tile_starts(width, tile, overlap, align)

    def shared(starts: list[int], i: int, size: int) -> tuple[int, int]:
        """Output pixels tile i shares with the previous and the next tile."""
        end = min(starts[i] + tile, size)
        rise = min(starts[i - 1] + tile, size) - starts[i] if i > 0 else 0
        fall = end - starts[i + 1] if i + 1 < len(starts) else 0
        return round(rise * scale), round(fall * scale)

    out: torch.Tensor | None = None
    weight = torch.zeros(round(height * scale), round(width * scale), device=x.device)  # [H', W']
    for iy, y0 in enumerate(ys):
        for ix, x0 in enumerate(xs):
            part = fn(x[..., y0 : y0 + tile, x0 : x0 + tile])  # [B, C', T', th', tw'] fp32
            if out is None:
                out = torch.zeros(*part.shape[:3], *weight.shape, device=x.device, dtype=dtype)
            th, tw = part.shape[-2:]
            oy, ox = round(y0 * scale), round(x0 * scale)
            wy = _ramp(th, *shared(ys, iy, height), device=x.device)
            wx = _ramp(tw, *shared(xs, ix, width), device=x.device)
            wgt = wy[:, None] * wx[None, :]  # [th', tw']
            out[..., oy : oy + th, ox : ox + tw] += part * wgt
            weight[oy : oy + th, ox : ox + tw] += wgt
    assert out is not None
    return out.div_(weight)  # in place: the clip-sized accumulator becomes the result
