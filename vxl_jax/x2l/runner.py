"""Video-X2L end to end: encode a video once at two levels, then per question score, select, merge, answer.

    x2l = X2LConfig(low=2, high=32, k=3, oracle="attention")
    enc = encode_video(params, cfg, prefix_ids, frames_u8, x2l, pixel_norm=norm)
    chosen = choose(x2l, oracle, query)                   # bool [chunks]
    out = answer(params, cfg, enc, [chosen], [suffix_ids], max_new_tokens=16)
    out.generation.tokens, out.ttft_s, enc.entries(0, chosen)

The question's text (the prompt after `<image>`) is appended to the merged
memory uncompressed, exactly as Video-XL's suffix, so with every chunk
selected the result is Video-XL at the low ratio and with none at the high
ratio (tests/test_x2l.py checks both).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from vxl_jax import program_cache
from vxl_jax.compress.packing import Buckets
from vxl_jax.compress.prefill import run_text
from vxl_jax.config import VideoXLConfig
from vxl_jax.generate import GREEDY, Generation, Sampling, generate_jit
from vxl_jax.pipeline import answer_buffer_size, pad_questions, pad_visual
from vxl_jax.x2l import bilevel, merge, oracles
from vxl_jax.x2l.bilevel import Encoding

ORACLES = ("attention", "clip", "uniform", "last", "random")


@dataclasses.dataclass(frozen=True)
class X2LConfig:
    low: int = 2                   # L-KV ratio (fine)
    high: int = 32                 # H-KV ratio (coarse)
    k: int = 3                     # chunks re-loaded as L-KV, chosen by score
    oracle: str = "attention"      # one of ORACLES
    clip_dir: Optional[str] = None  # the CLIPModel checkpoint of the "clip" oracle
    force_first: bool = False      # also re-load the first chunk as L-KV
    force_last: bool = False       # ... and the last
    offload: bool = False          # keep both levels in host memory; move only the merged entries
    seed: int = 0                  # the random oracle's key

    def __post_init__(self):
        if not 1 <= self.low <= self.high:
            raise ValueError(f"X2L needs 1 <= low <= high ratios, got low {self.low}, high {self.high}")
        if self.k < 0:
            raise ValueError(f"k must be >= 0, got {self.k}")
        if self.oracle not in ORACLES:
            raise ValueError(f"unknown oracle {self.oracle!r}; one of {', '.join(ORACLES)}")
        if self.oracle == "clip" and not self.clip_dir:
            raise ValueError("the clip oracle needs clip_dir=<CLIPModel checkpoint folder>")

    @classmethod
    def parse(cls, text: str) -> "X2LConfig":
        """From `k=v,...`, e.g. `low=2,high=32,k=3,oracle=clip,clip_dir=ckpt/clip,force_first=1,offload=1`."""
        fields = [f.name for f in dataclasses.fields(cls)]
        kwargs = {}
        for item in filter(None, (p.strip() for p in text.split(","))):
            key, eq, value = item.partition("=")
            key = key.strip().replace("-", "_")
            if not eq or key not in fields:
                raise ValueError(f"X2L options are {', '.join(fields)} (as k=v), got {item!r}")
            value = value.strip()
            if key in ("low", "high", "k", "seed"):
                kwargs[key] = int(value)
            elif key in ("force_first", "force_last", "offload"):
                if value.lower() not in ("1", "0", "true", "false", "yes", "no"):
                    raise ValueError(f"{key} is a yes/no option, got {value!r}")
                kwargs[key] = value.lower() in ("1", "true", "yes")
            else:
                kwargs[key] = value
        return cls(**kwargs)


def build_oracle(x2l: X2LConfig, params: dict) -> oracles.Oracle:
    if x2l.oracle == "attention":
        return oracles.attention(np.asarray(jax.device_get(params["llm"]["embed_tokens"]), np.float32))
    if x2l.oracle == "clip":
        from vxl_jax.conversion.clip_model import load_clip_model
        return oracles.clip(load_clip_model(x2l.clip_dir))
    if x2l.oracle == "uniform":
        return oracles.uniform(x2l.k)
    return oracles.last() if x2l.oracle == "last" else oracles.random()


def choose(x2l: X2LConfig, oracle: oracles.Oracle, query: oracles.Query) -> tuple[np.ndarray, np.ndarray]:
    """(scores [chunks], selected bool [chunks]) for one question."""
    scores = np.asarray(oracle(query), np.float64)
    if scores.shape != (query.num_chunks,):
        raise ValueError(f"the oracle gave {scores.shape} scores for {query.num_chunks} chunks")
    return scores, oracles.select(scores, x2l.k, force_first=x2l.force_first, force_last=x2l.force_last)


def encode_video(params: dict, cfg: VideoXLConfig, prefixes: Sequence[np.ndarray], visuals: Sequence[np.ndarray],
                 x2l: X2LConfig, *, lengths: Optional[Sequence[Optional[Sequence[int]]]] = None,
                 pixel_norm=None, dtype=jnp.float32, buckets: Buckets = Buckets()) -> Encoding:
    """Bi-level encoding of a batch of videos (frames [F, C, H, W] or features [n, D]) after their prefix ids."""
    visuals = [np.asarray(v) for v in visuals]
    frames = visuals[0].ndim == 4
    num_visual = [len(v) * cfg.tokens_per_frame if frames else int(np.prod(v.shape[:-1])) for v in visuals]
    low_plans, high_plans, (la, ls), (ha, hs) = bilevel.plan_levels(
        cfg, [np.asarray(p) for p in prefixes], num_visual, x2l.low, x2l.high, lengths, buckets=buckets)
    visual = pad_visual(visuals, cfg, la.num_windows, cfg.vst.window)
    norm = None if pixel_norm is None else tuple(jnp.asarray(x, jnp.float32) for x in pixel_norm)
    result = bilevel.encode_jit(params, cfg, la, ha, jnp.asarray(visual), low_spec=ls, high_spec=hs,
                                pixel_norm=norm, dtype=dtype)
    low_bounds, high_bounds, chunks, features = bilevel.layout(cfg, low_plans, high_plans, result)
    enc = Encoding(plans=tuple(zip(low_plans, high_plans)), prefix_len=np.asarray([len(p) for p in prefixes]),
                   low_bounds=low_bounds, high_bounds=high_bounds, chunk_frames=chunks, frame_features=features,
                   device=result)
    return enc.offload() if x2l.offload else enc


@dataclasses.dataclass(frozen=True)
class Answered:
    generation: Generation
    last_logits: jax.Array        # [B, V] after the question, before the first token
    memory_entries: np.ndarray    # [B] merged entries per layer before the question
    ttft_s: float                 # merge + move + question prefill + first token (wall clock, compiled)


def _text_step(params, cfg, memory, ids, lengths, dtype):
    _, memory, logits = run_text(params, cfg, memory, ids, lengths, dtype=dtype)
    return memory, logits, jnp.argmax(logits, axis=-1)


_text_jit = program_cache.jit(_text_step, static_argnames=("cfg", "dtype"))


def answer(params: dict, cfg: VideoXLConfig, enc: Encoding, selected: Sequence[Sequence[bool]],
           suffixes: Sequence[np.ndarray], *, max_new_tokens: int, sampling: Sampling = GREEDY,
           key: Optional[jax.Array] = None, eos_ids: Sequence[int] = (), pad_id: int = 0, dtype=jnp.float32,
           buckets: Buckets = Buckets()) -> Answered:
    """Merges each row's selection, appends its question text and decodes."""
    if len(selected) != len(suffixes):
        raise ValueError(f"{len(selected)} selections but {len(suffixes)} questions")
    ids, lengths = pad_questions(suffixes, buckets)
    entries = np.asarray([enc.entries(b, s) for b, s in enumerate(selected)])
    size = answer_buffer_size(int(entries.max()), ids.shape[1], max_new_tokens, buckets)

    t0 = time.perf_counter()
    merged = (merge.merge_on_device if enc.device is not None else merge.merge_from_host)(enc, selected, size, cfg.llm.rope_theta)
    memory, logits, first = _text_jit(params, cfg, merged, jnp.asarray(ids), jnp.asarray(lengths), dtype)
    jax.block_until_ready(first)
    ttft = time.perf_counter() - t0
    gen = generate_jit(params, cfg, memory, logits, key if key is not None else jax.random.key(0),
                       max_new_tokens=max_new_tokens, sampling=sampling, eos_ids=tuple(eos_ids), pad_id=pad_id,
                       dtype=dtype)
    return Answered(gen, logits, entries, ttft)
