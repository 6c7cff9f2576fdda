"""Re-timing a clip by frame interpolation: RIFE v4.26 (learned, the default) or FFmpeg's minterpolate.

F frames → (F−1)·N+1 at the same frame rate: frame k·N of the result is input frame k, untouched, and the N−1
frames between input frames i and i+1 are synthesized at timesteps k/N. ``--slowdown N`` (the motion lasts N times
longer), ``--fast-frames`` (generate half the frames, interpolate ×2 back) and ``cine interpolate`` all come here.

RIFE runs each pair once per in-between frame, all N−1 timesteps of a pair in one batch; each frame's Head
features are computed once and reused by the pair on either side of it.
"""

from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..core.errors import UsageError
from ..effects.rules import INTERPOLATORS
from .slowdown import DEFAULT_METHOD, output_frames
from .slowdown import interpolate as minterpolate

if TYPE_CHECKING:
    import torch

    from ..core.timing import Timings
    from ..models.rife_weights import RifeWeights


@dataclass
class Interpolator:
    """The interpolator a run uses, once chosen: ``kind`` rife (with its weights) or minterpolate."""

    kind: str
    weights: RifeWeights | None = None
    device: torch.device | str = "cpu"
    _net: object = None

    @property
    def label(self) -> str:
        """The method as MP4 metadata names it: ``rife-v4.26``, or minterpolate's mode."""
        return "rife-v4.26" if self.kind == "rife" else f"minterpolate {DEFAULT_METHOD}"

    def settings(self) -> dict:
        """What MP4 metadata and reports record: the method, and RIFE's weights by name and sha256."""
        if self.kind != "rife":
            return {"interpolation": self.label}
        return {"interpolation": self.label, "interpolation_weights": self.weights.name,
                "interpolation_sha256": self.weights.sha256}

    def load(self) -> Interpolator:
        """Load RIFE now (strict: a file that does not fit is exit 4 here, before any frame is made or read)."""
        if self.kind == "rife" and self._net is None:
            from ..models.rife import load_rife

            self._net = load_rife(self.weights.path, self.device)
        return self

    def run(self, frames: np.ndarray, factor: int, timings: Timings | None = None) -> np.ndarray:
        """frames [T, H, W, 3] uint8 → [(T−1)·factor+1, H, W, 3] uint8, timed as "interpolate <kind> x<factor>"."""
        if factor == 1 or frames.shape[0] < 2:
            return frames
        with timings.stage(f"interpolate {self.kind} x{factor}") if timings is not None else contextlib.nullcontext():
            if self.kind == "minterpolate":
                return minterpolate(frames, factor)
            return rife_frames(self.load()._net, frames, factor)


def choose(requested: str | None, weights_file=None, device: torch.device | str = "cpu",
           explicit_weights: bool = False) -> Interpolator:
    """``--interpolator`` (None: the default, rife) → an Interpolator whose weights are present (or downloaded).

    RIFE's weights missing with downloads switched off (``--offline``) and no interpolator asked for: minterpolate
    runs instead, said in one line on stderr. Asked for by name (or with ``--weights``), missing weights are exit 4.
    """
    from ..models.rife_weights import locate_rife, resolve_rife
    from ..weights.hub import offline

    if requested is not None and requested not in INTERPOLATORS:
        raise UsageError(f"--interpolator {requested}: must be one of {', '.join(INTERPOLATORS)}")
    if requested == "minterpolate":
        return Interpolator("minterpolate")
    if requested is None and not explicit_weights and offline() and locate_rife(weights_file, record=False).path is None:
        sys.stderr.write("cine: RIFE weights are not here and downloads are off (--offline): interpolating with "
                         "minterpolate instead (fetch RIFE with: cine models pull rife)\n")
        return Interpolator("minterpolate")
    return Interpolator("rife", resolve_rife(weights_file), device)


def _to_tensor(frame: np.ndarray, device) -> torch.Tensor:
    import torch

    return torch.from_numpy(frame).to(device).permute(2, 0, 1)[None].float() / 255  # [1, 3, H, W] in [0, 1]


def rife_frames(net, frames: np.ndarray, factor: int, batch: int = 8) -> np.ndarray:
    """frames [T, H, W, 3] uint8 → [(T−1)·factor+1, H, W, 3] uint8 with RIFE (``net``: models.rife.IFNet)."""
    import torch

    t, h, w, _ = frames.shape
    device = next(net.parameters()).device
    out = np.empty((output_frames(t, factor), h, w, 3), dtype=np.uint8)
    out[::factor] = frames  # the input frames pass through exactly
    steps = torch.arange(1, factor, dtype=torch.float32, device=device) / factor  # [N−1] timesteps k/N
    with torch.inference_mode():
        img1 = net.pad(_to_tensor(frames[0], device))  # [1, 3, Hp, Wp]
        f1 = net.features(img1)
        for i in range(t - 1):
            img0, f0 = img1, f1
            img1 = net.pad(_to_tensor(frames[i + 1], device))
            f1 = net.features(img1)
            for s in range(0, factor - 1, batch):
                ts = steps[s:s + batch]
                n = ts.shape[0]
                mid = net.between(img0.expand(n, -1, -1, -1), img1.expand(n, -1, -1, -1),
                                  f0.expand(n, -1, -1, -1), f1.expand(n, -1, -1, -1), ts)  # [n, 3, Hp, Wp]
                mid = (mid[..., :h, :w].clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)  # [n, H, W, 3]
                out[i * factor + 1 + s: i * factor + 1 + s + n] = mid.cpu().numpy()
    return out
