"""High-resolution images as tiles: Video-XL's "anyres" preprocessing with the "unires" merge.

With `image_aspect_ratio` "anyres" and `mm_patch_merge_type` "unires" in config.json, the original
processes a still image as follows (videoxl/mm_utils.py, model/llava_arch.py):

  1. pick a canvas among `image_grid_pinpoints` ([width, height] pairs, multiples of the tile size):
     the one that keeps most of the image's pixels after an aspect-preserving fit, then the one that
     wastes least area (ties: the first listed);
  2. resize the image to fit the canvas (PIL bicubic, the fitted side exact, the other rounded up)
     and paste it centred on black;
  3. cut the canvas into tiles of 336 px, row by row; each tile is a CLIP input as is;
  4. in the model: CLIP -> projector -> each tile's 24x24 grid 2x2 average pooled to 144 tokens,
     tiles concatenated in the same order.

Step 4 is exactly what a video frame goes through here (projector, then the 2x2 average pool, row-major
tokens), so an image is "its tiles as frames" and the visual tokens are compressed like a video's.
The original also computes a 336x336 "base" image and runs it through CLIP, then drops it ("base image
feature is never used in unires"); it is not computed here.

Everything is numpy on uint8 pixels; the resize is `preprocess`'s exact Pillow-bicubic resampler, so
tiles equal the original's bit for bit (tests/test_unires.py, against fixtures the original made).
Images in any other setting stay one frame: "pad" pastes the image on a square of the CLIP mean colour
first (the original's `expand2square`), anything else is resized and centre-cropped as a video frame.
"""

from __future__ import annotations

import ast
import dataclasses
import math
import re
from typing import Sequence, Union

import numpy as np

from vxl_jax.data import preprocess

Pinpoints = Union[str, Sequence[Sequence[int]]]
_RANGE = re.compile(r"\((\d+)x(\d+)\)")


def authors_pinpoints(tile: int = 336) -> tuple[tuple[int, int], ...]:
    """The authors' training list (scripts/finetune_*.sh): every grid of 2 to 49 tiles, by width then height."""
    return tuple((i * tile, j * tile) for i in range(1, 50) for j in range(1, 50) if 2 <= i * j <= 49)


def parse_pinpoints(pinpoints: Pinpoints, tile: int = 336) -> tuple[tuple[int, int], ...]:
    """config.json's `image_grid_pinpoints` -> ((width, height), ...) in pixels.

    Forms: a list of [w, h] pairs; the same as a string ("[(336, 672), ...]"); or a range of grids in tiles,
    "(1x1),...,(6x6)": every (i, j) from the first pair to the last, times the tile size.
    """
    if isinstance(pinpoints, str):
        text = pinpoints
        if "x" in text:     # the original's test for the range form
            found = _RANGE.findall(text)
            if not found:
                raise ValueError(f"image_grid_pinpoints {text!r}: no '(WxH)' grid in the range form")
            (a0, b0), (a1, b1) = (tuple(map(int, found[0])), tuple(map(int, found[-1])))
            pairs = [(i * tile, j * tile) for i in range(a0, a1 + 1) for j in range(b0, b1 + 1)]
            if not pairs:
                raise ValueError(f"image_grid_pinpoints {text!r}: an empty range of grids")
        else:
            try:
                pairs = ast.literal_eval(text)
            except (ValueError, SyntaxError) as e:
                raise ValueError(f"image_grid_pinpoints {text!r} is neither a list of [w, h] pairs nor a "
                                 f"'(1x1),...,(NxM)' range ({e})") from None
    else:
        pairs = pinpoints
    if pairs is None or isinstance(pairs, (str, bytes)) or not isinstance(pairs, (list, tuple)):
        raise ValueError(f"image_grid_pinpoints must be a list of [width, height] pairs, got {pinpoints!r}")
    if not pairs:
        raise ValueError("image_grid_pinpoints is empty: an image needs at least one canvas size")
    out = []
    for p in pairs:
        if (not isinstance(p, (list, tuple)) or len(p) != 2
                or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in p)):
            raise ValueError(f"image_grid_pinpoints: {p!r} is not a [width, height] pair of integers")
        w, h = int(p[0]), int(p[1])
        if w <= 0 or h <= 0 or w % tile or h % tile:
            raise ValueError(f"image_grid_pinpoints: {w}x{h} is not a positive multiple of the {tile} px tile")
        out.append((w, h))
    return tuple(out)


def select_resolution(size: tuple[int, int], resolutions: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The canvas (w, h) an image of `size` (w, h) goes on: most image pixels kept, then least area wasted.

    The fitted size truncates (int), and an image is never counted larger than it is; the first of equals wins.
    """
    width, height = size
    best, best_kept, best_waste = None, -1, math.inf
    for w, h in resolutions:
        scale = min(w / width, h / height)
        kept = min(int(width * scale) * int(height * scale), width * height)
        waste = w * h - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (w, h), kept, waste
    if best is None:
        raise ValueError("no canvas sizes to choose from")
    return best


def fitted_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """(w, h) of the image inside the canvas: the side with the smaller scale fills it, the other rounds up."""
    (width, height), (tw, th) = size, target
    scale_w, scale_h = tw / width, th / height
    if scale_w < scale_h:
        return tw, min(math.ceil(height * scale_w), th)
    return min(math.ceil(width * scale_h), tw), th


def resize(image_u8: np.ndarray, width: int, height: int) -> np.ndarray:
    """uint8 [H, W, 3] -> [height, width, 3], as PIL's `Image.resize` (bicubic; an unchanged side is not resampled)."""
    out = preprocess._resize_window(image_u8[None], height, width, 0, 0, height, width)   # [h, 1, 3, w]
    return np.ascontiguousarray(out[:, 0].transpose(0, 2, 1))


def resize_and_pad(image_u8: np.ndarray, target: tuple[int, int]) -> np.ndarray:
    """uint8 [H, W, 3] -> the canvas [th, tw, 3]: fitted, resized, pasted centred (offsets rounded down) on black."""
    tw, th = target
    w, h = fitted_size((image_u8.shape[1], image_u8.shape[0]), target)
    canvas = np.zeros((th, tw, 3), np.uint8)
    top, left = (th - h) // 2, (tw - w) // 2
    canvas[top:top + h, left:left + w] = resize(image_u8, w, h)
    return canvas


@dataclasses.dataclass(frozen=True)
class Tiles:
    frames: np.ndarray              # uint8 [columns * rows, tile, tile, 3], row by row
    grid: tuple[int, int]           # (columns, rows)
    resolution: tuple[int, int]     # the canvas (w, h)
    fitted: tuple[int, int]         # the image's size on it (w, h)

    def channels_first(self) -> np.ndarray:
        """uint8 [n, 3, tile, tile], the layout the model's frame path takes."""
        return np.ascontiguousarray(self.frames.transpose(0, 3, 1, 2))


def tile_image(image_u8: np.ndarray, pinpoints: Pinpoints, tile: int = 336) -> Tiles:
    """An RGB image uint8 [H, W, 3] -> its tiles, as the original's `process_anyres_image` (without the base image)."""
    image = _check_image(image_u8)
    size = (image.shape[1], image.shape[0])
    resolution = select_resolution(size, parse_pinpoints(pinpoints, tile))
    canvas = resize_and_pad(image, resolution)
    cols, rows = resolution[0] // tile, resolution[1] // tile
    frames = canvas.reshape(rows, tile, cols, tile, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, tile, tile, 3)
    return Tiles(np.ascontiguousarray(frames), (cols, rows), resolution, fitted_size(size, resolution))


def grid_shape(size: tuple[int, int], pinpoints: Pinpoints, tile: int = 336) -> tuple[int, int]:
    """(columns, rows) of tiles for an image of `size` (w, h): the original's `get_anyres_image_grid_shape`."""
    w, h = select_resolution(size, parse_pinpoints(pinpoints, tile))
    return w // tile, h // tile


def pixel_values(tiles_u8: np.ndarray) -> np.ndarray:
    """uint8 tiles [n, S, S, 3] -> CLIP pixel values float32 [n, 3, S, S] (what `processor.preprocess` gives a tile)."""
    return preprocess.preprocess_frames(tiles_u8, size=tiles_u8.shape[1])


# ------------------------------------------------------------------------------------------- the model's choice


def check_model(cfg) -> None:
    """Raises when the model of `cfg` (a VideoXLConfig) cannot take tiled images."""
    if cfg.image.tiles and cfg.projector.pool_stride != 2:
        # unires pools tiles 2x2 whatever mm_spatial_pool_stride says; frames here pool by the stride.
        raise ValueError(f"unires images need mm_spatial_pool_stride 2 (their tiles are pooled 2x2), "
                         f"the config has {cfg.projector.pool_stride}")


def image_frames(image_u8: np.ndarray, cfg) -> np.ndarray:
    """What an RGB image uint8 [H, W, 3] becomes for the model of `cfg`: uint8 frames [n, h, w, 3].

    anyres + unires (with pinpoints): its tiles of the CLIP input size, row by row. "pad": one frame, the
    image centred on a square of the CLIP mean colour. Otherwise the image itself, one frame; that includes
    anyres without pinpoints (the released config, as copied in configs/videoxl_7b.json, names none, and
    the original cannot tile without them). Frames are then resized and centre-cropped as video frames are (a no-op on tiles).
    """
    check_model(cfg)
    return frames_for(image_u8, cfg.image, cfg.vision.image_size)


def frames_for(image_u8: np.ndarray, image_cfg, tile: int) -> np.ndarray:
    """`image_frames` from the image settings (`config.ImageConfig`) and the CLIP input size alone."""
    image = _check_image(image_u8)
    if image_cfg.tiles:
        return tile_image(image, image_cfg.grid_pinpoints, tile).frames
    if image_cfg.anyres and image_cfg.grid_pinpoints is not None:
        # e.g. "flat": the original would feed the base image and every tile unpooled (576 tokens each).
        raise ValueError(f"image_aspect_ratio {image_cfg.aspect_ratio!r} with mm_patch_merge_type "
                         f"{image_cfg.patch_merge_type!r} is not supported for images (only 'unires')")
    if image_cfg.aspect_ratio == "pad":
        return expand_to_square(image)[None]
    return image[None]


def num_tokens(size: tuple[int, int], cfg) -> int:
    """Visual tokens of an image of `size` (w, h) for the model of `cfg` (tiles * tokens per frame when tiled)."""
    if not cfg.image.tiles:
        return cfg.tokens_per_frame
    cols, rows = grid_shape(size, cfg.image.grid_pinpoints, cfg.vision.image_size)
    return cols * rows * cfg.tokens_per_frame


def expand_to_square(image_u8: np.ndarray, mean: Sequence[float] = preprocess.CLIP_MEAN) -> np.ndarray:
    """The original's `expand2square`: the image centred (rounded down) on a square of colour int(mean * 255)."""
    h, w = image_u8.shape[:2]
    if h == w:
        return image_u8
    side = max(h, w)
    out = np.empty((side, side, 3), np.uint8)
    out[...] = np.asarray([int(m * 255) for m in mean], np.uint8)
    top, left = (side - h) // 2, (side - w) // 2
    out[top:top + h, left:left + w] = image_u8
    return out


def _check_image(image_u8: np.ndarray) -> np.ndarray:
    image = np.asarray(image_u8)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"expected an RGB image [H, W, 3], got shape {image.shape}")
    if image.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {image.dtype}")
    if 0 in image.shape:
        raise ValueError(f"empty image: shape {image.shape}")
    return image
