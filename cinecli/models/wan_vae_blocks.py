"""Building blocks of the Wan2.1 video VAE, named like the original ``Wan2.1_VAE.pth`` checkpoint.

Everything here runs *chunk by chunk* in time: the encoder sees frame 0 alone and then 4 frames at a time, the
decoder one latent frame at a time. Temporal context between chunks lives in a ``CausalCache`` that the caller
creates per encode/decode call; every temporal operation takes one cache slot, in the same order every chunk
(wan2.1-reference.md §C.5). Because a slot holds at most ``CACHE_T`` frames, memory does not grow with clip length.

Tensors are ``[B, C, T, H, W]`` throughout unless stated.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

CACHE_T = 2  # frames of context a kernel-3 causal conv needs from the previous chunk

# Slot marker of an upsample3d that has seen exactly one chunk: the next chunk runs its time conv with *zero*
# context instead of the first chunk's frame (the reference's 'Rep' quirk, kept for bit-compatibility).
REP = "Rep"


class CausalCache:
    """Per-call temporal context: ``slots[i]`` belongs to the i-th cached op visited in a chunk.

    Slots are created on the first chunk (so no conv counting is needed) and overwritten on later ones.
    """

    def __init__(self) -> None:
        self.slots: list[torch.Tensor | str | None] = []
        self.pos = 0

    def start_chunk(self) -> None:
        self.pos = 0

    def get(self) -> torch.Tensor | str | None:
        if self.pos == len(self.slots):
            self.slots.append(None)
        return self.slots[self.pos]

    def put(self, value: torch.Tensor | str) -> None:
        """Store the context for the current op and move on to the next op."""
        self.slots[self.pos] = value
        self.pos += 1

    def conv(self, conv: CausalConv3d, x: torch.Tensor) -> torch.Tensor:
        """Run a causal conv on chunk ``x`` with the previous chunk's tail as front context, then update the slot."""
        prev = self.get()
        tail = x[:, :, -CACHE_T:]  # [B, C, ≤2, H, W]
        if tail.shape[2] < CACHE_T and isinstance(prev, torch.Tensor):
            # A one-frame chunk: keep the last frame of the previous context so the slot still spans 2 frames.
            tail = torch.cat([prev[:, :, -1:], tail], dim=2)
        out = conv(x, prev if isinstance(prev, torch.Tensor) else None)
        self.put(tail.clone())  # clone: a view would keep the whole chunk alive
        return out


class CausalConv3d(nn.Conv3d):
    """Conv3d whose temporal padding sits entirely in front (2·p_t frames), so frame t never sees frame t+1.

    ``context`` (the previous chunk's last frames) replaces that many frames of zero padding.
    """

    def __init__(self, in_dim: int, out_dim: int, kernel: int | tuple[int, int, int],
                 stride: int | tuple[int, int, int] = 1, padding: int | tuple[int, int, int] = 0) -> None:
        super().__init__(in_dim, out_dim, kernel, stride=stride, padding=padding)
        pt, ph, pw = self.padding
        self.front = 2 * pt  # causal: all temporal padding in front, done by hand in forward
        self.padding = (0, ph, pw)  # spatial zero padding inside the conv: no padded copy of a video-sized input

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        front = self.front
        if front > 0:  # one copy: [zeros ‖ context ‖ x] along time → [B, C, front+T, H, W]
            parts = [context.to(x.dtype)] if context is not None else []
            missing = front - (context.shape[2] if context is not None else 0)
            if missing > 0:
                parts.insert(0, x.new_zeros(*x.shape[:2], missing, *x.shape[3:]))
            x = torch.cat([*parts, x], dim=2)
        return super().forward(x)


class RMSNorm(nn.Module):
    """Wan's ``RMS_norm``: L2-normalise over channels, times sqrt(C) and a per-channel ``gamma`` (no bias).

    ``images=True`` is the 2-D variant ([N, C, H, W], gamma (C,1,1)); otherwise 5-D (gamma (C,1,1,1)).
    """

    def __init__(self, dim: int, images: bool = False) -> None:
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, 1, 1) if images else torch.ones(dim, 1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The L2 norm of hundreds of channels loses too much in bf16/fp16: normalise in fp32.
        normed = F.normalize(x.float(), dim=1).to(x.dtype)
        if normed is x:  # cannot happen for a fresh result, but never scale the caller's tensor
            normed = normed.clone()
        return normed.mul_(self.scale).mul_(self.gamma)  # in place: one video-sized buffer, not three


class ResidualBlock(nn.Module):
    """``residual = [norm, SiLU, conv3, norm, SiLU, dropout, conv3]`` (weights at 0, 2, 3, 6) + 1×1×1 ``shortcut``."""

    def __init__(self, in_dim: int, out_dim: int) -> None:
        super().__init__()
        self.residual = nn.Sequential(
            RMSNorm(in_dim), nn.SiLU(), CausalConv3d(in_dim, out_dim, 3, padding=1),
            RMSNorm(out_dim), nn.SiLU(), nn.Identity(),  # index 5 is dropout in training; identity at inference
            CausalConv3d(out_dim, out_dim, 3, padding=1),
        )
        self.shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        h = self.shortcut(x)  # 1×1×1: needs no temporal context
        # In-place SiLU and sum on fresh buffers: the same numbers with fewer video-sized allocations live.
        x = F.silu(self.residual[0](x), inplace=True)
        x = cache.conv(self.residual[2], x)
        x = F.silu(self.residual[3](x), inplace=True)
        x = cache.conv(self.residual[6], x)
        return x.add_(h)


class AttentionBlock(nn.Module):
    """Single-head self-attention over the H·W positions of each frame separately (time folded into batch)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, images=True)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor, cache: CausalCache | None = None) -> torch.Tensor:
        b, c, t, h, w = x.shape
        identity = x
        x = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)  # [BT, C, H, W]
        qkv = self.to_qkv(self.norm(x))  # [BT, 3C, H, W]
        qkv = qkv.reshape(b * t, 1, 3 * c, h * w).transpose(2, 3)  # [BT, 1, HW, 3C]
        q, k, v = qkv.chunk(3, dim=-1)  # each [BT, 1, HW, C]
        x = F.scaled_dot_product_attention(q, k, v)  # [BT, 1, HW, C]
        x = x.squeeze(1).transpose(1, 2).reshape(b * t, c, h, w)
        x = self.proj(x)
        x = x.view(b, t, c, h, w).permute(0, 2, 1, 3, 4)  # [B, C, T, H, W]
        return x + identity


class Upsample2x(nn.Module):
    """Nearest-exact 2× spatial upsampling, computed in fp32 as the reference does (some backends lack bf16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x.float(), scale_factor=2.0, mode="nearest-exact").to(x.dtype)


class Resample(nn.Module):
    """Spatial 2× down/up-sampling per frame, plus (``*3d``) a causal 2× temporal down/up-sampling.

    Modes: ``downsample2d``, ``downsample3d`` (keep ``dim``), ``upsample2d``, ``upsample3d`` (``dim`` → ``dim//2``).
    """

    def __init__(self, dim: int, mode: str) -> None:
        super().__init__()
        self.mode = mode
        if mode.startswith("downsample"):
            # Asymmetric (right/bottom) zero pad then stride 2: H → H/2 exactly, as in the checkpoint's training.
            self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        elif mode.startswith("upsample"):
            self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, dim // 2, 3, padding=1))
        else:
            raise ValueError(f"unknown resample mode {mode!r}")
        if mode == "downsample3d":
            self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1))
        elif mode == "upsample3d":
            self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0))

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        if self.mode == "upsample3d":
            x = self._time_up(x, cache)  # [B, C, T or 2T, H, W]
        b, c, t, h, w = x.shape
        x = self.resample(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))  # [BT, C', H', W']
        x = x.view(b, t, *x.shape[1:]).permute(0, 2, 1, 3, 4)  # [B, C', T, H', W']
        if self.mode == "downsample3d":
            x = self._time_down(x, cache)
        return x

    def _time_up(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        """[B, C, T, H, W] → [B, C, 2T, H, W]; the very first chunk stays 1 frame (latent 0 → 1 output frame)."""
        prev = cache.get()
        if prev is None:
            cache.put(REP)
            return x
        b, c, t, h, w = x.shape
        tail = x[:, :, -CACHE_T:]
        if tail.shape[2] < CACHE_T:
            front = torch.zeros_like(tail) if prev is REP else prev[:, :, -1:]
            tail = torch.cat([front, tail], dim=2)
        # After 'Rep' the conv gets zero padding, not the first chunk's frame (reference quirk, see REP).
        y = self.time_conv(x, None if prev is REP else prev)  # [B, 2C, T, H, W]
        cache.put(tail.clone())
        y = y.view(b, 2, c, t, h, w)
        # Interleave the two channel halves in time: frame t → output frames 2t, 2t+1.
        return torch.stack((y[:, 0], y[:, 1]), dim=3).reshape(b, c, 2 * t, h, w)

    def _time_down(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        """[B, C, T, H, W] → [B, C, T/2, H, W] (stride-2 conv over [last previous frame, x]); chunk 0 passes through."""
        prev = cache.get()
        if prev is None:
            cache.put(x[:, :, -1:].clone())  # only its last frame is ever used as context
            return x
        tail = x[:, :, -1:].clone()
        x = self.time_conv(torch.cat([prev[:, :, -1:], x], dim=2))  # 5 → 2 frames, or 3 → 1
        cache.put(tail)
        return x


def _forward_seq(seq: nn.Sequential, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
    for layer in seq:
        x = layer(x, cache)
    return x


class Encoder3d(nn.Module):
    """Video [B, 3, T, H, W] → [B, 2·z, T', H/8, W/8] (mu ‖ log-var) for one chunk, with causal context."""

    def __init__(self, dim: int, z_dim: int, dim_mult: tuple[int, ...], num_res_blocks: int,
                 temporal_downsample: tuple[bool, ...]) -> None:
        super().__init__()
        dims = [dim * m for m in (1, *dim_mult)]
        self.conv1 = CausalConv3d(3, dims[0], 3, padding=1)
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                blocks.append(Resample(out_dim, "downsample3d" if temporal_downsample[i] else "downsample2d"))
        self.downsamples = nn.Sequential(*blocks)
        top = dims[-1]
        self.middle = nn.Sequential(ResidualBlock(top, top), AttentionBlock(top), ResidualBlock(top, top))
        self.head = nn.Sequential(RMSNorm(top), nn.SiLU(), CausalConv3d(top, z_dim * 2, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = cache.conv(self.conv1, x)
        x = _forward_seq(self.downsamples, x, cache)
        x = _forward_seq(self.middle, x, cache)
        return cache.conv(self.head[2], F.silu(self.head[0](x), inplace=True))


class Decoder3d(nn.Module):
    """Latent [B, z, 1, h, w] (one chunk) → video [B, 3, 1 (first chunk) or 4, 8h, 8w], unclamped."""

    def __init__(self, dim: int, z_dim: int, dim_mult: tuple[int, ...], num_res_blocks: int,
                 temporal_upsample: tuple[bool, ...]) -> None:
        super().__init__()
        dims = [dim * m for m in (dim_mult[-1], *dim_mult[::-1])]
        self.conv1 = CausalConv3d(z_dim, dims[0], 3, padding=1)
        self.middle = nn.Sequential(ResidualBlock(dims[0], dims[0]), AttentionBlock(dims[0]),
                                    ResidualBlock(dims[0], dims[0]))
        blocks: list[nn.Module] = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # the previous stage's upsampler halved the channels
            for _ in range(num_res_blocks + 1):
                blocks.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i != len(dim_mult) - 1:
                blocks.append(Resample(out_dim, "upsample3d" if temporal_upsample[i] else "upsample2d"))
        self.upsamples = nn.Sequential(*blocks)
        self.head = nn.Sequential(RMSNorm(dims[-1]), nn.SiLU(), CausalConv3d(dims[-1], 3, 3, padding=1))

    def forward(self, x: torch.Tensor, cache: CausalCache) -> torch.Tensor:
        x = cache.conv(self.conv1, x)
        x = _forward_seq(self.middle, x, cache)
        x = _forward_seq(self.upsamples, x, cache)
        return cache.conv(self.head[2], F.silu(self.head[0](x), inplace=True))
