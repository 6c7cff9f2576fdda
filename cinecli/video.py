"""MP4 output through PyAV: H.264 yuv420p, metadata inside the file, never a half-written or clobbered file.

Files are written to a hidden temp name beside the target and renamed into place when complete; without
``overwrite`` the final step is a hard link, which fails atomically if the target appeared meanwhile.
``-`` writes a *fragmented* MP4 to stdout (a plain MP4 needs seeking to write its index).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from .errors import OutputError

STDOUT = "-"
METADATA_KEY = "cine"


def frames_to_uint8(video: torch.Tensor) -> np.ndarray:
    """video [3, T, H, W] in [-1, 1] → frames [T, H, W, 3] uint8."""
    frames = ((video.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return frames.permute(1, 2, 3, 0).cpu().numpy()


def check_writable(path: str | Path, overwrite: bool) -> None:
    """Fail early (before any model loads) if the output cannot be written."""
    if str(path) == STDOUT:
        if sys.stdout.isatty():
            raise OutputError("refusing to write video to a terminal; redirect stdout (cine … -o - > clip.mp4)")
        return
    path = Path(path)
    if path.exists() and not overwrite:
        raise OutputError(f"{path} exists; pass --overwrite to replace it")
    if path.is_dir():
        raise OutputError(f"{path} is a directory")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output folder {parent} does not exist")
    try:  # a real probe: permission bits say nothing for root, or on read-only filesystems
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"output folder {parent} is not writable ({exc.strerror or exc})") from None


def _encode(container, frames: np.ndarray, fps: int, crf: int) -> None:
    stream = container.add_stream("libx264", rate=fps)
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt = "yuv420p"
    stream.options = {"crf": str(crf)}
    import av

    for frame in frames:
        for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)


def write_mp4(frames: np.ndarray, path: str | Path, fps: int, metadata: dict | None = None,
              crf: int = 18, overwrite: bool = False) -> str:
    """Encode frames [T, H, W, 3] uint8 to ``path`` (or ``-`` for stdout); returns the path written."""
    import av

    tags = {"comment": json.dumps(metadata, separators=(",", ":")), METADATA_KEY: json.dumps(metadata)} if metadata else {}
    if str(path) == STDOUT:
        check_writable(path, overwrite)
        container = av.open(sys.stdout.buffer, "w", format="mp4",
                            options={"movflags": "frag_keyframe+empty_moov+default_base_moof+use_metadata_tags"})
        container.metadata.update(tags)
        _encode(container, frames, fps, crf)
        container.close()
        sys.stdout.buffer.flush()
        return STDOUT
    path = Path(path)
    check_writable(path, overwrite)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent if str(path.parent) else ".")
        os.close(fd)
        container = av.open(tmp, "w", format="mp4", options={"movflags": "+faststart+use_metadata_tags"})
        container.metadata.update(tags)
        _encode(container, frames, fps, crf)
        container.close()
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic, and refuses to replace a file that appeared meanwhile
            except FileExistsError:
                raise OutputError(f"{path} appeared while encoding; pass --overwrite to replace it") from None
            except OSError:  # filesystems without hard links
                if path.exists():
                    raise OutputError(f"{path} exists; pass --overwrite to replace it") from None
                os.replace(tmp, path)
    except OSError as exc:
        raise OutputError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
    return str(path)


def read_info(path: str | Path) -> dict:
    """What ``cine info`` shows: stream facts plus the cine metadata stored in the file."""
    import av

    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            frames = stream.frames or sum(1 for _ in container.decode(video=0))
            info = {
                "path": str(path), "codec": stream.codec_context.name, "width": stream.width, "height": stream.height,
                "fps": float(stream.average_rate) if stream.average_rate else None, "frames": frames,
                "pix_fmt": stream.pix_fmt,
            }
            raw = container.metadata.get(METADATA_KEY) or container.metadata.get("comment")
    except (av.error.FFmpegError, IndexError, OSError) as exc:
        raise OutputError(f"cannot read {path} as a video: {exc}") from None
    try:
        info["cine"] = json.loads(raw) if raw else None
    except ValueError:
        info["cine"] = None
    return info
