"""Prompts + videos -> compressed memory -> tokens, a batch at a time.

The host part (`prepare`) splits each prompt at its `<image>` placeholder,
plans the windows from a schedule, and pads ids, plan arrays and the visual
input to the size bucket; the device part (`run`) is two compiled calls, the
prefill and the decode loop.

    prepared = pipeline.prepare(cfg, [prompt_ids], [frames_u8], schedules.fixed(8), max_new_tokens=16)
    result, gen = pipeline.run(params, cfg, prepared, max_new_tokens=16, pixel_norm=norm)

Encode once, ask many: the memory after the prefix and the video does not depend
on the question, so `encode` computes it once (prompts without text after the
video) and `ask` appends any number of questions to copies of its rows and decodes:

    prepared = pipeline.prepare(cfg, [prefix + [IMAGE]], [frames_u8], schedules.fixed(8), require_suffix=False)
    memory = pipeline.encode(params, cfg, prepared, pixel_norm=norm)
    logits, gen = pipeline.ask(params, cfg, memory, rows=[0, 0], suffixes=[q1, q2], max_new_tokens=16)
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable, Optional, Sequence, Union

import jax
import jax.numpy as jnp
import numpy as np

from vxl_jax import program_cache
from vxl_jax.compress import packing
from vxl_jax.compress.memory import Memory
from vxl_jax.compress.packing import Buckets, PlanArrays, PrefillSpec
from vxl_jax.compress.plan import Plan, make_plan
from vxl_jax.compress.prefill import PrefillResult, prefill_jit, run_prefix, run_text, run_windows
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
            buckets: Buckets = Buckets(), max_new_tokens: int = 0, require_suffix: bool = True) -> Prepared:
    """Plans and pads a batch. `schedule` is one schedule for all rows or one per row.

    key: the PRNG key random schedules draw from (every row gets the same key,
    so rows agree per window index). frame_features(visual) -> [F, D]: what
    content-aware schedules (`schedules.dynamic`) look at; features inputs
    default to each frame's mean token, frames need it given. questions: one
    embedding [D] per row for schedules that read `VideoInfo.question`.
    require_suffix=False: prompts may end at the video (for `encode`).
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
                                max_new_tokens=max_new_tokens, require_suffix=require_suffix)
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


# ---------------------------------------------------------------------------------------------------------------
# Encode once, ask many.


def _encode(params, cfg: VideoXLConfig, plan: PlanArrays, visual, *, spec: PrefillSpec, pixel_norm, dtype) -> Memory:
    _, memory = run_prefix(params, cfg, plan, spec.buffer_size, dtype=dtype)
    (memory,), _ = run_windows(params, cfg, [(plan, spec)], [memory], visual, pixel_norm=pixel_norm, dtype=dtype)
    return memory


encode_jit = program_cache.jit(_encode, static_argnames=("cfg", "spec", "dtype"))


def encode(params: dict, cfg: VideoXLConfig, prepared: Prepared, *, pixel_norm: Optional[tuple] = None,
           dtype=jnp.float32) -> Memory:
    """The memory of each row after its prefix and its video: what every question about the video shares.

    Text after the video in `prepared` is ignored (prepare it with `require_suffix=False` and prompts that end
    at the video); `ask` appends the questions.
    """
    norm = None if pixel_norm is None else tuple(jnp.asarray(x, jnp.float32) for x in pixel_norm)
    return encode_jit(params, cfg, prepared.arrays, jnp.asarray(prepared.visual), spec=prepared.spec,
                      pixel_norm=norm, dtype=dtype)


def answer_buffer_size(entries: int, suffix: int, max_new_tokens: int, buckets: Buckets = Buckets()) -> int:
    """Slots of a memory a question is asked on: its entries and the question padded to buckets, plus decoding."""
    return buckets.text(entries) + buckets.text(suffix) + max_new_tokens


def pad_questions(suffixes: Sequence[np.ndarray], buckets: Buckets = Buckets()) -> tuple[np.ndarray, np.ndarray]:
    """Question ids after the video, one per row -> (ids [Q, bucketed length] right-padded, lengths [Q])."""
    if any(len(s) < 1 for s in suffixes):
        raise ValueError("each question needs at least one token after the video")
    ids = np.zeros((len(suffixes), buckets.text(max(len(s) for s in suffixes))), np.int32)
    for i, s in enumerate(suffixes):
        ids[i, :len(s)] = s
    return ids, np.asarray([len(s) for s in suffixes], np.int32)


def _ask_prefill(params, cfg: VideoXLConfig, memory: Memory, rows, ids, lengths, *, size: int, dtype):
    """Copies the asked rows into a buffer of `size` slots, appends each row's question: (memory, logits)."""
    def take(c):
        c = jnp.take(c, rows, axis=1)[:, :, :size]
        return jnp.pad(c, [(0, 0), (0, 0), (0, size - c.shape[2])] + [(0, 0)] * (c.ndim - 3))

    asked = Memory(jax.tree.map(take, memory.cache), jnp.take(memory.length, rows))
    _, asked, logits = run_text(params, cfg, asked, ids, lengths, dtype=dtype)
    return asked, logits


_ask_prefill_jit = program_cache.jit(_ask_prefill, static_argnames=("cfg", "size", "dtype"))


def ask(params: dict, cfg: VideoXLConfig, memory: Memory, rows: Sequence[int], suffixes: Sequence[np.ndarray], *,
        max_new_tokens: int, sampling: Sampling = GREEDY, key: Optional[jax.Array] = None,
        eos_ids: Sequence[int] = (), pad_id: int = 0, dtype=jnp.float32, buckets: Buckets = Buckets(),
        return_logits: bool = False) -> tuple[jax.Array, Generation]:
    """Question i (ids after the video, `suffixes[i]`) about row `rows[i]` of an `encode`d memory, decoded.

    Any number of questions, about the same or different rows, in one batch; the encoded memory is not changed
    (each question gets its own copy of its row). Returns (the logits [Q, V] after each question, the decoding).
    """
    if not sampling.greedy and key is None:
        raise ValueError("sampling needs an explicit PRNG key (key=jax.random.key(seed))")
    if len(rows) != len(suffixes) or not len(rows):
        raise ValueError(f"{len(rows)} rows but {len(suffixes)} questions (one row per question, at least one)")
    ids, question_lengths = pad_questions(suffixes, buckets)
    lengths = np.asarray(jax.device_get(memory.length))
    rows = np.asarray(rows, np.int32)
    if rows.min() < 0 or rows.max() >= len(lengths):
        raise ValueError(f"rows {rows.tolist()} outside the {len(lengths)} encoded rows")
    size = answer_buffer_size(int(lengths[rows].max()), ids.shape[1], max_new_tokens, buckets)
    asked, logits = _ask_prefill_jit(params, cfg, memory, jnp.asarray(rows), jnp.asarray(ids),
                                     jnp.asarray(question_lengths), size=size, dtype=dtype)
    gen = generate_jit(params, cfg, asked, logits, key if key is not None else jax.random.key(0),
                       max_new_tokens=max_new_tokens, sampling=sampling, eos_ids=tuple(eos_ids), pad_id=pad_id,
                       return_logits=return_logits, dtype=dtype)
    return logits, gen
