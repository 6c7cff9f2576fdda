"""FFmpeg's frame interpolation (``--interpolator minterpolate``): N−1 synthesized frames between each pair of
frames, played at the same frame rate, so the same motion lasts N times longer (F frames → (F−1)·N+1). RIFE is the
default interpolator (output/interpolate.py chooses); this is what runs without its weights.

The in-between frames come from FFmpeg's filters run through PyAV's filter graph (the FFmpeg inside the ``av``
wheel cine already needs; no new dependency). CineMobile made its slow-motion training data the same way, with
2× frame interpolation (FILM; paper §4 "Model & Datasets"). The generated frames themselves pass through
untouched: only the in-between frames are synthesized.

Which filter: measured by ``bench/slowdown.py`` (``.venv/bin/python bench/slowdown.py``) on a synthetic scene with
known in-between frames: a textured disc translating and rotating over a textured background, rendered at N× the
frame rate at 832x480, 9 kept frames, the N−1 frames between dropped and re-synthesized. PSNR in dB of the
synthesized frames against the true ones, whole frame / moving region (where the disc is), mean over N = 2, 3, 4;
speeds per kept frame: slow 4 px 2°, medium 12 px 5°, fast 24 px 10° (s/run: a shared, loaded 2-core CPU, rough):

    method                 slow            medium          fast            mean           s/run
    mci-bilat-obmc         48.17 / 38.24   44.24 / 33.24   40.98 / 29.90   44.46 / 33.79   10.2   ← DEFAULT_METHOD
    mci-bilat-obmc-vsbmc   48.17 / 38.24   44.07 / 33.03   40.91 / 29.81   44.38 / 33.69    7.5
    mci-bilat-aobmc        48.01 / 37.95   44.18 / 33.12   40.91 / 29.79   44.37 / 33.62    8.3
    mci-bidir-* (all 4)    47.95 / 37.88   44.31 / 33.29   40.63 / 29.55   44.30 / 33.57   17.7-39.6
    mci-bilat-aobmc-vsbmc  48.01 / 37.95   44.03 / 32.98   40.81 / 29.69   44.29 / 33.54    7.9
    blend (numpy)          44.19 / 32.11   37.99 / 26.15   35.69 / 24.20   39.29 / 27.49    1.2
    minterpolate blend     43.52 / 32.05   37.82 / 26.14   35.58 / 24.19   38.97 / 27.46    0.9
    framerate              43.52 / 32.05   37.82 / 26.14   35.58 / 24.19   38.97 / 27.46    0.6

Motion compensation wins by 5-6 dB over any cross-fade at every speed and factor; among its modes bilateral
matching with plain OBMC is best on average (+0.2 dB over bidirectional, which is also about twice as slow) and
is the default. With me_mode=bidir, mc_mode and vsbmc change nothing (identical outputs): minterpolate applies them
only to bilateral motion estimation. Below ~160x96 pixels minterpolate's blocks find no motion and it is no better
than blending; cine's frames are far larger.
"""

from __future__ import annotations

from fractions import Fraction

import numpy as np

from ..core.errors import UsageError
from ..effects.rules import SLOWDOWNS, parse_slowdown  # noqa: F401 - the factors, and their parser for callers here

# name → FFmpeg filter chain ({fps} is the output rate), or None for a plain linear cross-fade computed here.
# minterpolate works on YUV only: yuv444p keeps full colour resolution (the round trip alone: 52 dB PSNR, invisible).
# scd=none: a generated clip has no scene cuts, and minterpolate's cut detector would repeat frames on fast motion.
_MCI = "format=yuv444p,minterpolate=fps={fps}:mi_mode=mci:me_mode=%s:mc_mode=%s:vsbmc=%d:scd=none,format=rgb24"
METHODS: dict[str, str | None] = {
    "blend": None,
    "framerate": "format=yuv444p,framerate=fps={fps}:scene=100,format=rgb24",
    "mi-blend": "format=yuv444p,minterpolate=fps={fps}:mi_mode=blend:scd=none,format=rgb24",
    **{f"mci-{me}-{mc}{'-vsbmc' if vs else ''}": _MCI % (me, mc, vs)
       for me in ("bidir", "bilat") for mc in ("obmc", "aobmc") for vs in (0, 1)},
}
DEFAULT_METHOD = "mci-bilat-obmc"  # chosen by bench/slowdown.py (module docstring)
_RATE = 24  # nominal input rate for the filter graph; only the ratio N matters


def output_frames(frames: int, factor: int) -> int:
    """Frame count after up-sampling ``frames`` by ``factor``."""
    return (frames - 1) * factor + 1 if frames > 1 else frames


def interpolate(frames: np.ndarray, factor: int, method: str = DEFAULT_METHOD) -> np.ndarray:
    """frames [T, H, W, 3] uint8 → [(T−1)·factor+1, H, W, 3] uint8; frame k·factor of the result is frame k."""
    if method not in METHODS:
        raise UsageError(f"unknown interpolation method '{method}' (use {', '.join(METHODS)})")
    t = frames.shape[0]
    if factor == 1 or t < 2:
        return frames
    if METHODS[method] is None:
        out = _blend(frames, factor)
    else:
        out = _filter(frames, factor, METHODS[method].format(fps=_RATE * factor))
    out[::factor] = frames  # the generated frames pass through exactly (the YUV round trip would touch them)
    return out


def _blend(frames: np.ndarray, factor: int) -> np.ndarray:
    a, b = frames[:-1].astype(np.float32), frames[1:].astype(np.float32)  # [T-1, H, W, 3] each
    w = (np.arange(factor, dtype=np.float32) / factor)[None, :, None, None, None]  # [1, N, 1, 1, 1]
    mixed = (a[:, None] * (1 - w) + b[:, None] * w).round().astype(np.uint8)  # [T-1, N, H, W, 3]
    return np.concatenate([mixed.reshape(-1, *frames.shape[1:]), frames[-1:]])


def _filter(frames: np.ndarray, factor: int, chain: str) -> np.ndarray:
    """Run ``chain`` over the frames at _RATE fps with output rate _RATE·factor; returns exactly the frames wanted."""
    import av

    t, h, w, _ = frames.shape
    want = output_frames(t, factor)
    graph = av.filter.Graph()
    nodes = [graph.add_buffer(width=w, height=h, format="rgb24", time_base=Fraction(1, _RATE))]
    for spec in chain.split(","):
        name, _, args = spec.partition("=")
        nodes.append(graph.add(name, args or None))
    sink = graph.add("buffersink")
    graph.link_nodes(*nodes, sink).configure()
    out: list[np.ndarray] = []

    def drain() -> None:
        while len(out) < want:
            try:
                out.append(sink.pull().to_ndarray(format="rgb24"))
            except (av.BlockingIOError, av.EOFError):
                return

    # The last frame is pushed twice: minterpolate needs the frame after a pair to emit the pair's in-betweens.
    for i, frame in enumerate([*frames, frames[-1]]):
        vf = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        vf.pts, vf.time_base = i, Fraction(1, _RATE)
        nodes[0].push(vf)
        drain()
    nodes[0].push(None)
    drain()
    if len(out) < want:
        raise RuntimeError(f"frame interpolation gave {len(out)} frames, expected {want} ({chain})")
    return np.stack(out[:want])
