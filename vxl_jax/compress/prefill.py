"""Compressed prefill: prefix, then a `lax.scan` over visual windows, then the suffix text.

One call runs a whole batch: `[prefix | visual windows | suffix]` per row, with
the plan as arrays (`packing.pack`). The memory (`memory.Memory`) is carried
through the scan. Per window:

  1. the window's visual tokens, from each row's window start (plan data, so
     windows of variable length share the program): sliced from precomputed
     features, or computed from its frames (CLIP -> projector -> pooling) inside
     the scan, so only one window of frames is ever expanded (pixels can stay
     uint8 until then);
  2. `lax.switch` on the window's ratio: each ratio is a branch with its own
     static length `window + ceil(window / r)`; the VSTs sit at the plan's slots
     and take the VST embedding and projections, raw rows take the features;
  3. all layers run over the fed tokens, each query seeing the whole memory and
     the window causally, with compact positions (`attention.attend`);
  4. only the VST entries are kept: each layer projects just the VST rows with
     the VST q/k/v and returns their keys rotated to the positions they take
     after the memory, written there; the length advances by the row's VST
     count. The window's raw entries never enter the buffer. An uncompressed
     window (ratio None) keeps its raw entries. A window index past every row's video is
     the no-op branch; a row whose video ended earlier runs with zero counts and
     keeps nothing.

Axis legend: B batch, W windows, T fed tokens, D width, V vocabulary, F frames.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import flax
import jax
import jax.numpy as jnp

from vxl_jax import parallel, program_cache
from vxl_jax.compress.memory import Memory
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


def _window_visual(params, cfg: VideoXLConfig, visual, starts, window: int, pixel_norm, dtype):
    """The window's visual tokens [B, window, D], row b from its own start (features or frames).

    starts [B]: the window's first raw token in each row's visual input (windows
    of a schedule with variable lengths start at different places per row).
    Tokens past the window's real length are the next window's or padding; they
    come after every VST the window keeps, so causality hides them.
    """
    if visual.ndim == 3:                                   # features [B, W*window, D]
        take = lambda v, s: jax.lax.dynamic_slice_in_dim(v, s, window, axis=0)
        return jax.vmap(take)(visual, starts).astype(dtype)
    per_frame = cfg.tokens_per_frame                       # frames [B, W*frames, C, H, W]
    frames = window // per_frame
    take = lambda v, s: jax.lax.dynamic_slice_in_dim(v, s // per_frame, frames, axis=0)
    chunk = jax.vmap(take)(visual, starts)
    b = chunk.shape[0]
    pixels = chunk.reshape(b * frames, *chunk.shape[2:])
    pixels = pixels.astype(dtype) if pixel_norm is None else videoxl.normalise_pixels(pixels, *pixel_norm, dtype)
    feats = videoxl.frame_features(params, cfg, pixels, dtype=dtype)
    return feats.reshape(b, frames * per_frame, -1)


def _compressed_branch(params, cfg: VideoXLConfig, spec: PrefillSpec, ratio: Optional[int], remat: str):
    """The step of one ratio: (cache, length, feats, kept, slots) -> (entries [L, B, spec.max_write, K, H], length).

    The branch only reads the memory; the caller writes the entries after the
    switch, so the carried buffer is updated in place (a write inside each
    branch of a conditional would make XLA copy the buffer).
    """
    fed = spec.fed_length(ratio)
    n_vst = spec.max_vst(ratio)

    def step(cache, length, feats, kept, slots):
        b = length.shape[0]
        x, vst_slots, valid = feats, None, None               # ratio None: the raw tokens as they are
        if ratio is not None:
            t = jnp.arange(fed, dtype=jnp.int32)
            vst_slots = slots[:, :n_vst]
            valid = jnp.arange(n_vst)[None, :] < kept[:, None]
            is_vst = jnp.zeros((b, fed), bool).at[jnp.arange(b)[:, None], jnp.where(valid, vst_slots, fed)].set(
                True, mode="drop")
            raw_idx = jnp.clip(t[None, :] - jnp.cumsum(is_vst, axis=1), 0, spec.window - 1)
            raw_rows = jnp.take_along_axis(feats, raw_idx[..., None], axis=1)
            vst_row = params["llm"]["vst_embed"][0].astype(feats.dtype)
            x = jnp.where(is_vst[..., None], vst_row, raw_rows)
        ctx = qwen2.make_context(cfg.llm, length, fed, vst_slots=vst_slots, vst_valid=valid)
        _, entries = qwen2.decode_layers(params["llm"], cfg.llm, x, cache, ctx, remat=remat, dtype=x.dtype,
                                         need_hidden=False)
        pad = ((0, 0), (0, 0), (0, spec.max_write - entries.k.shape[2]), (0, 0), (0, 0))
        return jax.tree.map(lambda e: jnp.pad(e, pad), entries), length + kept

    return step


def _noop_branch(spec: PrefillSpec):
    def step(cache, length, feats, kept, slots):
        shape = cache.k.shape[:2] + (spec.max_write,) + cache.k.shape[3:]
        return qwen2.KVCache(jnp.zeros(shape, cache.k.dtype), jnp.zeros(shape, cache.v.dtype)), length
    return step


def run_prefix(params: dict, cfg: VideoXLConfig, plan: PlanArrays, buffer_size: int, *, dtype=jnp.float32,
               remat: str = "none") -> tuple[jax.Array, Memory]:
    """The prefix text (the sink), causal and kept whole: (final-normed hidden [B, P, D], memory)."""
    llm, lcfg = params["llm"], cfg.llm
    memory = Memory.empty(lcfg, plan.prefix_ids.shape[0], buffer_size, dtype)
    x = qwen2.embed(llm, plan.prefix_ids, dtype)
    ctx = qwen2.make_context(lcfg, memory.length, x.shape[1])
    hidden, entries = qwen2.decode_layers(llm, lcfg, x, None, ctx, remat=remat, dtype=dtype)
    cache = qwen2.append(memory.cache, entries, memory.length)
    return hidden, Memory(cache, plan.prefix_len.astype(jnp.int32))   # padding past prefix_len is scratch


def run_windows(params: dict, cfg: VideoXLConfig, levels: Sequence[tuple[PlanArrays, PrefillSpec]],
                memories: Sequence[Memory], visual: jax.Array, *, pixel_norm=None, dtype=jnp.float32,
                remat: str = "none", remat_window: str = "none", frame_means: bool = False):
    """The scan over visual windows, for one or more compression levels of the same windows.

    Each level (its plan arrays and spec) carries its own memory; a window's
    visual tokens are computed once and fed to every level (Video-X2L's L-KV and
    H-KV passes share CLIP). Returns the memories and, per level, [W, B] the
    memory length when each window started; with `frame_means` also [W, B,
    window frames, D]: each frame's mean visual token, read from the window's
    start (what the attention relevance oracle compares the question with).
    """
    batch, hidden = levels[0][0].prefix_ids.shape[0], cfg.llm.hidden_size
    window, noop = levels[0][1].window, [spec.noop_branch for _, spec in levels]
    steps = [[*[_compressed_branch(params, cfg, spec, r, remat) for r in spec.ratios], _noop_branch(spec)]
             for _, spec in levels]

    def window_step(carry, xs):
        w_starts, per_level = xs
        active = functools.reduce(jnp.logical_or, [b != n for (b, _, _), n in zip(per_level, noop)])
        feats = jax.lax.cond(active,
                             lambda: _window_visual(params, cfg, visual, w_starts, window, pixel_norm, dtype),
                             lambda: jnp.zeros((batch, window, hidden), dtype))
        new_carry = []
        for (cache, length), (branch, kept, slots), branches in zip(carry, per_level, steps):
            entries, new_length = jax.lax.switch(branch, branches, cache, length, feats, kept, slots)
            cache = qwen2.append(cache, entries, length)
            cache = jax.tree.map(lambda c: parallel.constrain(c, CACHE_AXES), cache)
            new_carry.append((cache, new_length))
        before = [length for _, length in carry]
        if frame_means:
            per_frame = cfg.tokens_per_frame
            return new_carry, (before, feats.reshape(batch, window // per_frame, per_frame, hidden).mean(axis=2))
        return new_carry, before

    # One window: its residuals are needed by the backward anyway (nothing else of size lives beside them),
    # so recomputing it would cost a forward and save nothing (bench_small, 10 frames: 2.06 -> 1.72 s a step).
    if remat_window != "none" and levels[0][0].visual_start.shape[1] > 1:
        window_step = jax.checkpoint(window_step, policy=qwen2.REMAT_POLICIES[remat_window], prevent_cse=False)
    xs = (levels[0][0].visual_start.T,
          [(plan.branch, plan.kept.T, plan.vst_slots.swapaxes(0, 1)) for plan, _ in levels])
    if frame_means and window % cfg.tokens_per_frame:
        raise ValueError(f"frame means need whole frames per window: {window} tokens, {cfg.tokens_per_frame} per frame")
    carry, ys = jax.lax.scan(window_step, [(m.cache, m.length) for m in memories], xs)
    memories = [Memory(cache, length) for cache, length in carry]
    return (memories, *ys) if frame_means else (memories, ys)


def run_text(params: dict, cfg: VideoXLConfig, memory: Memory, ids: jax.Array, lengths: jax.Array, *,
             dtype=jnp.float32, remat: str = "none") -> tuple[jax.Array, Memory, jax.Array]:
    """Uncompressed text [B, T] (right-padded to `lengths`) appended to a memory.

    Returns (final-normed hidden [B, T, D], the memory with the text kept, logits
    [B, V] float32 at each row's last text token).
    """
    llm, lcfg = params["llm"], cfg.llm
    x = qwen2.embed(llm, ids, dtype)
    ctx = qwen2.make_context(lcfg, memory.length, x.shape[1])
    hidden, entries = qwen2.decode_layers(llm, lcfg, x, memory.cache, ctx, remat=remat, dtype=dtype)
    cache = qwen2.append(memory.cache, entries, memory.length)
    last = jnp.take_along_axis(hidden, (lengths - 1)[:, None, None].astype(jnp.int32), axis=1)[:, 0]
    return hidden, Memory(cache, memory.length + lengths.astype(jnp.int32)), qwen2.logits(llm, lcfg, last)


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
    prefix_hidden, memory = run_prefix(params, cfg, plan, spec.buffer_size, dtype=dtype, remat=remat)
    (memory,), (memory_before,) = run_windows(params, cfg, [(plan, spec)], [memory], visual, pixel_norm=pixel_norm,
                                              dtype=dtype, remat=remat, remat_window=remat_window)
    hidden, memory, last_logits = run_text(params, cfg, memory, plan.suffix_ids, plan.suffix_len, dtype=dtype,
                                           remat=remat)
    return PrefillResult(memory=memory, last_logits=last_logits, prefix_hidden=prefix_hidden,
                         suffix_hidden=hidden, memory_before=memory_before)


prefill_jit = program_cache.jit(prefill,
                                static_argnames=("cfg", "spec", "dtype", "remat", "remat_window"))
