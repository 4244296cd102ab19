"""Compressed prefill: prefix, then a `lax.scan` over visual windows, then the suffix text.

One call runs a whole batch: `[prefix | visual windows | suffix]` per row, with
the plan as arrays (`packing.pack`). The memory (`memory.Memory`) is carried
through the scan. Per window:

  1. the window's visual tokens: sliced from precomputed features, or computed
     from its frames (CLIP -> projector -> pooling) inside the scan, so only one
     window of frames is ever expanded (pixels can stay uint8 until then);
  2. `lax.switch` on the window's ratio: each ratio is a branch with its own
     static length `window + ceil(window / r)`; the VSTs sit at the plan's slots
     and take the VST embedding and projections, raw rows take the features;
  3. all layers run over the fed tokens written at the row's memory length,
     attending causally over `[memory | window]` with compact positions;
  4. only the VST entries are kept: gathered down to the memory's end, the
     length advances by the row's VST count. An uncompressed window (ratio None)
     keeps its raw entries as they are. A window index past every row's video is
     the no-op branch; a row whose video ended earlier runs with zero counts and
     keeps nothing.

Axis legend: B batch, W windows, T fed tokens, D width, V vocabulary, F frames.
"""

from __future__ import annotations

from typing import Optional

import flax
import jax
import jax.numpy as jnp

from vxl_jax import parallel
from vxl_jax.compress.memory import Memory, keep_rows
from vxl_jax.compress.packing import PlanArrays, PrefillSpec
from vxl_jax.config import VideoXLConfig
from vxl_jax.model import qwen2, videoxl

CACHE_AXES = ("layers", "batch", "seq", "kv_heads", "head_dim")   # the memory carried between windows
TRACES = {"prefill": 0}  # incremented at trace time; tests count compilations with it


@flax.struct.dataclass
class PrefillResult:
    memory: Memory               # [prefix | kept | suffix] per row, ready for decoding
    last_logits: jax.Array       # [B, V] float32 at each row's last suffix token
    prefix_hidden: jax.Array     # [B, P, D] final-normed hidden states of the prefix (the training loss reads them)
    suffix_hidden: jax.Array     # [B, S, D] final-normed hidden states of the suffix text
    memory_before: jax.Array     # [W, B] memory length when each window started


def _window_visual(params, cfg: VideoXLConfig, visual, w, window: int, pixel_norm, dtype):
    """The window's visual tokens [B, window, D] from features or from frames."""
    if visual.ndim == 3:                                   # features [B, W*window, D]
        return jax.lax.dynamic_slice_in_dim(visual, w * window, window, axis=1).astype(dtype)
    per_frame = cfg.tokens_per_frame                       # frames [B, W*frames, C, H, W]
    frames = window // per_frame
    chunk = jax.lax.dynamic_slice_in_dim(visual, w * frames, frames, axis=1)
    b = chunk.shape[0]
    pixels = chunk.reshape(b * frames, *chunk.shape[2:])
    pixels = pixels.astype(dtype) if pixel_norm is None else videoxl.normalise_pixels(pixels, *pixel_norm, dtype)
    feats = videoxl.frame_features(params, cfg, pixels, dtype=dtype)
    return feats.reshape(b, frames * per_frame, -1)


def _compressed_branch(params, cfg: VideoXLConfig, spec: PrefillSpec, ratio: Optional[int], remat: str):
    """The step of one ratio: (cache, length, feats, kept, slots) -> (cache, length)."""
    fed = spec.fed_length(ratio)
    n_vst = spec.max_vst(ratio)

    def step(cache, length, feats, kept, slots):
        b = length.shape[0]
        x, is_vst = feats, None                               # ratio None: the raw tokens as they are
        if ratio is not None:
            t = jnp.arange(fed, dtype=jnp.int32)
            slots = slots[:, :n_vst]
            valid = jnp.arange(n_vst)[None, :] < kept[:, None]
            is_vst = jnp.zeros((b, fed), bool).at[jnp.arange(b)[:, None], jnp.where(valid, slots, fed)].set(
                True, mode="drop")
            raw_idx = jnp.clip(t[None, :] - jnp.cumsum(is_vst, axis=1), 0, spec.window - 1)
            raw_rows = jnp.take_along_axis(feats, raw_idx[..., None], axis=1)
            vst_row = params["llm"]["vst_embed"][0].astype(feats.dtype)
            x = jnp.where(is_vst[..., None], vst_row, raw_rows)
        ctx = qwen2.make_context(cfg.llm, length, fed, spec.buffer_size, is_vst=is_vst)
        _, cache = qwen2.decode_layers(params["llm"], cfg.llm, x, cache, ctx, remat=remat, dtype=x.dtype)
        if ratio is not None:
            cache = keep_rows(cache, length, slots)
        return cache, length + kept

    return step


def prefill(params: dict, cfg: VideoXLConfig, plan: PlanArrays, visual: jax.Array, *, spec: PrefillSpec,
            pixel_norm: Optional[tuple[jax.Array, jax.Array]] = None, dtype=jnp.float32,
            remat: str = "none", remat_window: str = "none") -> PrefillResult:
    """Runs the compressed prefill of a batch; see the module docstring.

    visual: features [B, W*window, D], or frames [B, W*window/tokens_per_frame,
    C, H, W] (uint8 or float) that are turned into features window by window;
    `pixel_norm` = (mean [C], std [C]) maps raw pixel values to model input.
    remat / remat_window: rematerialisation policy (`qwen2.REMAT_POLICIES`) of
    one layer and of one whole window step; under differentiation "full" on the
    window keeps only the carried memory per window and recomputes the rest.
    """
    TRACES["prefill"] += 1
    llm, lcfg = params["llm"], cfg.llm
    batch = plan.prefix_ids.shape[0]
    memory = Memory.empty(lcfg, batch, spec.buffer_size, dtype)

    # 1. prefix (the sink): causal, kept whole. Padding past prefix_len is scratch.
    x = qwen2.embed(llm, plan.prefix_ids, dtype)
    ctx = qwen2.make_context(lcfg, memory.length, x.shape[1], spec.buffer_size)
    prefix_hidden, cache = qwen2.decode_layers(llm, lcfg, x, memory.cache, ctx, remat=remat, dtype=dtype)
    length = plan.prefix_len.astype(jnp.int32)

    # 2. the visual windows
    branches = [_compressed_branch(params, cfg, spec, r, remat) for r in spec.ratios]

    def window_step(carry, xs):
        cache, length = carry
        w, branch, kept, slots = xs
        feats = jax.lax.cond(branch == spec.noop_branch,
                             lambda: jnp.zeros((batch, spec.window, lcfg.hidden_size), dtype),
                             lambda: _window_visual(params, cfg, visual, w, spec.window, pixel_norm, dtype))
        noop = lambda c, l, f, k, s: (c, l)
        new_cache, new_length = jax.lax.switch(branch, [*branches, noop], cache, length, feats, kept, slots)
        new_cache = jax.tree.map(lambda c: parallel.constrain(c, CACHE_AXES), new_cache)
        return (new_cache, new_length), length

    if remat_window != "none":
        window_step = jax.checkpoint(window_step, policy=qwen2.REMAT_POLICIES[remat_window], prevent_cse=False)
    xs = (jnp.arange(plan.num_windows, dtype=jnp.int32), plan.branch, plan.kept.T, plan.vst_slots.swapaxes(0, 1))
    (cache, length), memory_before = jax.lax.scan(window_step, (cache, length), xs)

    # 3. the suffix text: uncompressed, kept.
    x = qwen2.embed(llm, plan.suffix_ids, dtype)
    ctx = qwen2.make_context(lcfg, length, x.shape[1], spec.buffer_size)
    hidden, cache = qwen2.decode_layers(llm, lcfg, x, cache, ctx, remat=remat, dtype=dtype)
    last = jnp.take_along_axis(hidden, (plan.suffix_len - 1)[:, None, None].astype(jnp.int32), axis=1)[:, 0]
    return PrefillResult(memory=Memory(cache, length + plan.suffix_len.astype(jnp.int32)),
                         last_logits=qwen2.logits(llm, lcfg, last), prefix_hidden=prefix_hidden,
                         suffix_hidden=hidden,
                         memory_before=memory_before)


prefill_jit = jax.jit(prefill, static_argnames=("cfg", "spec", "dtype", "remat", "remat_window"))
