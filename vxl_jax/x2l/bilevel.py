"""Bi-level KV compression (Video-X2L): every window compressed at a low and a high ratio, both kept.

One scan over the windows computes each window's visual tokens once (frames
stream through CLIP window by window) and runs two passes of the LLM over it:
the L pass (low ratio, fine detail) on top of the L memory and the H pass (high
ratio) on top of the H memory, as two independent Video-XL prefills would. The
prefix (sink) is shared: it is computed once and copied into both memories.
No text follows the video here: each question is appended later, to whichever
mix of L and H entries it selects (`x2l.merge`).

Per level the memory holds `[prefix | window 0's entries | window 1's | ...]`;
`starts[w]` / `ends[w]` say where window w's entries are. Keys are pre-RoPE,
so any re-assembly is valid with compact positions.

Axis legend: L layers, B batch, S memory slots, K kv heads, H head dim, W windows, F frames, D width.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import flax
import jax
import jax.numpy as jnp
import numpy as np

from vxl_jax import program_cache
from vxl_jax.compress import packing
from vxl_jax.compress.memory import Memory
from vxl_jax.compress.packing import Buckets, PlanArrays, PrefillSpec
from vxl_jax.compress.plan import Plan, make_plan, num_windows
from vxl_jax.compress.prefill import run_prefix, run_windows
from vxl_jax.config import VideoXLConfig
from vxl_jax.model.qwen2 import KVCache

TRACES = {"encode": 0}  # incremented at trace time; tests count compilations with it


@flax.struct.dataclass
class BiLevel:
    """Device result of the bi-level encoding of a batch of videos."""

    low: Memory                # [prefix | each window's L-KV entries] per row
    high: Memory               # [prefix | each window's H-KV entries] per row
    low_starts: jax.Array      # [W, B] where each window's L entries begin
    high_starts: jax.Array     # [W, B]
    frame_means: jax.Array     # [W, B, window frames, D] each frame's mean visual token, from the window's start


def encode(params: dict, cfg: VideoXLConfig, low_plan: PlanArrays, high_plan: PlanArrays, visual: jax.Array, *,
           low_spec: PrefillSpec, high_spec: PrefillSpec, pixel_norm=None, dtype=jnp.float32) -> BiLevel:
    """Prefix once, then the windows at both levels in one scan (module docstring)."""
    TRACES["encode"] += 1
    _, low = run_prefix(params, cfg, low_plan, low_spec.buffer_size, dtype=dtype)
    size = high_spec.buffer_size
    prefix = low_plan.prefix_ids.shape[1]
    copy = lambda buf: jnp.zeros(buf.shape[:2] + (size,) + buf.shape[3:], buf.dtype).at[:, :, :prefix].set(
        buf[:, :, :prefix])
    high = Memory(KVCache(copy(low.cache.k), copy(low.cache.v)), low.length)
    (low, high), (low_starts, high_starts), means = run_windows(
        params, cfg, [(low_plan, low_spec), (high_plan, high_spec)], [low, high], visual, pixel_norm=pixel_norm,
        dtype=dtype, frame_means=True)
    return BiLevel(low, high, low_starts, high_starts, means)


encode_jit = program_cache.jit(encode, static_argnames=("cfg", "low_spec", "high_spec", "dtype"))


@dataclasses.dataclass(frozen=True)
class Encoding:
    """A bi-level encoding with its host-side layout: which entries of each level belong to which chunk.

    `device` holds the memories on the accelerator, or None once they were moved
    to host memory (`offload`); then `host_low` / `host_high` hold each row's
    valid entries as numpy [L, n, K, H] pairs (keys, values).
    """

    plans: tuple[tuple[Plan, Plan], ...]     # per row: (L plan, H plan) of the same windows
    prefix_len: np.ndarray                   # [B]
    low_bounds: np.ndarray                   # [B, W + 1] entry offsets of the windows in the L memory
    high_bounds: np.ndarray                  # [B, W + 1]
    chunk_frames: tuple[tuple[tuple[int, int], ...], ...]   # per row, per window: (first frame, frames)
    frame_features: tuple[np.ndarray, ...]   # per row [F, D]: each frame's mean visual token
    device: Optional[BiLevel]
    host_low: Optional[tuple] = None
    host_high: Optional[tuple] = None

    @property
    def num_chunks(self) -> list[int]:
        return [len(p[0].windows) for p in self.plans]

    def entries(self, row: int, selected: Sequence[bool]) -> int:
        """KV entries per layer of row's merged memory (prefix + L for selected chunks + H for the rest)."""
        low = np.diff(self.low_bounds[row])
        high = np.diff(self.high_bounds[row])
        n = self.num_chunks[row]
        sel = np.asarray(selected, bool)[:n]
        return int(self.prefix_len[row] + low[:n][sel].sum() + high[:n][~sel].sum())

    def offload(self) -> "Encoding":
        """The same encoding with both levels' valid entries copied to host memory and the device copy dropped."""
        if self.device is None:
            return self

        def rows(memory: Memory):
            k, v = jax.device_get((memory.cache.k, memory.cache.v))
            length = np.asarray(jax.device_get(memory.length))
            return tuple((np.ascontiguousarray(k[:, b, :length[b]]), np.ascontiguousarray(v[:, b, :length[b]]))
                         for b in range(len(length)))

        return dataclasses.replace(self, device=None, host_low=rows(self.device.low),
                                   host_high=rows(self.device.high))


def plan_levels(cfg: VideoXLConfig, prefixes: Sequence[np.ndarray], num_visual: Sequence[int], low: int, high: int,
                lengths: Optional[Sequence[Optional[Sequence[int]]]] = None, *, buckets: Buckets = Buckets()):
    """Host: the two levels' plans (same windows) and their packed arrays."""
    window = cfg.vst.window
    lengths = lengths or [None] * len(prefixes)
    low_plans, high_plans = [], []
    for prefix, n, lens in zip(prefixes, num_visual, lengths):
        count = len(lens) if lens is not None else num_windows(n, window)
        low_plans.append(make_plan(len(prefix), n, 0, [low] * count, window=window, lengths=lens))
        high_plans.append(make_plan(len(prefix), n, 0, [high] * count, window=window, lengths=lens))
    empty = [np.zeros(0, np.int64)] * len(prefixes)
    low_arrays, low_spec = packing.pack(low_plans, prefixes, empty, buckets=buckets, require_suffix=False)
    high_arrays, high_spec = packing.pack(high_plans, prefixes, empty, buckets=buckets, require_suffix=False)
    return low_plans, high_plans, (low_arrays, low_spec), (high_arrays, high_spec)


def layout(cfg: VideoXLConfig, low_plans: Sequence[Plan], high_plans: Sequence[Plan], result: BiLevel):
    """Host: per-row entry bounds of each window at both levels, chunk frame ranges and per-frame features."""
    per_frame = cfg.tokens_per_frame
    means = np.asarray(jax.device_get(result.frame_means))            # [W, B, frames, D]
    low_bounds, high_bounds, chunks, features = [], [], [], []
    for b, (lp, hp) in enumerate(zip(low_plans, high_plans)):
        n = len(lp.windows)
        low_bounds.append(lp.prefix + np.concatenate([[0], np.cumsum([w.kept for w in lp.windows])]))
        high_bounds.append(hp.prefix + np.concatenate([[0], np.cumsum([w.kept for w in hp.windows])]))
        rows, feats = [], []
        for w, win in enumerate(lp.windows[:n]):
            first, frames = (win.start - lp.prefix) // per_frame, -(-win.raw // per_frame)
            rows.append((first, frames))
            feats.append(means[w, b, :frames])
        chunks.append(tuple(rows))
        features.append(np.concatenate(feats) if feats else np.zeros((0, means.shape[-1]), np.float32))
    width = max(len(x) for x in low_bounds)
    pad = lambda xs: np.stack([np.pad(x, (0, width - len(x)), mode="edge") for x in xs])
    return pad(low_bounds), pad(high_bounds), tuple(chunks), tuple(features)
