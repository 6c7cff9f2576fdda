"""Which frame interpolation for ``--slowdown``: PSNR of synthesized in-between frames against the true ones.

A synthetic scene with known in-between frames: a textured disc translating and rotating over a textured
background, rendered at N× the frame rate (anti-aliased, bilinear texture sampling). Every N-th frame is kept,
the N−1 frames between are dropped and re-synthesized by each method of ``cinecli.output.slowdown.METHODS``, and the
synthesized frames are compared with the rendered ones: PSNR over the whole frame, and over the moving region
(pixels the disc covers in either neighbouring true frame; the static background is easy for every method).

    .venv/bin/python bench/slowdown.py                       # 832x480, 9 kept frames, N = 2, 3, 4, three speeds
    .venv/bin/python bench/slowdown.py --size 416x240 --frames 5   # quick

Results: see the table printed by the run, copied into cinecli/slowdown.py's docstring.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from cinecli.output.slowdown import METHODS, interpolate

SPEEDS = {"slow": (4.0, 2.0), "medium": (12.0, 5.0), "fast": (24.0, 10.0)}  # (px, degrees) per kept frame


def smooth_noise(h: int, w: int, rng: np.random.Generator, scales=(4, 12, 40)) -> np.ndarray:
    """[h, w, 3] float in [0, 255]: noise at several scales (Fourier low-pass), so block matching has texture."""
    out = np.zeros((h, w, 3), np.float32)
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    for s in scales:
        lowpass = np.exp(-((fy**2 + fx**2) * (s * np.pi) ** 2))
        for c in range(3):
            field = np.fft.irfft2(np.fft.rfft2(rng.standard_normal((h, w))) * lowpass, s=(h, w))
            out[..., c] += field / (field.std() + 1e-8)
    out = (out - out.min()) / (out.max() - out.min())
    return out * 255


def bilinear(tex: np.ndarray, y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Sample tex [h, w, 3] at float coordinates (clamped at the border) → [..., 3]."""
    h, w = tex.shape[:2]
    y, x = np.clip(y, 0, h - 1.001), np.clip(x, 0, w - 1.001)
    y0, x0 = y.astype(np.int64), x.astype(np.int64)
    dy, dx = (y - y0)[..., None], (x - x0)[..., None]
    return (tex[y0, x0] * (1 - dy) * (1 - dx) + tex[y0, x0 + 1] * (1 - dy) * dx
            + tex[y0 + 1, x0] * dy * (1 - dx) + tex[y0 + 1, x0 + 1] * dy * dx)


def render(kept: int, factor: int, size: tuple[int, int], speed: tuple[float, float], seed: int = 0):
    """True frames [(kept−1)·factor+1, H, W, 3] uint8 and disc masks [same T, H, W] bool."""
    w, h = size
    rng = np.random.default_rng(seed)
    background = smooth_noise(h, w, rng)
    radius = 0.18 * h
    disc_tex = smooth_noise(int(2 * radius) + 2, int(2 * radius) + 2, rng, scales=(2, 6, 20))
    disc_tex = 0.5 * disc_tex + 0.5 * (255 - disc_tex.mean(axis=(0, 1)))  # contrast against the background
    px, deg = speed
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    frames, masks = [], []
    for i in range((kept - 1) * factor + 1):
        t = i / factor  # in kept-frame units
        cx = w / 2 - px * (kept - 1) / 2 + px * t  # straight path through the centre, slight vertical drift
        cy = h / 2 + 0.25 * px * (t - (kept - 1) / 2)
        theta = np.deg2rad(deg * t)
        dx, dy = xx - cx, yy - cy
        lx = np.cos(theta) * dx + np.sin(theta) * dy  # rotate into the disc's own frame
        ly = -np.sin(theta) * dx + np.cos(theta) * dy
        dist = np.sqrt(dx**2 + dy**2)
        alpha = np.clip(radius - dist + 0.5, 0, 1)[..., None]  # one-pixel anti-aliased edge
        disc = bilinear(disc_tex, ly + radius, lx + radius)
        frames.append((background * (1 - alpha) + disc * alpha).round().clip(0, 255).astype(np.uint8))
        masks.append(dist < radius + 1)
    return np.stack(frames), np.stack(masks)


def psnr(mse: float) -> float:
    return float(10 * np.log10(255**2 / max(mse, 1e-10)))


def score(true: np.ndarray, masks: np.ndarray, synth: np.ndarray, factor: int) -> tuple[float, float]:
    """(PSNR all pixels, PSNR moving region) over the synthesized frames only."""
    idx = [i for i in range(true.shape[0]) if i % factor]
    err = (synth[idx].astype(np.float64) - true[idx]) ** 2  # [S, H, W, 3]
    moving = masks[[i - i % factor for i in idx]] | masks[[i - i % factor + factor for i in idx]] | masks[idx]
    return psnr(err.mean()), psnr(err[moving].mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", default="832x480")
    ap.add_argument("--frames", type=int, default=9, help="kept frames")
    ap.add_argument("--factors", default="2,3,4")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--json", help="write all numbers here")
    args = ap.parse_args()
    size = tuple(int(v) for v in args.size.split("x"))
    factors = [int(f) for f in args.factors.split(",")]
    methods = args.methods.split(",")
    rows: dict[str, dict] = {m: {} for m in methods}
    for factor in factors:
        for speed_name, speed in SPEEDS.items():
            true, masks = render(args.frames, factor, size, speed)
            kept = true[::factor]
            for m in methods:
                t0 = time.perf_counter()
                synth = interpolate(kept, factor, m)
                seconds = time.perf_counter() - t0
                rows[m][f"{speed_name} x{factor}"] = (*score(true, masks, synth, factor), seconds)
    cols = [f"{s} x{f}" for f in factors for s in SPEEDS]
    print(f"PSNR dB of synthesized frames, whole frame / moving region; {size[0]}x{size[1]}, {args.frames} kept frames")
    print(f"{'method':24s}" + "".join(f"{c:>16s}" for c in cols) + f"{'mean':>16s}{'s/run':>8s}")
    for m in sorted(methods, key=lambda m: -np.mean([v[1] for v in rows[m].values()])):
        vals = rows[m]
        cells = "".join(f"{vals[c][0]:7.2f}/{vals[c][1]:6.2f}  " for c in cols)
        mean = f"{np.mean([v[0] for v in vals.values()]):7.2f}/{np.mean([v[1] for v in vals.values()]):6.2f}  "
        print(f"{m:24s}{cells}{mean}{np.mean([v[2] for v in vals.values()]):8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
