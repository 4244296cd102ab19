"""Selective KV re-loading (Video-X2L): one memory of L-KV entries for the selected chunks, H-KV for the rest.

The merged memory of a row is `[prefix | chunk 0 | chunk 1 | ...]`, each chunk
taken from the L memory if selected and from the H memory otherwise, in
temporal order. Positions are the buffer indices and keys are stored rotated to
them, so re-numbering is one rotation per moved key by its shift (new slot -
old slot): the merged entries get positions 0..n-1 with no gaps.

Two ways to build it, equal entry for entry: `merge_on_device` gathers from
both memories on the accelerator; `merge_from_host` assembles the selected
entries from host copies (`Encoding.offload`) and moves only them.

Axis legend: L layers, B batch, M merged slots, K kv heads, H head dim.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vxl_jax import program_cache
from vxl_jax.compress.memory import Memory, shift_keys
from vxl_jax.model.qwen2 import KVCache
from vxl_jax.x2l.bilevel import Encoding

LOW, HIGH = 0, 1


def sources(enc: Encoding, selected: Sequence[Sequence[bool]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per row: (level [n], index [n]) of each merged entry in order; n = Encoding.entries(row, selected)."""
    out = []
    for b, sel in enumerate(selected):
        chunks = enc.num_chunks[b]
        sel = np.asarray(sel, bool)
        if sel.shape != (chunks,):
            raise ValueError(f"row {b}: the selection has {sel.shape[0] if sel.ndim else 0} entries, "
                             f"the video {chunks} chunk(s)")
        p = int(enc.prefix_len[b])
        levels, index = [np.full(p, LOW)], [np.arange(p)]
        for w in range(chunks):
            bounds, level = (enc.low_bounds, LOW) if sel[w] else (enc.high_bounds, HIGH)
            lo, hi = int(bounds[b, w]), int(bounds[b, w + 1])
            levels.append(np.full(hi - lo, level))
            index.append(np.arange(lo, hi))
        out.append((np.concatenate(levels).astype(np.int32), np.concatenate(index).astype(np.int32)))
    return out


def _padded(rows: list[tuple[np.ndarray, np.ndarray]], size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    level = np.zeros((len(rows), size), np.int32)
    index = np.zeros((len(rows), size), np.int32)
    length = np.zeros(len(rows), np.int32)
    for b, (lv, ix) in enumerate(rows):
        if len(lv) > size:
            raise ValueError(f"row {b}: {len(lv)} merged entries do not fit a memory of {size}")
        level[b, :len(lv)], index[b, :len(ix)], length[b] = lv, ix, len(lv)
    return level, index, length


def _gather(low: KVCache, high: KVCache, level: jax.Array, index: jax.Array) -> KVCache:
    def pick(lo, hi):                                                    # [L, B, S, K, H] -> [L, B, M, K, H]
        at = lambda buf: jnp.take_along_axis(buf, jnp.clip(index, 0, buf.shape[2] - 1)[None, :, :, None, None],
                                             axis=2)
        return jnp.where((level == LOW)[None, :, :, None, None], at(lo), at(hi))

    return KVCache(pick(low.k, high.k), pick(low.v, high.v))


_gather_jit = program_cache.jit(_gather)
_shift_jit = program_cache.jit(shift_keys, static_argnames=("theta",))


def _renumbered(cache: KVCache, index: np.ndarray, theta: float) -> KVCache:
    """Keys rotated from their source slot `index` [B, M] to their merged slot (both merges run this program)."""
    shift = np.arange(index.shape[1], dtype=np.int32)[None, :] - index
    return KVCache(_shift_jit(cache.k, jnp.asarray(shift), theta=theta), cache.v)


def merge_on_device(enc: Encoding, selected: Sequence[Sequence[bool]], size: int, rope_theta: float) -> Memory:
    """The merged memory [L, B, size, K, H] gathered from both device memories."""
    if enc.device is None:
        raise ValueError("this encoding lives in host memory: use merge_from_host")
    level, index, length = _padded(sources(enc, selected), size)
    cache = _gather_jit(enc.device.low.cache, enc.device.high.cache, jnp.asarray(level), jnp.asarray(index))
    return Memory(_renumbered(cache, index, rope_theta), jnp.asarray(length))


def merge_from_host(enc: Encoding, selected: Sequence[Sequence[bool]], size: int, rope_theta: float) -> Memory:
    """The merged memory assembled from host copies; only the selected entries are moved to the device."""
    if enc.host_low is None:
        raise ValueError("this encoding lives on the device: call Encoding.offload() first, or merge_on_device")
    rows = sources(enc, selected)
    level, index, length = _padded(rows, size)
    layers, _, kv_heads, head_dim = enc.host_low[0][0].shape
    dtype = enc.host_low[0][0].dtype
    k = np.zeros((layers, len(rows), size, kv_heads, head_dim), dtype)
    v = np.zeros_like(k)
    for b, (lv, ix) in enumerate(rows):
        low_k, low_v = enc.host_low[b]
        high_k, high_v = enc.host_high[b]
        n = len(lv)
        is_low = lv == LOW
        k[:, b, :n][:, is_low], v[:, b, :n][:, is_low] = low_k[:, ix[is_low]], low_v[:, ix[is_low]]
        k[:, b, :n][:, ~is_low], v[:, b, :n][:, ~is_low] = high_k[:, ix[~is_low]], high_v[:, ix[~is_low]]
    cache = KVCache(jnp.asarray(k), jnp.asarray(v))
    return Memory(_renumbered(cache, index, rope_theta), jnp.asarray(length))
