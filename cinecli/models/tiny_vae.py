"""TAEW2.1, the tiny Wan2.1 autoencoder (madebyollin/taehv ``taew2_1.pth``): a fast, lower-fidelity stand-in
for the Wan VAE decoder (and encoder) on the same *normalised* 16-channel latents.

It is a stack of 2-D convs applied per frame, with three kinds of temporal layer (wan2.1-reference.md §C.6):
  - ``MemBlock``: a residual conv block that also sees the previous frame's input (zeros before frame 0);
  - ``TGrow``: a 1×1 conv that emits ``stride`` frames per frame (temporal upsampling, decoder);
  - ``TPool``: a 1×1 conv over ``stride`` consecutive frames stacked on channels (temporal pooling, encoder).
The checkpoint is ``nn.Sequential`` indexed (``decoder.3.conv.0.weight``…); our modules keep those indices.

TAEHV works on NTCHW frames in [0, 1]; ``TinyVAE`` takes and returns Wan's NCTHW in [-1, 1] and converts at the
boundary. Time is processed in chunks with the MemBlock memory carried over, so memory is bounded by the chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class TinyVAEConfig:
    latent_channels: int = 16
    decoder_widths: tuple[int, int, int, int] = (256, 128, 64, 64)
    encoder_width: int = 64
    decoder_time_upscale: tuple[bool, bool, bool] = (False, True, True)    # 4× in time
    encoder_time_downscale: tuple[bool, bool, bool] = (True, True, False)  # 4× in time
    with_encoder: bool = True


TINY_VAE_CONFIGS: dict[str, TinyVAEConfig] = {
    "taew2.1": TinyVAEConfig(),
    "test": TinyVAEConfig(decoder_widths=(16, 16, 8, 8), encoder_width=8),
}


def _conv(n_in: int, n_out: int, stride: int = 1, bias: bool = True) -> nn.Conv2d:
    return nn.Conv2d(n_in, n_out, 3, stride=stride, padding=1, bias=bias)


class Clamp(nn.Module):
    """Soft clamp of latents to (-3, 3)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(x / 3) * 3


class MemBlock(nn.Module):
    """relu(conv3(relu(conv2(relu(conv1([x ‖ past]))))) + skip(x)), per frame; ``past`` = previous frame's x."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(_conv(n_in * 2, n_out), nn.ReLU(), _conv(n_out, n_out), nn.ReLU(),
                                  _conv(n_out, n_out))
        self.skip = nn.Conv2d(n_in, n_out, 1, bias=False) if n_in != n_out else nn.Identity()

    def forward(self, x: torch.Tensor, past: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.conv(torch.cat([x, past], dim=1)) + self.skip(x))


class TPool(nn.Module):
    """[N·T, C, H, W] → [N·T/s, C, H, W]: s consecutive frames stacked on channels, mixed by a 1×1 conv."""

    def __init__(self, n_f: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f * stride, n_f, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, c, h, w = x.shape
        return self.conv(x.reshape(-1, self.stride * c, h, w))


class TGrow(nn.Module):
    """[N·T, C, H, W] → [N·T·s, C, H, W]: a 1×1 conv to s·C channels, channel group j becoming frame s·t + j."""

    def __init__(self, n_f: int, stride: int) -> None:
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(n_f, n_f * stride, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, c, h, w = x.shape
        return self.conv(x).reshape(-1, c, h, w)


def _run(seq: nn.Sequential, x: torch.Tensor, memory: dict[int, torch.Tensor]) -> torch.Tensor:
    """Apply a TAEHV layer stack to one time chunk x [N, T, C, H, W] → [N, T', C', H', W'].

    ``memory[i]`` is MemBlock i's last input frame of the previous chunk [N, 1, C, H, W] (absent: zeros).
    """
    n, t = x.shape[:2]
    x = x.reshape(n * t, *x.shape[2:])  # [N·T, C, H, W]: frames are independent except in temporal layers
    for i, layer in enumerate(seq):
        if isinstance(layer, MemBlock):
            cur = x.view(n, t, *x.shape[1:])
            prev = memory.get(i)
            if prev is None:
                prev = torch.zeros_like(cur[:, :1])
            past = torch.cat([prev, cur[:, :-1]], dim=1).reshape(x.shape)  # frame t sees frame t-1
            memory[i] = cur[:, -1:].clone()
            x = layer(x, past)
        else:
            if isinstance(layer, TPool) and t % layer.stride:
                raise ValueError(f"TPool needs a multiple of {layer.stride} frames per chunk, got {t}")
            x = layer(x)
            t = x.shape[0] // n
    return x.view(n, t, *x.shape[1:])


class TinyVAE(nn.Module):
    """TAEW2.1. ``decode``: normalised latents → video in [-1, 1]; ``encode`` (if built): the reverse."""

    def __init__(self, cfg: TinyVAEConfig = TINY_VAE_CONFIGS["taew2.1"]) -> None:
        super().__init__()
        self.cfg = cfg
        z, e = cfg.latent_channels, cfg.encoder_width
        if cfg.with_encoder:
            layers: list[nn.Module] = [_conv(3, e), nn.ReLU()]
            for down in cfg.encoder_time_downscale:
                layers += [TPool(e, 2 if down else 1), _conv(e, e, stride=2, bias=False),
                           MemBlock(e, e), MemBlock(e, e), MemBlock(e, e)]
            self.encoder = nn.Sequential(*layers, _conv(e, z))
        n_f = cfg.decoder_widths
        layers = [Clamp(), _conv(z, n_f[0]), nn.ReLU()]
        for i, up in enumerate(cfg.decoder_time_upscale):
            layers += [MemBlock(n_f[i], n_f[i]), MemBlock(n_f[i], n_f[i]), MemBlock(n_f[i], n_f[i]),
                       nn.Upsample(scale_factor=2), TGrow(n_f[i], 2 if up else 1),
                       _conv(n_f[i], n_f[i + 1], bias=False)]
        self.decoder = nn.Sequential(*layers, nn.ReLU(), _conv(n_f[3], 3))
        self.t_upscale = 2 ** sum(cfg.decoder_time_upscale)
        self.t_downscale = 2 ** sum(cfg.encoder_time_downscale)

    @property
    def dtype(self) -> torch.dtype:
        return self.decoder[1].weight.dtype

    @property
    def device(self) -> torch.device:
        return self.decoder[1].weight.device

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, *, chunk: int = 2) -> torch.Tensor:
        """Normalised latents [B, 16, T', h, w] → video [B, 3, 1 + 4(T'-1), 8h, 8w] fp32 in [-1, 1].

        Each latent yields 4 frames; the first 3 frames of latent 0 are dropped, as in TAEHV, so frame counts
        match the Wan VAE. ``chunk`` latents are decoded at a time (memory ∝ chunk, result independent of it).
        """
        b, z, n, h, w = latents.shape
        if z != self.cfg.latent_channels:
            raise ValueError(f"latents must have {self.cfg.latent_channels} channels, got {z}")
        trim = self.t_upscale - 1
        out = torch.empty(b, 3, n * self.t_upscale - trim, 8 * h, 8 * w, device=self.device)
        x = latents.to(device=self.device, dtype=self.dtype).transpose(1, 2)  # NCTHW → NTCHW
        memory: dict[int, torch.Tensor] = {}
        made = 0  # frames produced so far, before trimming
        for s in range(0, n, chunk):
            frames = _run(self.decoder, x[:, s : s + chunk], memory)  # [B, 4·chunk, 3, 8h, 8w], ~[0, 1]
            frames = frames.float().clamp_(0, 1).mul_(2).sub_(1).transpose(1, 2)  # → NCTHW in [-1, 1]
            lo = max(trim - made, 0)  # drop the warm-up frames, which only exist in the first chunk
            out[:, :, made + lo - trim : made + frames.shape[2] - trim] = frames[:, :, lo:]
            made += frames.shape[2]
        return out

    @torch.no_grad()
    def encode(self, video: torch.Tensor, *, chunk: int = 8) -> torch.Tensor:
        """Video [B, 3, T, H, W] in [-1, 1] (H, W multiples of 8) → normalised latents [B, 16, ⌈T/4⌉, H/8, W/8].

        As TAEHV, the clip is padded at the end with copies of its last frame to a multiple of 4 frames, so
        T = 1 + 4k gives 1 + k latents. ``chunk`` latents are produced at a time.
        """
        if not self.cfg.with_encoder:
            raise ValueError("this tiny VAE was loaded without an encoder")
        b, c, t, h, w = video.shape
        x = video.to(device=self.device, dtype=self.dtype).transpose(1, 2).add(1).div(2)  # NTCHW in [0, 1]
        pad = -t % self.t_downscale
        if pad:
            x = torch.cat([x, x[:, -1:].expand(-1, pad, -1, -1, -1)], dim=1)
        n = x.shape[1] // self.t_downscale
        out = torch.empty(b, self.cfg.latent_channels, n, h // 8, w // 8, device=self.device)
        memory: dict[int, torch.Tensor] = {}
        step = chunk * self.t_downscale
        for s in range(0, x.shape[1], step):
            lat = _run(self.encoder, x[:, s : s + step], memory)  # [B, chunk, 16, H/8, W/8]
            out[:, :, s // self.t_downscale : s // self.t_downscale + lat.shape[1]] = lat.float().transpose(1, 2)
        return out
