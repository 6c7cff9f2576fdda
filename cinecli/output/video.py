"""MP4 output through PyAV: H.264 yuv420p, metadata inside the file, never a half-written or clobbered file.

Files appear at their path complete or not at all (``atomic_file``: an unnamed O_TMPFILE linked into place on
Linux, so even SIGKILL leaves nothing behind); without ``overwrite`` the final link refuses to replace a file.
``-`` writes a *fragmented* MP4 to stdout (a plain MP4 needs seeking to write its index).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

from ..core.errors import InputError, OutputError, UsageError, output_error

STDOUT = "-"
METADATA_KEY = "cine"


def frames_to_uint8(video: torch.Tensor) -> np.ndarray:
    """video [3, T, H, W] in [-1, 1] → frames [T, H, W, 3] uint8, a frame at a time (no clip-sized temporaries)."""
    out = torch.empty(video.shape[1], *video.shape[2:], 3, dtype=torch.uint8)
    for t in range(video.shape[1]):
        out[t] = ((video[:, t].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0)
    return out.numpy()


def check_writable(path: str | Path, overwrite: bool) -> None:
    """Fail early (before any model loads) if the output cannot be written."""
    if str(path) == STDOUT:
        if sys.stdout.isatty():
            raise OutputError("refusing to write video to a terminal; redirect stdout (cine … -o - > clip.mp4)")
        return
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a directory")
    if path.exists() and not overwrite:
        raise OutputError(f"{path} exists; pass --overwrite to replace it")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"output folder {parent} does not exist")
    try:  # a real probe: permission bits say nothing for root, or on read-only filesystems
        fd, probe = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"output folder {parent} is not writable ({exc.strerror or exc})") from None


def check_report_path(path: str | Path, overwrite: bool) -> None:
    """``--report FILE`` must be writable before anything runs; an existing one is replaced only with --overwrite."""
    try:
        check_writable(path, overwrite=overwrite)
    except OutputError as exc:
        raise OutputError(f"--report {path}: {exc}") from None


def check_output_paths(output: str | Path, inputs: dict[str, str | Path | None]) -> None:
    """The video's name and place, before anything runs: an MP4 name (``.mp4``: the bytes are MP4 whatever the
    name), and never one of the run's own inputs (``inputs``: option → path), whatever --overwrite says."""
    if str(output) == STDOUT:
        return
    if Path(output).suffix.lower() != ".mp4":
        raise UsageError(f"-o {output}: cine writes MP4 video; name the file .mp4 (or give a folder, ending in /)")
    target = Path(output).resolve()
    for option, path in inputs.items():
        if path is None or str(path) == STDOUT:
            continue
        same = target == Path(path).resolve() or (target.exists() and Path(path).exists() and target.samefile(path))
        if same:
            raise UsageError(f"{option} {path} is also the output (-o {output}); cine never writes over its inputs")


def _encode(container, frames: np.ndarray, fps: int | Fraction, crf: int) -> None:
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


def write_mp4(frames: np.ndarray, path: str | Path, fps: int | Fraction, metadata: dict | None = None,
              crf: int = 18, overwrite: bool = False) -> str:
    """Encode frames [T, H, W, 3] uint8 to ``path`` (or ``-`` for stdout); returns the path written."""
    import av

    tags = {"comment": json.dumps(metadata, separators=(",", ":")), METADATA_KEY: json.dumps(metadata)} if metadata else {}
    if str(path) == STDOUT:
        check_writable(path, overwrite)
        try:
            container = av.open(sys.stdout.buffer, "w", format="mp4",
                                options={"movflags": "frag_keyframe+empty_moov+default_base_moof+use_metadata_tags"})
            container.metadata.update(tags)
            _encode(container, frames, fps, crf)
            container.close()
            sys.stdout.buffer.flush()
        except BrokenPipeError:
            raise
        except OSError as exc:  # e.g. stdout redirected to a full disk
            raise output_error(exc, "stdout") from None
        return STDOUT
    path = Path(path)
    check_writable(path, overwrite)
    with atomic_file(path, overwrite) as target:
        container = av.open(target, "w", format="mp4", options={"movflags": "+faststart+use_metadata_tags"})
        container.metadata.update(tags)
        _encode(container, frames, fps, crf)
        container.close()
    return str(path)


_libc = None


def _linkat_follow(src: str, dst: Path) -> None:
    """linkat(AT_FDCWD, src, AT_FDCWD, dst, AT_SYMLINK_FOLLOW): gives an O_TMPFILE inode its name.

    ``os.link`` calls plain link(), which would link the /proc symlink itself and fail across devices.
    """
    global _libc
    import ctypes

    _libc = _libc or ctypes.CDLL(None, use_errno=True)
    if _libc.linkat(-100, os.fsencode(src), -100, os.fsencode(str(dst)), 0x400) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), str(dst))


@contextlib.contextmanager
def atomic_file(path: Path, overwrite: bool) -> Iterator[str]:
    """Yield a name to write ``path``'s content to; the file appears complete at ``path`` or not at all.

    Linux: an unnamed O_TMPFILE in the target folder, reached through /proc/self/fd (so ffmpeg can reopen it
    for +faststart), linked into place at the end: a process killed at any moment, even by SIGKILL, leaves
    nothing behind. Elsewhere: a hidden temp file renamed into place (a SIGKILL can leave a ``.part`` file).
    Without ``overwrite`` the final step refuses to replace a file that appeared meanwhile.
    """
    parent = path.parent if str(path.parent) else Path(".")
    try:
        fd = os.open(parent, os.O_TMPFILE | os.O_RDWR, 0o644) if hasattr(os, "O_TMPFILE") and sys.platform == "linux" else None
    except OSError:  # filesystem without O_TMPFILE support
        fd = None
    tmp = None
    try:
        if fd is not None:
            yield f"/proc/self/fd/{fd}"
            os.fchmod(fd, 0o666 & ~_umask())
            if overwrite:
                tmp = parent / f".{path.name}.{os.getpid()}.tmp"
                _linkat_follow(f"/proc/self/fd/{fd}", tmp)
                os.replace(tmp, path)
                tmp = None
            else:
                _linkat_follow(f"/proc/self/fd/{fd}", path)
        else:
            handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=parent)
            os.close(handle)
            yield tmp
            if not overwrite and path.exists():
                raise FileExistsError(path)
            os.replace(tmp, path)
            tmp = None
    except FileExistsError:
        raise OutputError(f"{path} appeared while encoding; pass --overwrite to replace it") from None
    except OSError as exc:
        if exc.errno == 17:  # EEXIST from linkat
            raise OutputError(f"{path} appeared while encoding; pass --overwrite to replace it") from None
        raise output_error(exc, path) from None
    finally:
        if fd is not None:
            os.close(fd)
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


IMAGE_DEMUXERS = ("image2", "_pipe")  # ffmpeg opens a PNG/JPEG as a one-frame "video" through these


def read_info(path: str | Path | io.BytesIO, name: str | None = None) -> dict:
    """What ``cine info`` shows: stream facts plus the cine metadata stored in the file.

    Counts frames by demuxing (no decoding); a file that is not a video, or whose packets stop short of what
    its index promises (or end in a cut packet), is an InputError: "not a video" / "truncated".
    """
    import av

    source, path = (path, name or "stdin") if isinstance(path, io.BytesIO) else (str(path), path)
    try:
        with av.open(source) as container:
            stream = _video_stream(container, path)
            packets = cut = 0
            for packet in container.demux(stream):
                if packet.size:
                    packets += 1
                    cut += packet.is_corrupt  # a packet the file ends in the middle of
            if cut or (stream.frames and packets < stream.frames):
                raise InputError(f"{path}: truncated ({packets} of {stream.frames or '?'} frames present)")
            info = {
                "path": str(path), "codec": stream.codec_context.name, "width": stream.width, "height": stream.height,
                "fps": float(stream.average_rate) if stream.average_rate else None, "frames": stream.frames or packets,
                "pix_fmt": stream.pix_fmt,
            }
            raw = container.metadata.get(METADATA_KEY) or container.metadata.get("comment")
    except av.error.FFmpegError as exc:
        why = "truncated" if isinstance(source, str) and _looks_like_mp4(source) else "not a video"
        raise InputError(f"{path}: {why} ({getattr(exc, 'strerror', None) or type(exc).__name__})") from None
    except (IndexError, OSError) as exc:
        raise InputError(f"{path}: not a video ({exc})") from None
    try:
        info["cine"] = json.loads(raw) if raw else None
    except ValueError:
        info["cine"] = None
    return info


def _video_stream(container, label: object):
    """The first video stream of an opened container; an image (FFmpeg opens those too) or a file without video is
    an InputError."""
    fmt = container.format.name
    if not container.streams.video or fmt == "image2" or fmt.endswith("_pipe"):
        raise InputError(f"{label}: not a video ({'an image' if container.streams.video else 'no video stream'})")
    return container.streams.video[0]


def _looks_like_mp4(path: str | Path) -> bool:
    """An ISO-BMFF file starts with an ``ftyp`` box: if ffmpeg still cannot read it, it was cut short."""
    with contextlib.suppress(OSError), open(path, "rb") as f:
        return f.read(12)[4:8] == b"ftyp"
    return False


def read_frames(source: str | Path | io.BytesIO, name: str | None = None) -> tuple[np.ndarray, Fraction, dict | None]:
    """Decode a clip: (frames [T, H, W, 3] uint8 RGB, its frame rate, the cine metadata stored in it or None).

    A file that is not a video, or cannot be decoded to its end, is an InputError (exit 3)."""
    import av

    source, label = (source, name or "stdin") if isinstance(source, io.BytesIO) else (str(source), str(source))
    try:
        with av.open(source) as container:
            stream = _video_stream(container, label)
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
            raw = container.metadata.get(METADATA_KEY) or container.metadata.get("comment")
    except av.error.FFmpegError as exc:
        raise InputError(f"{label}: not a readable video ({getattr(exc, 'strerror', None) or type(exc).__name__})") from None
    except (IndexError, OSError) as exc:
        raise InputError(f"{label}: not a video ({exc})") from None
    try:
        meta = json.loads(raw) if raw else None
    except ValueError:
        meta = None
    out = np.stack(frames) if frames else np.zeros((0, 0, 0, 3), np.uint8)
    return out, Fraction(rate) if rate else Fraction(0), meta if isinstance(meta, dict) else None
