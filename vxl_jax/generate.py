"""Decoding from a KV memory: greedy or sampled, a batch at a time, in one compiled loop.

The loop is a `lax.while_loop` on the device: each iteration picks a token per
row from the current logits, then (unless every row is done or the budget is
spent) runs one single-token step that writes the token's keys/values at the
row's memory length and attends over the memory and itself, compact positions.
Rows stop independently on an eos id; their later tokens are `pad_id`.

Axis legend: B batch, N new tokens, V vocabulary.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import flax
import jax
import jax.numpy as jnp

from vxl_jax import program_cache
from vxl_jax.compress.memory import Memory
from vxl_jax.config import VideoXLConfig
from vxl_jax.model import qwen2


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How a token is picked. temperature 0 is greedy; top_k 0 and top_p 1 switch those filters off.

    Filters apply in the order temperature, top-k, top-p (as in HF transformers).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


GREEDY = Sampling()
TRACES = {"generate": 0}  # incremented at trace time; tests count compilations with it


def filter_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """Scaled logits [B, V] with filtered-out entries at -inf."""
    logits = logits.astype(jnp.float32) / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1.0:
        ordered = jnp.sort(logits, axis=-1)[:, ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs          # mass strictly above each entry
        keep = before < sampling.top_p                       # the smallest prefix reaching top_p
        threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < threshold, -jnp.inf, logits)
    return logits


def pick(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """Token ids [B] from logits [B, V]."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, sampling), axis=-1).astype(jnp.int32)


def decode_step(params: dict, cfg: VideoXLConfig, memory: Memory, tokens: jax.Array,
                dtype=jnp.float32) -> tuple[jax.Array, Memory]:
    """One token per row [B] -> its logits [B, V] and the memory with its keys/values appended."""
    x = qwen2.embed(params["llm"], tokens[:, None], dtype)
    ctx = qwen2.make_context(cfg.llm, memory.length, 1)
    hidden, entries = qwen2.decode_layers(params["llm"], cfg.llm, x, memory.cache, ctx, dtype=dtype)
    cache = qwen2.append(memory.cache, entries, memory.length)
    return qwen2.logits(params["llm"], cfg.llm, hidden[:, 0]), Memory(cache, memory.length + 1)


@flax.struct.dataclass
class Generation:
    tokens: jax.Array                  # [B, N] int32; pad_id after a row's eos
    num_tokens: jax.Array              # [B] tokens generated per row, its eos included
    memory: Memory                     # with every fed token appended
    step_logits: Optional[jax.Array]   # [B, N, V] float32 raw logits per step, if asked


def generate(params: dict, cfg: VideoXLConfig, memory: Memory, last_logits: jax.Array, key: jax.Array, *,
             max_new_tokens: int, sampling: Sampling = GREEDY, eos_ids: Sequence[int] = (), pad_id: int = 0,
             return_logits: bool = False, dtype=jnp.float32) -> Generation:
    """Decodes up to `max_new_tokens` per row, starting from the prefill's last logits [B, V].

    The memory needs room for `max_new_tokens - 1` more entries per row (the
    last token is returned, not fed); `packing.pack(max_new_tokens=...)` sizes it
    and `pipeline.run` checks it before running.
    """
    TRACES["generate"] += 1
    batch, vocab = last_logits.shape
    eos = jnp.asarray(list(eos_ids) or [-1], jnp.int32)

    def body(state):
        i, logits, memory, tokens, done, count, all_logits = state
        token = pick(logits, jax.random.fold_in(key, i), sampling)
        token = jnp.where(done, pad_id, token)
        tokens = tokens.at[:, i].set(token)
        count = count + (~done).astype(jnp.int32)
        if all_logits is not None:
            all_logits = all_logits.at[:, i].set(logits)
        done = done | jnp.isin(token, eos)
        more = (i + 1 < max_new_tokens) & ~jnp.all(done)
        logits, memory = jax.lax.cond(more, lambda: decode_step(params, cfg, memory, token, dtype),
                                      lambda: (logits, memory))
        return i + 1, logits, memory, tokens, done, count, all_logits

    def cond(state):
        i, done = state[0], state[4]
        return (i < max_new_tokens) & ~jnp.all(done)

    state = (jnp.int32(0), last_logits.astype(jnp.float32), memory,
             jnp.full((batch, max_new_tokens), pad_id, jnp.int32), jnp.zeros((batch,), bool),
             jnp.zeros((batch,), jnp.int32),
             jnp.zeros((batch, max_new_tokens, vocab), jnp.float32) if return_logits else None)
    _, _, memory, tokens, _, count, all_logits = jax.lax.while_loop(cond, body, state)
    return Generation(tokens=tokens, num_tokens=count, memory=memory, step_logits=all_logits)


generate_jit = program_cache.jit(generate, static_argnames=("cfg", "max_new_tokens", "sampling", "eos_ids",
                                                            "pad_id", "return_logits", "dtype"))

