"""Prompts + videos -> compressed memory -> tokens, a batch at a time.

The host part (`prepare`) splits each prompt at its `<image>` placeholder,
plans the windows from a schedule, and pads ids, plan arrays and the visual
input to the size bucket; the device part (`run`) is two compiled calls, the
prefill and the decode loop.

    prepared = pipeline.prepare(cfg, [prompt_ids], [frames_u8], schedules.fixed(8), max_new_tokens=16)
    result, gen = pipeline.run(params, cfg, prepared, max_new_tokens=16, pixel_norm=norm)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from vxl_jax.compress import packing
from vxl_jax.compress.packing import Buckets, PlanArrays, PrefillSpec
from vxl_jax.compress.plan import Plan, make_plan
from vxl_jax.compress.prefill import PrefillResult, prefill_jit
from vxl_jax.compress.schedules import Schedule, VideoInfo
from vxl_jax.config import VideoXLConfig
from vxl_jax.generate import GREEDY, Generation, Sampling, generate_jit
from vxl_jax.model.videoxl import split_prompt


@dataclasses.dataclass(frozen=True)
class Prepared:
    plans: tuple[Plan, ...]
    arrays: PlanArrays
    spec: PrefillSpec
    visual: np.ndarray        # [B, W*window, D] features or [B, W*frames_per_window, C, H, W] frames

    @property
    def streams_frames(self) -> bool:
        return self.visual.ndim == 5


def _visual_tokens(v: np.ndarray, cfg: VideoXLConfig) -> tuple[str, int]:
    if v.ndim == 4:
        return "frames", v.shape[0] * cfg.tokens_per_frame
    if v.ndim in (2, 3):
        if v.shape[-1] != cfg.llm.hidden_size:
            raise ValueError(f"features have width {v.shape[-1]}, the model {cfg.llm.hidden_size}")
        return "features", int(np.prod(v.shape[:-1]))
    raise ValueError(f"a video is frames [F, C, H, W] or features [n, D] / [F, tokens, D]; got shape {v.shape}")


def mean_frame_features(visual: np.ndarray, tokens_per_frame: int) -> np.ndarray:
    """Per-frame features of a features input: each frame's visual tokens averaged, [F, D]."""
    v = np.asarray(visual, np.float32).reshape(-1, np.asarray(visual).shape[-1])
    if len(v) % tokens_per_frame:
        raise ValueError(f"{len(v)} visual tokens are not whole frames of {tokens_per_frame}")
    return v.reshape(-1, tokens_per_frame, v.shape[-1]).mean(axis=1)


def prepare(cfg: VideoXLConfig, prompts: Sequence, visuals: Sequence[np.ndarray],
            schedule: Union[Schedule, Sequence[Schedule]], *, key: Optional[jax.Array] = None,
            frame_features: Optional[Callable[[np.ndarray], np.ndarray]] = None,
            questions: Optional[Sequence[np.ndarray]] = None, ratios: Optional[Sequence[Optional[int]]] = None,
            buckets: Buckets = Buckets(), max_new_tokens: int = 0) -> Prepared:
    """Plans and pads a batch. `schedule` is one schedule for all rows or one per row.

    key: the PRNG key random schedules draw from (every row gets the same key,
    so rows agree per window index). frame_features(visual) -> [F, D]: what
    content-aware schedules (`schedules.dynamic`) look at; features inputs
    default to each frame's mean token, frames need it given. questions: one
    embedding [D] per row for schedules that read `VideoInfo.question`.
    """
    if len(prompts) != len(visuals):
        raise ValueError(f"{len(prompts)} prompts but {len(visuals)} videos")
    schedules = list(schedule) if isinstance(schedule, (list, tuple)) else [schedule] * len(prompts)
    window, per_frame = cfg.vst.window, cfg.tokens_per_frame
    kinds, plans, prefixes, suffixes = set(), [], [], []
    for b, (prompt, visual, sched) in enumerate(zip(prompts, visuals, schedules)):
        prefix, suffix = split_prompt(prompt)
        visual = np.asarray(visual)
        kind, n = _visual_tokens(visual, cfg)
        kinds.add(kind)
        if frame_features is not None:
            features_fn = functools.partial(frame_features, visual)
        elif kind == "features":
            features_fn = functools.partial(mean_frame_features, visual, per_frame)
        else:
            features_fn = None
        info = VideoInfo(n, per_frame, window, None if questions is None else np.asarray(questions[b]),
                         features_fn)
        segments = sched(info, key)
        if kind == "frames" and any(length % per_frame for length in segments.lengths):
            raise ValueError(f"streaming frames needs windows of whole frames ({per_frame} tokens each), "
                             f"the schedule gave lengths {list(segments.lengths)}")
        plans.append(make_plan(len(prefix), n, len(suffix), segments.ratios, window=window,
                               lengths=segments.lengths))
        prefixes.append(prefix)
        suffixes.append(suffix)
    if len(kinds) != 1:
        raise ValueError("a batch holds either frames or features, not both")
    arrays, spec = packing.pack(plans, prefixes, suffixes, ratios=ratios, buckets=buckets,
                                max_new_tokens=max_new_tokens)
    return Prepared(tuple(plans), arrays, spec, pad_visual(visuals, cfg, arrays.num_windows, window))


def pad_visual(visuals: Sequence[np.ndarray], cfg: VideoXLConfig, windows: int, window: int) -> np.ndarray:
    """Right-pads every row's visual input to `windows` windows (frames keep their dtype)."""
    first = np.asarray(visuals[0])
    if first.ndim == 4:
        per_frame = cfg.tokens_per_frame
        if window % per_frame:
            raise ValueError(f"streaming frames needs whole frames per window: {window} tokens per window, "
                             f"{per_frame} per frame")
        out = np.zeros((len(visuals), windows * window // per_frame, *first.shape[1:]), first.dtype)
        for b, v in enumerate(visuals):
            out[b, :len(v)] = v
        return out
    out = np.zeros((len(visuals), windows * window, first.shape[-1]), np.float32)
    for b, v in enumerate(visuals):
        v = np.asarray(v, np.float32).reshape(-1, first.shape[-1])
        out[b, :len(v)] = v
    return out


def run(params: dict, cfg: VideoXLConfig, prepared: Prepared, *, max_new_tokens: int,
        sampling: Sampling = GREEDY, key: Optional[jax.Array] = None, eos_ids: Sequence[int] = (),
        pad_id: int = 0, pixel_norm: Optional[tuple] = None, dtype=jnp.float32,
        return_logits: bool = False) -> tuple[PrefillResult, Generation]:
    """Prefill then decode; sampling needs an explicit `key` (greedy ignores it)."""
    if not sampling.greedy and key is None:
        raise ValueError("sampling needs an explicit PRNG key (key=jax.random.key(seed))")
    # The last token is returned, not fed: max_new_tokens - 1 more entries per row.
    need = max(p.memory_after_prefill for p in prepared.plans) + max_new_tokens - 1
    if need > prepared.spec.buffer_size:
        raise ValueError(f"the memory holds {prepared.spec.buffer_size} entries per row but decoding "
                         f"{max_new_tokens} tokens needs {need}; pack the prefill with max_new_tokens >= {max_new_tokens}")
    norm = None if pixel_norm is None else tuple(jnp.asarray(x, jnp.float32) for x in pixel_norm)
    result = prefill_jit(params, cfg, prepared.arrays, jnp.asarray(prepared.visual), spec=prepared.spec,
                         pixel_norm=norm, dtype=dtype)
    gen = generate_jit(params, cfg, result.memory, result.last_logits,
                       key if key is not None else jax.random.key(0), max_new_tokens=max_new_tokens,
                       sampling=sampling, eos_ids=tuple(eos_ids), pad_id=pad_id, return_logits=return_logits,
                       dtype=dtype)
    return result, gen
