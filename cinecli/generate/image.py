"""Input photos: read safely, orient, convert to RGB, and fit to a size the model accepts.

Sizes follow the reference: from a pixel budget (480×832 for 480p) and the photo's aspect ratio, each side is
floored to a multiple of 16 (8× VAE stride × 2 patch). Since that rounding changes the aspect ratio slightly,
``fit`` says how the photo meets the frame: ``crop`` (default: center-crop the sliver that does not fit),
``pad`` (letterbox with edge colour), or ``stretch`` (the reference's squash, only when asked for).
"""

from __future__ import annotations

import io
import math
import sys
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..core.errors import InputError, UsageError
from ..effects.rules import FITS

MAX_PIXELS = 80_000_000  # a 80 MP photo is already far beyond any budget; more is a decompression bomb
MAX_ASPECT = 4.0  # long side / short side: Wan2.1 is trained on 16:9 to 9:16; past 4:1 the frame is a sliver
MIN_SIDE = 16  # one latent patch (8x VAE stride × 2): a smaller photo holds less than one token of picture
ENLARGE_WARNING = 2.0  # warn when the photo is blown up more than this to fill the frame


def read_image(source: str | Path | bytes) -> Image.Image:
    """A path, ``-`` (stdin bytes) or raw bytes → an oriented RGB PIL image, or an InputError."""
    name = "stdin" if source in ("-", b"") or isinstance(source, bytes) else str(source)
    if isinstance(source, (str, Path)) and str(source) == "-":
        source = sys.stdin.buffer.read()  # PIL needs a seekable stream
    if isinstance(source, bytes):
        if not source:
            raise InputError(f"{name}: empty input (0 bytes)")
        stream: io.BytesIO | Path = io.BytesIO(source)
    else:
        stream = Path(source)
        if not stream.exists():
            raise InputError(f"{name}: no such file")
        if stream.is_dir():
            raise InputError(f"{name}: is a folder (use `cine batch` for folders)")
        if stream.stat().st_size == 0:
            raise InputError(f"{name}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():  # Pillow warns (DecompressionBombWarning) before our own size line
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(stream)
        with img:
            w, h = img.size
            if w * h > MAX_PIXELS:
                raise InputError(f"{name}: {w}x{h} is {w * h / 1e6:.0f} MP, more than the {MAX_PIXELS // 1_000_000} MP cine accepts")
            img.load()  # decode now so truncation shows up here, not mid-pipeline
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError(f"{name}: not an image (or a format Pillow cannot read)") from None
    except Image.DecompressionBombError:  # Pillow's own guard fires in open() for gigapixel headers
        raise InputError(f"{name}: larger than the {MAX_PIXELS // 1_000_000} MP cine accepts (possible decompression bomb)") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated / corrupt data
        raise InputError(f"{name}: unreadable image ({exc})") from None


def to_rgb(img: Image.Image) -> Image.Image:
    """Any mode → RGB; transparency is flattened onto white (what a viewer shows)."""
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit greyscale: scale down, don't clip
        arr = np.asarray(img, dtype=np.float32)
        arr = (arr / max(float(arr.max()), 1.0) * 255).round().astype(np.uint8)
        return Image.fromarray(arr, "L").convert("RGB")
    return img.convert("RGB")


def check_shape(width: int, height: int) -> None:
    """Refuse photos no frame can show: thinner than MAX_ASPECT or smaller than MIN_SIDE (exit 3, with the numbers)."""
    if min(width, height) < MIN_SIDE:
        raise InputError(f"photo {width}x{height} is smaller than {MIN_SIDE} px on a side; cine needs at least "
                         f"{MIN_SIDE}x{MIN_SIDE}")
    aspect = max(width, height) / min(width, height)
    if aspect > MAX_ASPECT:
        raise InputError(f"photo {width}x{height} has an aspect ratio of {aspect:.1f}:1; cine takes up to "
                         f"{MAX_ASPECT:g}:1 (crop the photo first)")


def target_size(width: int, height: int, max_area: int, multiple: int = 16) -> tuple[int, int]:
    """(W, H) with W·H ≤ max_area, the photo's aspect ratio, both multiples of 16 (reference rounding)."""
    check_shape(width, height)
    aspect = height / width
    h = max(int(math.sqrt(max_area * aspect) // multiple * multiple), multiple)
    w = max(int(math.sqrt(max_area / aspect) // multiple * multiple), multiple)
    while w * h > max_area and max(w, h) > multiple:  # the 16-pixel floor on the short side must not break the budget
        w, h = (w - multiple, h) if w >= h else (w, h - multiple)
    return w, h


def enlarge_notice(photo: tuple[int, int], frame: tuple[int, int]) -> list[str]:
    """A warning when the photo has to be blown up to fill the frame (a soft, blocky clip), with the numbers."""
    scale = max(frame[0] / photo[0], frame[1] / photo[1])
    if scale <= ENLARGE_WARNING:
        return []
    return [f"warning: photo {photo[0]}x{photo[1]} is enlarged {scale:.1f}x to {frame[0]}x{frame[1]}; expect a soft video"]


def fit_image(img: Image.Image, size: tuple[int, int], fit: str = "crop") -> Image.Image:
    """Resize ``img`` to ``size`` (W, H) without silent distortion (see module doc)."""
    if fit not in FITS:
        raise UsageError(f"unknown --fit '{fit}' (use {', '.join(FITS)})")
    w, h = size
    if fit == "stretch":
        return img.resize((w, h), Image.BICUBIC)
    if fit == "crop":
        return ImageOps.fit(img, (w, h), Image.BICUBIC, centering=(0.5, 0.5))
    scaled = ImageOps.contain(img, (w, h), Image.BICUBIC)
    edge = scaled.getpixel((0, 0))
    canvas = Image.new("RGB", (w, h), edge)
    canvas.paste(scaled, ((w - scaled.width) // 2, (h - scaled.height) // 2))
    return canvas


def check_pair(first: tuple[int, int], last: tuple[int, int], name: str | Path) -> None:
    """A first/last frame pair (a burst) must share orientation; sizes and aspect ratios may differ.

    The frame size comes from the first photo and the last is fitted the same way (``--fit``). A landscape/portrait
    mix is refused rather than fitted: cropping a portrait into a landscape frame keeps a different part of the
    scene, so the model would have to morph between two framings instead of filling in a moment of motion. Sizes
    are after EXIF rotation, so a phone burst shot sideways pairs correctly. Square fits either orientation.
    """
    (w0, h0), (w1, h1) = first, last
    if (w0 - h0) * (w1 - h1) < 0:
        kind = lambda w, h: "landscape" if w > h else "portrait"  # noqa: E731
        raise InputError(f"{name}: a {kind(w1, h1)} {w1}x{h1} last frame does not pair with the {kind(w0, h0)} {w0}x{h0} "
                         "first photo (rotate or crop one so both have the same orientation)")


def to_tensor(img: Image.Image) -> torch.Tensor:
    """RGB image → [3, H, W] float32 in [-1, 1]."""
    arr = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return arr / 127.5 - 1
