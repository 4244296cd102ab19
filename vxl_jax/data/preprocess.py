"""CLIP image preprocessing in numpy, bit-exact with transformers' PIL path.

Video-XL feeds CLIP ViT-L/14-336 with what `CLIPImageProcessor` (the PIL
backend, `CLIPImageProcessorPil` in transformers 5) makes of each frame:
resize so the shortest side is 336 (PIL bicubic), center crop 336x336,
x / 255, (x - mean) / std, channels first. This module does the same without
Pillow or torch, on a whole batch of frames at once.

The resize reproduces Pillow's uint8 resampler (libImaging/Resample.c) integer
for integer, so the float output matches the processor to float32 rounding:
  * separable: a horizontal pass, then a vertical one, with a uint8 image in
    between; a pass is skipped when its dimension keeps its size.
  * per output pixel, a window of input pixels (support 2 * max(scale, 1),
    cut at the image border, never mirrored) weighted by the a=-0.5 bicubic
    kernel, normalised to sum 1 in float64, then rounded to fixed point with
    22 fractional bits (half away from zero).
  * accumulate in int32 from 1 << 21 (the +0.5 of the final rounding),
    then >> 22 and clip to 0..255.
Each output pixel depends only on its own taps, so the crop is fused into the
resize: only the kept rows and columns are computed (same integers).
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import numpy as np

from vxl_jax.conversion.checkpoint import CLIP_MEAN, CLIP_STD

_PRECISION_BITS = 32 - 8 - 2  # Pillow: 8 bits of result, 2 of headroom for overshoot, in a 32-bit int.
_BICUBIC_A = -0.5
_BICUBIC_SUPPORT = 2.0
_BLOCK_ELEMENTS = 1 << 18  # accumulator block: 1 MiB of int32


def _bicubic(x: np.ndarray) -> np.ndarray:
    """Pillow's bicubic kernel, with its exact float64 operation order."""
    x = np.abs(x)
    a = _BICUBIC_A
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


@functools.lru_cache(maxsize=64)
def _taps(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Per output index: input indices [out, K] (int64) and fixed-point weights [out, K] (int32).

    Windows shorter than K (at the borders) are padded with weight 0 on a valid index.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)  # downscaling widens the kernel (antialiasing); upscaling does not narrow it
    support = _BICUBIC_SUPPORT * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale
    # C casts with (int): truncation toward zero, as astype does.
    xmin = np.maximum((center - support + 0.5).astype(np.int64), 0)
    xmax = np.minimum((center + support + 0.5).astype(np.int64), in_size) - xmin  # window length
    x = np.arange(ksize)
    idx = xmin[:, None] + x[None, :]
    valid = x[None, :] < xmax[:, None]
    w = np.where(valid, _bicubic((idx - center[:, None] + 0.5) * (1.0 / filterscale)), 0.0)
    ww = np.zeros(out_size)
    for t in range(ksize):  # sequential sum, as in C: float addition order matters for the rounding below
        ww = ww + w[:, t]
    w = w / np.where(ww != 0.0, ww, 1.0)[:, None]
    w = w * float(1 << _PRECISION_BITS)
    fixed = np.where(w < 0, w - 0.5, w + 0.5).astype(np.int32)  # round half away from zero, then truncate
    idx = np.minimum(idx, in_size - 1)
    idx.flags.writeable = fixed.flags.writeable = False  # cached: shared by every call
    return idx, fixed


def _pass(x: np.ndarray, index: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """One 1-D resampling pass along the leading axis of uint8 x: [N, ...] -> [len(index), ...].

    Along the leading axis each tap's gather copies whole contiguous blocks (numpy's
    fast case); the loop is over taps (few) within blocks of output rows sized to
    keep the int32 accumulator in cache (2.4x faster than one whole-array pass).
    """
    row = math.prod(x.shape[1:])
    block = max(1, _BLOCK_ELEMENTS // row)
    shape = (-1,) + (1,) * (x.ndim - 1)
    out = np.empty((index.shape[0],) + x.shape[1:], np.uint8)
    for start in range(0, index.shape[0], block):
        idx, wt = index[start:start + block], weight[start:start + block]
        acc = np.full((idx.shape[0],) + x.shape[1:], 1 << (_PRECISION_BITS - 1), np.int32)
        for t in range(idx.shape[1]):
            # uint8 * int32 in 32 bits, as C's int. No overflow: the positive weights of this kernel
            # sum to < 1.14, so acc < 2^21 + 255 * 1.14 * 2^22 < 2^31.
            acc += x[idx[:, t]] * wt[:, t].reshape(shape)
        np.right_shift(acc, _PRECISION_BITS, out=acc)
        np.clip(acc, 0, 255, out=acc)
        out[start:start + block] = acc
    return out


def _resize_window(x: np.ndarray, out_h: int, out_w: int, top: int, left: int, h: int, w: int) -> np.ndarray:
    """Rows top:top+h, columns left:left+w of the PIL bicubic resize of uint8 x [F, H, W, 3] to (out_h, out_w).

    Returns layout [h, F, 3, w] (rows leading, what the vertical pass leaves); callers transpose.
    """
    in_h, in_w = x.shape[1:3]
    if out_h != in_h:
        rows, row_w = (a[top:top + h] for a in _taps(in_h, out_h))
        first, last = int(rows[:, 0].min()), int(rows.max()) + 1
        x, rows = x[:, first:last], rows - first  # the horizontal pass only needs these input rows
    else:
        x = x[:, top:top + h]
    if out_w != in_w:  # Pillow skips a pass whose size does not change (for bicubic it would be the identity)
        cols, col_w = (a[left:left + w] for a in _taps(in_w, out_w))
        x = _pass(np.ascontiguousarray(x.transpose(2, 0, 3, 1)), cols, col_w)  # [w, F, 3, H]
        x = np.ascontiguousarray(x.transpose(3, 1, 2, 0))  # [H, F, 3, w]
    else:
        x = np.ascontiguousarray(x[:, :, left:left + w].transpose(1, 0, 3, 2))
    if out_h != in_h:
        x = _pass(x, rows, row_w)
    return x


def _check_frames(frames: np.ndarray) -> tuple[np.ndarray, bool]:
    """-> uint8 [F, H, W, 3] and whether the input was a single [H, W, 3] image."""
    frames = np.asarray(frames)
    if frames.ndim not in (3, 4):
        raise ValueError(f"expected frames [F, H, W, 3] or an image [H, W, 3], got shape {frames.shape}")
    if frames.shape[-1] != 3:
        raise ValueError(f"expected 3 (RGB) channels last, got shape {frames.shape}")
    if frames.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels (as decoded), got {frames.dtype}")
    single = frames.ndim == 3
    frames = frames[None] if single else frames
    if frames.shape[0] == 0 or frames.shape[1] == 0 or frames.shape[2] == 0:
        raise ValueError(f"empty frames: shape {frames.shape}")
    return frames, single


def _shortest_side_size(height: int, width: int, size: int) -> tuple[int, int]:
    """transformers' get_resize_output_image_size(default_to_square=False): the long side truncates."""
    if size <= 0:
        raise ValueError(f"size must be positive, got {size}")
    if width <= height:
        return int(size * height / width), size
    return size, int(size * width / height)


def resize_shortest_side(frames_u8: np.ndarray, size: int) -> np.ndarray:
    """uint8 [F, H, W, 3] (or [H, W, 3]) -> uint8 with the shortest side `size`, as PIL's BICUBIC resize."""
    frames, single = _check_frames(frames_u8)
    out_h, out_w = _shortest_side_size(frames.shape[1], frames.shape[2], size)
    x = _resize_window(frames, out_h, out_w, 0, 0, out_h, out_w)
    x = np.ascontiguousarray(x.transpose(1, 0, 3, 2))
    return x[0] if single else x


def _crop_offsets(size: int, crop: int) -> tuple[int, int, int]:
    """transformers' center_crop along one axis: (start in the input, zeros before, zeros after)."""
    if crop <= size:
        return (size - crop) // 2, 0, 0
    before = -(-(crop - size) // 2)  # ceil: the extra zero goes first
    return 0, before, crop - size - before


def center_crop(frames: np.ndarray, height: int, width: int) -> np.ndarray:
    """[..., H, W, C] -> [..., height, width, C], transformers' offsets; zero-padded where the image is smaller."""
    if height <= 0 or width <= 0:
        raise ValueError(f"crop size must be positive, got {height}x{width}")
    in_h, in_w = frames.shape[-3:-1]
    top, pad_top, pad_bottom = _crop_offsets(in_h, height)
    left, pad_left, pad_right = _crop_offsets(in_w, width)
    out = frames[..., top:top + min(height, in_h), left:left + min(width, in_w), :]
    if pad_top or pad_bottom or pad_left or pad_right:
        pad = [(0, 0)] * (frames.ndim - 3) + [(pad_top, pad_bottom), (pad_left, pad_right), (0, 0)]
        out = np.pad(out, pad)
    return out


def _resize_crop_chw(frames: np.ndarray, size: int, crop: int) -> np.ndarray:
    """uint8 [F, H, W, 3] -> uint8 [F, 3, crop, crop]: shortest side to `size`, then center crop."""
    out_h, out_w = _shortest_side_size(frames.shape[1], frames.shape[2], size)
    if crop <= 0:
        raise ValueError(f"crop size must be positive, got {crop}")
    if crop <= out_h and crop <= out_w:  # the usual case: only compute the kept window
        x = _resize_window(frames, out_h, out_w, (out_h - crop) // 2, (out_w - crop) // 2, crop, crop)
        return x.transpose(1, 2, 0, 3)
    x = _resize_window(frames, out_h, out_w, 0, 0, out_h, out_w)
    return center_crop(x.transpose(1, 0, 3, 2), crop, crop).transpose(0, 3, 1, 2)


def crop_frames_u8(frames_u8: np.ndarray, size: int = 336) -> np.ndarray:
    """uint8 [F, H, W, 3] (or [H, W, 3]) -> uint8 [F, 3, size, size]: resized and cropped, not normalised.

    A quarter of the bytes of float32, for normalising on device (`videoxl.normalise_pixels`
    with mean * 255, std * 255).
    """
    frames, single = _check_frames(frames_u8)
    x = np.ascontiguousarray(_resize_crop_chw(frames, size, size))
    return x[0] if single else x


def _pixel_table(mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """[3, 256] float32: transformers' float steps for each (channel, uint8 value).

    x * (1/255) in float64 cast to float32, then (x - mean) / std in float32: a
    function of the value alone, so a table lookup gives the same bits, faster.
    """
    mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
    if mean.shape != (3,) or std.shape != (3,):
        raise ValueError(f"mean and std need 3 values (RGB), got {mean.shape} and {std.shape}")
    x = (np.arange(256) * (1 / 255)).astype(np.float32)
    return (x[None, :] - mean[:, None]) / std[:, None]


def preprocess_frames(frames_u8: np.ndarray, *, size: int = 336, crop: int | None = None,
                      mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD,
                      dtype=np.float32, channels_first: bool = True) -> np.ndarray:
    """uint8 [F, H, W, 3] (or [H, W, 3]) -> CLIP pixel values [F, 3, crop, crop] (or [F, crop, crop, 3]).

    What CLIPImageProcessor (PIL backend) gives: shortest side to `size` (bicubic),
    center crop `crop` (default `size`), rescale 1/255, normalise with mean/std.
    """
    frames, single = _check_frames(frames_u8)
    table = _pixel_table(mean, std).astype(dtype)
    u8 = _resize_crop_chw(frames, size, size if crop is None else crop)
    x = np.empty(u8.shape, table.dtype)
    for c in range(3):
        x[:, c] = table[c][u8[:, c]]
    if not channels_first:
        x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
    return x[0] if single else x
