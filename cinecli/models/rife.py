"""RIFE v4.26 (Practical-RIFE's IFNet_HDv3, v4.25/4.26 layout): a learned frame interpolator for slow motion.

IFNet estimates, coarse to fine, two optical flows (in-between frame → frame 0, → frame 1) and a blend mask for an
arbitrary timestep t in (0, 1), then backward-warps both frames and blends them. Five IFBlocks of widths
192/128/96/64/32 each see the frames at 1/16, 1/8, 1/4, 1/2 and full resolution (the scale list) and refine the
previous block's flow; a small feature Head gives each frame 4 channels that are warped along with it.

The published ``flownet.pkl`` (``RIFEv4.26_0921.zip``) is a plain state dict saved from a DDP model, so every key
starts with ``module.``. It is loaded as it is, strictly: every parameter has a tensor of its exact shape and every
tensor has a parameter (save the training-only ``teacher.``/``caltime.`` modules, skipped by name), so a file of
another RIFE version (16-channel Head of v4.22, …) is refused by name, never half-loaded. Module names below
mirror the published key layout for that reason:

    encode.cnn{0,1,2}.{weight,bias}     Conv2d 3→16 (stride 2), 16→16, 16→16
    encode.cnn3.{weight,bias}           ConvTranspose2d 16→4 (×2)
    block{i}.conv0.{0,1}.0.{weight,bias}   Conv2d in→c/2 (stride 2), c/2→c (stride 2)
    block{i}.convblock.{0..7}.conv.{weight,bias}, .beta [1, c, 1, 1]   residual 3×3 convs scaled by beta
    block{i}.lastconv.0.{weight,bias}   ConvTranspose2d c→52 (×2), then PixelShuffle(2) → 13 channels at ×4

Frames of any size work: they are padded (zeros, as Practical-RIFE's scripts do) to a multiple of 64 — the
coarsest scale (16) times the block's own ×4 down-sampling, the least that makes every resize exact — and cropped
back. (Practical-RIFE's scripts pad to 128; the extra 64 px of zeros only moves the border slightly.)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import WeightsError


@dataclass(frozen=True)
class RifeConfig:
    widths: tuple[int, ...] = (192, 128, 96, 64, 32)  # IFBlock channels, coarse to fine
    scales: tuple[int, ...] = (16, 8, 4, 2, 1)  # each block sees the frames at 1/scale
    head_channels: int = 4  # features per frame from the Head (v4.25+; 16 before)
    carried: int = 8  # features a block hands to the next, beside 4 flow and 1 mask channels
    res_convs: int = 8  # residual convs per block

    @property
    def pad_multiple(self) -> int:
        return self.scales[0] * 4  # 1/16 resize, then two stride-2 convs: every size must stay whole

    def block_inputs(self, first: bool) -> int:
        """Channels into a block: both frames (3+3), both features, the timestep; later blocks add the previous
        mask and carried features (warped frames and features in place of the originals) and the flow (4)."""
        base = 6 + 2 * self.head_channels + 1
        return base if first else base + 1 + self.carried + 4


V4_26 = RifeConfig()
DDP_PREFIX = "module."
# Modules the published training code builds beside IFNet's inference path (the distillation teacher block and the
# timestep estimator; commented out in the published IFNet_HDv3.py). A checkpoint saved during training carries
# them: the published flownet.pkl is 24.6 MB where IFNet's own tensors are 22.7 MB, about what these two add.
# They are skipped by name; any other key IFNet does not have is an error.
TRAINING_ONLY = ("teacher.", "caltime.")


def _act() -> nn.Module:
    return nn.LeakyReLU(0.2)


class Head(nn.Module):
    """Per-frame features: [B, 3, H, W] → [B, head_channels, H, W] (a stride-2 conv, two convs, a ×2 up-conv)."""

    def __init__(self, out: int) -> None:
        super().__init__()
        self.cnn0 = nn.Conv2d(3, 16, 3, 2, 1)
        self.cnn1 = nn.Conv2d(16, 16, 3, 1, 1)
        self.cnn2 = nn.Conv2d(16, 16, 3, 1, 1)
        self.cnn3 = nn.ConvTranspose2d(16, out, 4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.leaky_relu(self.cnn0(x), 0.2)  # [B, 16, H/2, W/2]
        x = F.leaky_relu(self.cnn1(x), 0.2)
        x = F.leaky_relu(self.cnn2(x), 0.2)
        return self.cnn3(x)  # [B, out, H, W]; no activation on the features


class ResConv(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, 1, 1)
        self.beta = nn.Parameter(torch.ones(1, c, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.leaky_relu(self.conv(x) * self.beta + x, 0.2)


class IFBlock(nn.Module):
    """One refinement level: inputs at 1/scale → (flow [B, 4, H, W], mask logit [B, 1, H, W], carried features)."""

    def __init__(self, cin: int, c: int, cfg: RifeConfig) -> None:
        super().__init__()
        out = 4 + 1 + cfg.carried  # flow, mask, carried features
        # nested Sequentials only to keep the published key names (conv0.1.0.weight)
        self.conv0 = nn.Sequential(nn.Sequential(nn.Conv2d(cin, c // 2, 3, 2, 1), _act()),
                                   nn.Sequential(nn.Conv2d(c // 2, c, 3, 2, 1), _act()))
        self.convblock = nn.Sequential(*(ResConv(c) for _ in range(cfg.res_convs)))
        self.lastconv = nn.Sequential(nn.ConvTranspose2d(c, out * 4, 4, 2, 1), nn.PixelShuffle(2))

    def forward(self, x: torch.Tensor, flow: torch.Tensor | None, scale: int):
        if scale != 1:
            x = F.interpolate(x, scale_factor=1 / scale, mode="bilinear", align_corners=False)
        if flow is not None:  # flows are in pixels: shrinking the image shrinks them
            if scale != 1:
                flow = F.interpolate(flow, scale_factor=1 / scale, mode="bilinear", align_corners=False)
            x = torch.cat((x, flow / scale), 1)
        y = self.lastconv(self.convblock(self.conv0(x)))  # [B, 13, h, w] at 1/scale (÷4 by conv0, ×4 by lastconv)
        if scale != 1:
            y = F.interpolate(y, scale_factor=scale, mode="bilinear", align_corners=False)  # [B, 13, H, W]
        return y[:, :4] * scale, y[:, 4:5], y[:, 5:]


class Warp:
    """Backward warp: sample ``img`` at (x + flow_x, y + flow_y), bilinear, border padding, corners aligned.

    Coordinates are normalized as the published warp does it (a linspace grid over [-1, 1] plus the flow divided by
    half the side less one), so the same flow samples the same points to the last bit; the grid and the divisors
    are cached per size and device (every pair of a clip has the same size)."""

    def __init__(self) -> None:
        self._cache: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}

    def __call__(self, img: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
        h, w = flow.shape[-2:]
        key = (h, w, flow.device, flow.dtype)
        if key not in self._cache:
            kw = {"device": flow.device, "dtype": flow.dtype}
            ys, xs = torch.meshgrid(torch.linspace(-1.0, 1.0, h, **kw), torch.linspace(-1.0, 1.0, w, **kw),
                                    indexing="ij")
            half = torch.tensor([(img.shape[3] - 1.0) / 2.0, (img.shape[2] - 1.0) / 2.0], **kw).view(1, 2, 1, 1)
            self._cache[key] = torch.stack((xs, ys))[None], half  # [1, 2, H, W] (x, y) in [-1, 1]; [1, 2, 1, 1]
        base, half = self._cache[key]
        grid = (base + flow / half).permute(0, 2, 3, 1)  # [B, H, W, 2]
        return F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=True)


class IFNet(nn.Module):
    """frames in [0, 1]: ``forward(img0, img1, t)`` → the frame at time t ∈ (0, 1) between them."""

    def __init__(self, cfg: RifeConfig = V4_26) -> None:
        super().__init__()
        self.cfg = cfg
        for i, c in enumerate(cfg.widths):
            self.add_module(f"block{i}", IFBlock(cfg.block_inputs(i == 0), c, cfg))
        self.encode = Head(cfg.head_channels)
        self.warp = Warp()

    def blocks(self) -> list[IFBlock]:
        return [getattr(self, f"block{i}") for i in range(len(self.cfg.widths))]

    def features(self, img: torch.Tensor) -> torch.Tensor:
        """Head features of padded frames [B, 3, H, W] (computed once per frame of a clip, see ``between``)."""
        return self.encode(img)

    def flow_and_mask(self, img0, img1, f0, f1, t: torch.Tensor):
        """Padded frames and their features [B, ·, H, W], t [B] → flow [B, 4, H, W], mask logit [B, 1, H, W]."""
        b, _, h, w = img0.shape
        tmap = t.to(img0.dtype).view(b, 1, 1, 1).expand(b, 1, h, w)  # the timestep as a constant channel
        flow = mask = carried = None
        warped0, warped1, wf0, wf1 = img0, img1, f0, f1
        for block, scale in zip(self.blocks(), self.cfg.scales):
            if flow is None:
                flow, mask, carried = block(torch.cat((img0, img1, f0, f1, tmap), 1), None, scale)
            else:
                wf0, wf1 = self.warp(f0, flow[:, :2]), self.warp(f1, flow[:, 2:])
                x = torch.cat((warped0, warped1, wf0, wf1, tmap, mask, carried), 1)  # [B, 28, H, W]
                delta, mask, carried = block(x, flow, scale)
                flow = flow + delta
            warped0, warped1 = self.warp(img0, flow[:, :2]), self.warp(img1, flow[:, 2:])
        return flow, mask, warped0, warped1

    def between(self, img0, img1, f0, f1, t: torch.Tensor) -> torch.Tensor:
        """Padded frames [B, 3, H, W] and their features, t [B] → the in-between frames [B, 3, H, W]."""
        _, mask, warped0, warped1 = self.flow_and_mask(img0, img1, f0, f1, t)
        m = torch.sigmoid(mask)
        return warped0 * m + warped1 * (1 - m)

    def pad(self, img: torch.Tensor) -> torch.Tensor:
        """[B, 3, H, W] → zero-padded right and bottom to the multiple the scale list needs."""
        m = self.cfg.pad_multiple
        h, w = img.shape[-2:]
        return F.pad(img, (0, -w % m, 0, -h % m))

    def forward(self, img0: torch.Tensor, img1: torch.Tensor, t: float | torch.Tensor = 0.5) -> torch.Tensor:
        """img0, img1 [B, 3, H, W] in [0, 1] (any H, W) → [B, 3, H, W] at time t."""
        h, w = img0.shape[-2:]
        p0, p1 = self.pad(img0), self.pad(img1)
        t = torch.as_tensor(t, device=img0.device, dtype=img0.dtype).expand(img0.shape[0])
        out = self.between(p0, p1, self.features(p0), self.features(p1), t)
        return out[..., :h, :w]


# --- loading -------------------------------------------------------------------------------------------------------
def strip_ddp(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The published file's keys carry DDP's ``module.`` prefix; a file saved without DDP has none. Either way the
    whole file must agree: a mix means two models were merged."""
    prefixed = [k.startswith(DDP_PREFIX) for k in state]
    if any(prefixed) and not all(prefixed):
        raise WeightsError("RIFE weights mix keys with and without DDP's 'module.' prefix")
    return {k.removeprefix(DDP_PREFIX): v for k, v in state.items()}


def load_state(net: IFNet, state: Mapping[str, torch.Tensor], name: str = "RIFE weights") -> IFNet:
    """Fill ``net`` strictly from a (published) state dict: every key used, none missing, every shape exact."""
    state = strip_ddp(state)
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    extra = sorted(k for k in set(state) - set(own) if not k.startswith(TRAINING_ONLY))
    if missing or extra:
        what = [f"{len(missing)} missing (e.g. {missing[0]})"] if missing else []
        what += [f"{len(extra)} unexpected (e.g. {extra[0]})"] if extra else []
        raise WeightsError(f"{name} do not fit RIFE v4.26's IFNet: {', '.join(what)} keys")
    for k, v in own.items():
        if tuple(state[k].shape) != tuple(v.shape):
            raise WeightsError(f"{name} do not fit RIFE v4.26's IFNet: {k} is {list(state[k].shape)}, "
                               f"expected {list(v.shape)}")
    net.load_state_dict({k: state[k].float() for k in own}, strict=True)
    return net


def is_rife_state(keys) -> bool:
    """Whether a state dict's key names are IFNet's (any version): used to recognise a flownet.pkl in a folder."""
    names = {k.removeprefix(DDP_PREFIX) for k in keys}
    return "encode.cnn0.weight" in names and "block0.conv0.0.0.weight" in names and "block4.lastconv.0.weight" in names


def load_rife(path: str | Path, device: torch.device | str = "cpu", cfg: RifeConfig = V4_26) -> IFNet:
    """A ``flownet.pkl`` (read with ``torch.load(weights_only=True)``: a pickle that would run code is refused)
    → an IFNet in eval mode, fp32, on ``device``."""
    from ..core.devices import module_to_device
    from ..weights.files import check_weight_file, load_pickle

    check_weight_file(Path(path))
    net = load_state(IFNet(cfg), load_pickle(Path(path)), f"RIFE weights {Path(path).name}")
    return module_to_device(net.eval().requires_grad_(False), device)


def random_state(cfg: RifeConfig = V4_26, seed: int = 0, ddp: bool = True) -> dict[str, torch.Tensor]:
    """Random weights in the published layout (``module.`` keys), scaled so a forward pass stays finite and
    flows stay a few pixels: for tests and benchmarks (the real file cannot be downloaded there)."""
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in IFNet(cfg).state_dict().items():
        if k.endswith("beta"):
            t = 1 + 0.1 * torch.randn(v.shape, generator=gen)
        else:
            fan_in = v[0].numel() if v.dim() > 1 else 1
            t = torch.randn(v.shape, generator=gen) * (0.5 / fan_in**0.5 if v.dim() > 1 else 0.02)
        state[(DDP_PREFIX if ddp else "") + k] = t
    return state
