"""Reading videos with decord: which frames, their pixels and their times.

Two ways to pick frames:

- `uniform(n)`: n frames spread over the whole video, indices
  `linspace(0, total - 1, n)` rounded down (the original demo's choice);
- `by_fps(fps, max_frames)`: one frame every 1/fps seconds of the video's
  average rate, falling back to `uniform(max_frames)` for long videos, so the
  frame count is bounded.

An image file (anything Pillow opens: png, jpg, webp, bmp, gif, ...) that
decord cannot read is a one-frame clip, whatever the sampling asks for:
its pixels (EXIF orientation applied, converted to RGB; the first frame of
an animated image), index 0, time 0 s, `total_frames` 1, `avg_fps` 0 (no
frame rate) and `is_image` set. A model whose config tiles images (anyres +
unires) answers about its tiles instead (`data/unires.py`, `infer.Answerer`).

Anything that stops a file from giving frames (missing, empty, corrupt,
truncated, unreadable frames, neither a video nor an image) raises
`VideoError` naming the file and the reason; nothing is replaced by a
neighbour's frames.
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Optional, Union

import numpy as np


class VideoError(ValueError):
    """A video that cannot give frames; `path` and `reason` say which and why."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"cannot read video {path}: {reason}")
        self.path, self.reason = path, reason


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How frames are picked: exactly `frames`, or `fps` capped at `max_frames`."""
    frames: Optional[int] = None
    fps: Optional[float] = None
    max_frames: Optional[int] = None

    def __post_init__(self):
        if (self.frames is None) == (self.fps is None):
            raise ValueError("give either a frame count or an fps (with max_frames)")
        if self.frames is not None and self.frames < 1:
            raise ValueError(f"the frame count must be >= 1, got {self.frames}")
        if self.fps is not None and (self.fps <= 0 or not self.max_frames or self.max_frames < 1):
            raise ValueError(f"sampling by fps needs fps > 0 and max_frames >= 1, got {self.fps}, {self.max_frames}")

    def indices(self, total: int, avg_fps: float) -> np.ndarray:
        if self.frames is not None:
            return uniform_indices(total, self.frames)
        return fps_indices(total, avg_fps, self.fps, self.max_frames)


def uniform(frames: int) -> Sampling:
    return Sampling(frames=frames)


def by_fps(fps: float, max_frames: int) -> Sampling:
    return Sampling(fps=fps, max_frames=max_frames)


def uniform_indices(total: int, n: int) -> np.ndarray:
    """`linspace(0, total - 1, n)` rounded down; repeats frames when n > total, as the original does."""
    if total < 1:
        raise ValueError("no frames to sample from")
    return np.floor(np.linspace(0, total - 1, n)).astype(np.int64)


def fps_indices(total: int, avg_fps: float, fps: float, max_frames: int) -> np.ndarray:
    """Every (avg_fps / fps)-th frame, or uniform(max_frames) when that is more than max_frames."""
    if total < 1:
        raise ValueError("no frames to sample from")
    step = max(avg_fps / fps, 1.0) if avg_fps > 0 else 1.0
    idx = np.floor(np.arange(0, total, step)).astype(np.int64)
    if len(idx) > max_frames:
        return uniform_indices(total, max_frames)
    return idx


@dataclasses.dataclass(frozen=True)
class Clip:
    frames: np.ndarray       # uint8 [N, H, W, 3]
    indices: np.ndarray      # int64 [N], frame numbers in the file
    timestamps: np.ndarray   # float64 [N], seconds from the start
    total_frames: int
    avg_fps: float           # 0.0 for an image
    path: str
    is_image: bool = False   # read from an image file: one frame

    def __array__(self, dtype=None, copy=None):
        """`np.asarray(clip)`: its frames."""
        return np.asarray(self.frames, dtype=dtype)


def image_clip(image_u8: np.ndarray, path: str = "<image>") -> Clip:
    """A still image uint8 [H, W, 3] (RGB) as a one-frame clip marked `is_image` (the model may tile it)."""
    image = np.asarray(image_u8)
    if image.ndim != 3 or image.shape[-1] != 3 or image.dtype != np.uint8 or 0 in image.shape:
        raise ValueError(f"an image is uint8 [H, W, 3] (RGB), got {image.dtype} {image.shape}")
    return Clip(image[None], np.zeros(1, np.int64), np.zeros(1, np.float64), 1, 0.0, path, is_image=True)


def read(path: Union[str, os.PathLike], sampling: Sampling, *, num_threads: int = 1) -> Clip:
    """Decodes the sampled frames of `path` (an image file: its one frame); raises VideoError on any failure."""
    import decord  # imported here: decord starts threads, and worker processes import this module

    path = os.fspath(path)
    if not os.path.exists(path):
        raise VideoError(path, "no such file")
    if os.path.isdir(path):
        raise VideoError(path, "is a directory")
    if os.path.getsize(path) == 0:
        raise VideoError(path, "the file is empty (0 bytes)")
    try:
        reader = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=num_threads)
    except Exception as e:  # decord raises DECORDError / RuntimeError with ffmpeg's words
        return _image_or_error(path, f"decord: {_first_line(e)}")      # decord reads no still images
    total = len(reader)
    if total == 0:
        raise VideoError(path, "the video has no frames")
    avg_fps = float(reader.get_avg_fps())
    idx = sampling.indices(total, avg_fps)
    try:
        frames = reader.get_batch(idx.tolist()).asnumpy()
        times = np.asarray(reader.get_frame_timestamp(idx.tolist()), np.float64).reshape(len(idx), 2)[:, 0]
    except Exception as e:
        # ffmpeg opens some other files as one-frame "videos" (a text file is tty art) that then fail here.
        return _image_or_error(path, f"decoding frames {idx.min()}..{idx.max()} of {total} failed "
                                     f"({_first_line(e)}); a video file may be truncated")
    if frames.ndim != 4 or frames.shape[0] != len(idx) or frames.shape[-1] != 3:
        raise VideoError(path, f"decoded an unexpected array of shape {frames.shape}")
    return Clip(frames, idx, times, total, avg_fps, path)


def read_image(path: Union[str, os.PathLike]) -> Optional[Clip]:
    """An image file as a one-frame clip (see the module doc); None when Pillow does not know it as an image.

    Raises VideoError for a file Pillow identifies as an image but cannot decode (truncated, corrupt, too large).
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = os.fspath(path)
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as e:
        raise VideoError(path, f"an image too large to decode safely ({_first_line(e)})") from None
    except (UnidentifiedImageError, OSError, ValueError):
        return None
    with image:
        kind = image.format or "image"
        try:
            image.seek(0)       # the first frame of an animated image
            rgb = ImageOps.exif_transpose(image).convert("RGB")
            frames = np.asarray(rgb, np.uint8)[None]
        except Exception as e:  # truncated or corrupt data, an unsupported mode
            raise VideoError(path, f"neither a video decord can read nor a readable image: a {kind} image whose "
                                   f"decoding failed ({_first_line(e)})") from None
    if frames.ndim != 4 or frames.shape[-1] != 3 or 0 in frames.shape:
        raise VideoError(path, f"decoded a {kind} image of unexpected shape {frames.shape[1:]}")
    return image_clip(frames[0], path)


def _image_or_error(path: str, video_reason: str) -> Clip:
    clip = read_image(path)
    if clip is None:
        raise VideoError(path, f"neither a video decord can read nor an image ({video_reason})")
    return clip


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    # decord's messages start with "[hh:mm:ss] /its/source.cc:123: ": the reason is what follows
    return re.sub(r"^\[[0-9:]+\] \S+:\d+: ", "", text[0])[:200] if text else type(e).__name__


def write_test_video(path: Union[str, os.PathLike], frames: np.ndarray, fps: int = 8) -> str:
    """Writes uint8 [F, H, W, 3] frames as an H.264 mp4 with PyAV (for demos and tests)."""
    import av

    path = os.fspath(path)
    frames = np.asarray(frames, np.uint8)
    with av.open(path, mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path
