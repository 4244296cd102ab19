"""Video-XL = CLIP tower -> projector -> 2x2 pooling -> Qwen2 with VST parameters.

  params = {"vision": clip params, "projector": projector params, "llm": qwen2 params}

This module holds the parts every path shares: frame features, splicing them
into the token embeddings, and the plain (uncompressed) forward, LLaVA style.
The compressed prefill builds on the same pieces.

Axis legend: B batch, T tokens, F frames, M visual tokens, D width.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from vxl_jax import target
from vxl_jax.config import VideoXLConfig
from vxl_jax.model import clip, init, projector, qwen2

IMAGE_TOKEN_INDEX = -200  # the `<image>` placeholder id in a prompt (LLaVA convention)
CPU_FRAME_CHUNK = 2       # frames per CLIP call on CPU (see frame_features)


def init_params(cfg: VideoXLConfig, key: jax.Array, param_dtype=jnp.float32) -> dict:
    """Fresh random parameters (`model/init.py`: one normal draw, cheap to compile; LeCun-variance kernels)."""
    def structure():
        k = jax.random.key(0)
        return {
            "vision": clip.init_params(cfg.vision, k, param_dtype),
            "projector": projector.init_params(cfg.vision.hidden_size, cfg.llm.hidden_size, k, param_dtype),
            "llm": qwen2.init_params(cfg.llm, k, param_dtype),
        }
    return init.fill(structure, key, param_dtype)


def clip_features(params: dict, cfg: VideoXLConfig, pixels: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Selected CLIP hidden state without CLS: [F, g*g, Dv]."""
    # Under differentiation each CLIP layer keeps only its input and recomputes the rest in the backward
    # (a no-op without gradients): bench_small, 10 frames, one train step 1.70 -> 1.39 s, peak RSS 2.9 -> 1.6 GB,
    # the stacked per-layer residuals of every frame chunk cost more memory traffic than the recompute.
    hidden = clip.hidden_state(params["vision"], cfg.vision, pixels, cfg.vision_layers_used, dtype=dtype, remat=True)
    return hidden[:, 1:]


def normalise_pixels(frames: jax.Array, mean: jax.Array, std: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Raw frames [F, C, H, W] (uint8 or float) -> model input, per channel (x - mean[C]) / std[C] in float32."""
    x = (frames.astype(jnp.float32) - jnp.asarray(mean, jnp.float32)[:, None, None]) \
        / jnp.asarray(std, jnp.float32)[:, None, None]
    return x.astype(dtype)


def frame_features(params: dict, cfg: VideoXLConfig, pixels: jax.Array, dtype=jnp.float32,
                   frame_chunk: Optional[int] = None) -> jax.Array:
    """Preprocessed frames [F, C, H, W] -> visual tokens [F, tokens_per_frame, D].

    Frames are independent, so they run `frame_chunk` at a time (`lax.map`):
    on CPU small chunks keep each chunk's activations in cache (40 frames of
    bench_small on 2 CPU cores with the fused attention kernel: 0.59 s in
    chunks of 2, 0.67 s in chunks of 10, 0.76 s whole). Default: 2 on a CPU target, all
    frames at once elsewhere (`vxl_jax.target`: the platform the program is built for).
    """
    def one(chunk):
        projected = projector.project(params["projector"], clip_features(params, cfg, chunk, dtype), dtype)
        return projector.avg_pool_grid(projected, cfg.vision.grid, cfg.projector.pool_stride)

    frames = pixels.shape[0]
    chunk = frame_chunk or (CPU_FRAME_CHUNK if target.platform() == "cpu" else frames)
    if chunk >= frames:
        return one(pixels)
    count = -(-frames // chunk)
    padded = jnp.pad(pixels, ((0, count * chunk - frames),) + ((0, 0),) * (pixels.ndim - 1))
    out = jax.lax.map(one, padded.reshape(count, chunk, *pixels.shape[1:]))
    return out.reshape(count * chunk, *out.shape[2:])[:frames]


def splice_visual(embeds: jax.Array, visual_mask: jax.Array, features: jax.Array) -> jax.Array:
    """Writes features [B, M, D], in order, into the rows of embeds [B, T, D] where visual_mask [B, T]."""
    order = jnp.clip(jnp.cumsum(visual_mask.astype(jnp.int32), axis=1) - 1, 0, features.shape[1] - 1)
    gathered = jnp.take_along_axis(features, order[..., None], axis=1).astype(embeds.dtype)
    return jnp.where(visual_mask[..., None], gathered, embeds)


def embed_inputs(params: dict, input_ids: jax.Array, visual_mask: Optional[jax.Array] = None,
                 features: Optional[jax.Array] = None, dtype=None) -> jax.Array:
    """Token embeddings with visual features at the placeholder rows (their ids are never looked up)."""
    if visual_mask is None:
        return qwen2.embed(params["llm"], input_ids, dtype)
    x = qwen2.embed(params["llm"], jnp.where(visual_mask, 0, input_ids), dtype)
    return splice_visual(x, visual_mask, features)


def forward(params: dict, cfg: VideoXLConfig, input_ids: jax.Array, *, visual_mask: Optional[jax.Array] = None,
            features: Optional[jax.Array] = None, cache_size: Optional[int] = None, remat: str = "none",
            dtype=None) -> tuple[jax.Array, qwen2.KVCache]:
    """Plain causal forward over all tokens, no compression.

    input_ids [B, T]; visual_mask [B, T] marks rows that take features [B, M, D].
    Right padding needs no mask: causality keeps it out of the rows before it.
    Returns final-normed hidden states [B, T, D] (logits via `qwen2.logits`) and
    the KV buffer (rotated keys) of size `cache_size` (default T), so decoding
    can continue from it.
    """
    b, t = input_ids.shape
    x = embed_inputs(params, input_ids, visual_mask, features, dtype)
    start = jnp.zeros((b,), jnp.int32)
    ctx = qwen2.make_context(cfg.llm, start, t)
    hidden, entries = qwen2.decode_layers(params["llm"], cfg.llm, x, None, ctx, remat=remat, dtype=x.dtype)
    cache = qwen2.KVCache.zeros(cfg.llm, b, cache_size or t, x.dtype)
    return hidden, qwen2.append(cache, entries, start)


def split_prompt(input_ids) -> tuple[np.ndarray, np.ndarray]:
    """Host helper: a 1-D prompt with exactly one IMAGE_TOKEN_INDEX -> (prefix ids, suffix ids)."""
    ids = np.asarray(input_ids).reshape(-1)
    where = np.flatnonzero(ids == IMAGE_TOKEN_INDEX)
    if len(where) != 1:
        raise ValueError(f"the prompt must hold exactly one <image> placeholder ({IMAGE_TOKEN_INDEX}), "
                         f"found {len(where)}")
    return ids[:where[0]], ids[where[0] + 1:]


def expand_placeholder(input_ids: np.ndarray, num_visual: int, placeholder_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Host helper: a 1-D prompt with exactly one IMAGE_TOKEN_INDEX -> (expanded ids, visual mask).

    The placeholder rows get `placeholder_id` (never looked up: features replace them).
    """
    prefix, suffix = split_prompt(input_ids)
    expanded = np.concatenate([prefix, np.full(num_visual, placeholder_id, prefix.dtype), suffix])
    mask = np.zeros(expanded.shape, bool)
    mask[len(prefix):len(prefix) + num_visual] = True
    return expanded, mask
