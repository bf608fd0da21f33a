"""Video decoding, frame sampling and SigLIP preprocessing.

Decoding uses decord like the original (its `VideoReader` gives the same pixels as PyAV for the
same frame indices). Sampling reproduces the original's `np.linspace(0, total - 1, n, dtype=int)`
(truncation towards zero; a clip shorter than `n` repeats frames so T stays fixed). Preprocessing
is the SigLIP recipe (square resize, x/255, mean = std = 0.5) in torch, no torchvision. Every
failure is a `VideoError` naming the file and the cause; decoding runs under a watchdog so a
pathological file cannot hang a run. PyAV opens each file first (a broken file then never reaches
decord, whose C++ logger would print its own "ERROR opening" line to stderr), decodes the sizes
decord 0.6 cannot copy out, and decodes frames above 4K UHD straight at about 1080p (memory); it
turns frames by the container's display rotation exactly as decord does.
"""

from __future__ import annotations

import os
import re
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import av
import decord
import numpy as np

from tinyr1.errors import VideoError

if TYPE_CHECKING:  # torch only for preprocessing: `tinyr1 data check` decodes without importing it
    import torch

SIGLIP_MEAN = 0.5
SIGLIP_STD = 0.5
DEFAULT_TIMEOUT_S = 120.0
# Frames above 4K UHD are decoded straight to about 1080p: an 8K clip cost 8.4 GB of RAM per load at
# full size (4.6 GB for 16 frames measured, 0.6 GB at 1080p), and SigLIP sees 384 px anyway.
MAX_DECODE_PIXELS = 3840 * 2160
REDUCED_DECODE_PIXELS = 1920 * 1080


@dataclass(frozen=True)
class VideoInfo:
    """What the container says about a clip (decord's view: frame count and average fps)."""

    path: Path
    num_frames: int
    fps: float
    width: int
    height: int

    @property
    def duration(self) -> float:
        return self.num_frames / self.fps if self.fps > 0 else 0.0


def sample_indices(
    total: int, num_frames: int, *, fps: float | None = None, max_frames: int | None = None, video_fps: float = 0.0
) -> np.ndarray:
    """Frame indices to decode, [T] int64.

    Uniform: `np.linspace(0, total - 1, num_frames, dtype=int)` (the original's sampling).
    With `fps`: `min(max_frames, max(1, int(duration * fps)))` uniform frames; fps = 1 with
    max_frames = 16 is the original's "-1" eval mode.
    """
    if total < 1:
        raise ValueError(f"a video needs at least one frame, got {total}")
    if fps is not None:
        cap = max_frames if max_frames is not None else num_frames
        duration = total / video_fps if video_fps > 0 else 0.0
        count = min(cap, max(1, int(duration * fps)))
    else:
        count = num_frames
    if count < 1:
        raise ValueError(f"num_frames must be >= 1, got {count}")
    return np.linspace(0, total - 1, count, dtype=int).astype(np.int64)


def _check_file(path: Path) -> None:
    if not path.exists():
        raise VideoError(f"{path}: video file not found; check the path and data.video_root")
    if not path.is_file():
        raise VideoError(f"{path}: not a regular file (a folder?); point the row at a video file")
    if path.stat().st_size == 0:
        raise VideoError(f"{path}: video file is empty (0 bytes); re-download or re-encode it")


def _with_timeout(fn: Any, path: Path, timeout_s: float | None) -> Any:
    """Run `fn()` in a daemon thread; a decoder stuck on a broken file becomes a VideoError."""
    if timeout_s is None:
        return fn()
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            box["error"] = err

    worker = threading.Thread(target=run, daemon=True, name=f"decode:{path.name}")
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise VideoError(f"{path}: decoding did not finish within {timeout_s:.0f} s; the file is probably corrupt")
    if "error" in box:
        raise box["error"]
    return box["value"]


_decord_quiet = False


@dataclass(frozen=True)
class _Probe:
    """What PyAV reads from the container header: the stored frame size (before display rotation)."""

    width: int
    height: int


def _probe(path: Path) -> _Probe:
    """Open the container with PyAV first: a file it cannot open is a VideoError with ffmpeg's
    cause, before decord could print its own "ERROR opening" line to stderr."""
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoError(f"{path}: cannot open video (no video stream: truncated, or audio only?); repair or "
                                 "remove the row")
            ctx = container.streams.video[0].codec_context
            return _Probe(int(ctx.width), int(ctx.height))
    except VideoError:
        raise
    except Exception as err:  # noqa: BLE001 - any failure text is the diagnosis we want
        text = getattr(err, "strerror", None) or str(err)
        raise VideoError(f"{path}: cannot open video (ffmpeg: {text}); the file is corrupt or not a video") from None


def _open(path: Path) -> Any:
    global _decord_quiet
    if not _decord_quiet:  # ffmpeg's own log lines would duplicate the VideoError we raise
        decord.logging.set_level(decord.logging.QUIET)
        _decord_quiet = True
    try:
        return decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=0)
    except Exception as err:  # decord raises RuntimeError / DECORDError with ffmpeg's message
        raise VideoError(f"{path}: cannot open video ({_cause(err)}); the file is corrupt or not a video") from err


def _cause(err: BaseException) -> str:
    """decord's message without its "[time] /src/file.cc:123:" prefixes, kept short."""
    msg = re.sub(r"\[\d\d:\d\d:\d\d\] \S+?:\d+: ", "", " ".join(str(err).split())) or type(err).__name__
    return msg if len(msg) < 300 else msg[:300] + "..."


def _count_and_fps(reader: Any, path: Path) -> tuple[int, float]:
    total = len(reader)
    if total < 1:
        raise VideoError(f"{path}: the video has no frames; re-encode it or remove the row")
    try:
        fps = float(reader.get_avg_fps())
    except Exception:  # noqa: BLE001 - some containers have no rate; duration then unknown
        fps = 0.0
    return total, (fps if np.isfinite(fps) and fps > 0 else 0.0)


def _get_batch(reader: Any, path: Path, idx: np.ndarray) -> np.ndarray:
    """decord's frames [T, H, W, 3]; PyAV for the frame sizes decord 0.6 cannot copy out.

    decord 0.6 fails on some small widths (16, 24, 48 px: "DECORDArrayCopyFromTo: The size must
    exactly match", a row-padding bug); PyAV decodes the same pixels (tested on real clips).
    """
    try:
        return reader.get_batch(idx.tolist()).asnumpy()
    except Exception as err:
        if "DECORDArrayCopyFromTo" not in str(err):
            raise
    return pyav_frames(path, idx)


def pyav_frames(path: str | os.PathLike[str], idx: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """Frames `idx` decoded by PyAV, [T, H, W, 3] uint8, turned by the display rotation as decord
    turns them; `size` = (width, height) converts each to that stored size first (huge frames)."""
    wanted = set(idx.tolist())
    found: dict[int, np.ndarray] = {}
    scale = {"width": size[0], "height": size[1]} if size is not None else {}
    with av.open(str(path)) as container:
        for i, frame in enumerate(container.decode(video=0)):
            if i in wanted:
                rgb = frame.to_ndarray(format="rgb24", **scale)  # [H, W, 3], as stored
                turns = (int(getattr(frame, "rotation", 0) or 0) // 90) % 4
                found[i] = np.ascontiguousarray(np.rot90(rgb, k=turns)) if turns else rgb  # counter-clockwise
            if len(found) == len(wanted):
                break
    if len(found) != len(wanted):
        raise VideoError(f"{path}: only {len(found)} of the {len(wanted)} sampled frames could be decoded")
    return np.stack([found[i] for i in idx.tolist()])  # [T, H, W, 3]


def reduced_size(width: int, height: int, max_pixels: int) -> tuple[int, int] | None:
    """(width, height) to decode a frame above `max_pixels` at (even, aspect kept, within
    min(REDUCED_DECODE_PIXELS, max_pixels)); None when the frame is small enough as it is."""
    if width * height <= max_pixels:
        return None
    budget = min(REDUCED_DECODE_PIXELS, max_pixels)
    f = (budget / (width * height)) ** 0.5
    return max(2, int(width * f) // 2 * 2), max(2, int(height * f) // 2 * 2)


def decode_frames(
    path: str | os.PathLike[str],
    num_frames: int,
    *,
    fps: float | None = None,
    max_frames: int | None = None,
    timeout_s: float | None = DEFAULT_TIMEOUT_S,
    max_pixels: int = MAX_DECODE_PIXELS,
) -> tuple[np.ndarray, np.ndarray, VideoInfo]:
    """Decode the sampled frames: (uint8 frames [T, H, W, 3], indices [T], info); a decoder that
    runs longer than `timeout_s` (None: no limit) is abandoned with a VideoError. Frames larger
    than `max_pixels` are decoded at a reduced size (`reduced_size`), not at full size."""
    p = Path(path)
    _check_file(p)

    def work() -> tuple[np.ndarray, np.ndarray, VideoInfo]:
        probe = _probe(p)
        reader = _open(p)
        total, video_fps = _count_and_fps(reader, p)
        idx = sample_indices(total, num_frames, fps=fps, max_frames=max_frames, video_fps=video_fps)
        size = reduced_size(probe.width, probe.height, max_pixels)
        try:
            frames = _get_batch(reader, p, idx) if size is None else pyav_frames(p, idx, size)  # [T, H, W, 3]
        except Exception as err:
            raise VideoError(f"{p}: decoding frames failed ({_cause(err)}); the file is truncated or corrupt") from err
        if frames.ndim != 4 or frames.shape[0] != len(idx) or frames.shape[-1] != 3:
            raise VideoError(f"{p}: decoder returned frames of shape {frames.shape}, expected [{len(idx)}, H, W, 3]")
        shape = frames.shape
        return frames, idx, VideoInfo(p, total, video_fps, int(shape[2]), int(shape[1]))

    return _with_timeout(work, p, timeout_s)


def preprocess(frames: np.ndarray | torch.Tensor, image_size: int) -> torch.Tensor:
    """SigLIP preprocessing: uint8 [T, H, W, 3] -> float32 [T, 3, S, S] in [-1, 1].

    Square resize (no padding, like image_aspect_ratio "square") with antialiased bicubic
    (PIL's a = -0.5 kernel, which torch's antialias path uses), rounded to uint8 levels as PIL
    does, then x/255 and (x - 0.5) / 0.5. A frame that is already S x S is not resampled.
    """
    import torch  # heavy; imported here so decoding alone (`tinyr1 data check`) never loads it
    import torch.nn.functional as F

    x = torch.as_tensor(np.ascontiguousarray(frames) if isinstance(frames, np.ndarray) else frames)
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"frames must be [T, H, W, 3], got {tuple(x.shape)}")
    x = x.permute(0, 3, 1, 2).to(torch.float32)  # [T, 3, H, W], 0..255
    # PIL resizes in two separable passes (width, then height) and rounds to uint8 after each;
    # doing the same keeps us within 1 level of the original's PIL-based SiglipImageProcessor.
    for size in ((x.shape[-2], image_size), (image_size, image_size)):
        if tuple(x.shape[-2:]) != size:
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
            x = x.round_().clamp_(0.0, 255.0)  # [T, 3, H', W']
    return ((x / 255.0 - SIGLIP_MEAN) / SIGLIP_STD).contiguous()  # [T, 3, S, S]


def load_frames(
    path: str | os.PathLike[str],
    num_frames: int,
    image_size: int,
    *,
    fps: float | None = None,
    max_frames: int | None = None,
) -> torch.Tensor:
    """Decode, sample and preprocess one clip: float32 [T, 3, S, S], ready for the vision tower."""
    frames, _, _ = decode_frames(path, num_frames, fps=fps, max_frames=max_frames)
    return preprocess(frames, image_size)  # [T, 3, S, S]
