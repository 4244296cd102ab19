"""An independent, unbatched Python-loop version of the compressed prefill, written from FORMAT.md section 5.

It shares only the decoder layers with the library (those are parity-tested on
their own). Each step is run the way the original runs it: the memory is kept
before RoPE and rotated to `arange(M)` at every step, every memory key visible
and the step causal at positions M..M+T-1; after a compressed window the VST
entries (found from the plan's interleaving; the layers return just those) are
appended to the memory, un-rotated. Keys come back pre-RoPE, as the original
caches them.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from vxl_jax.compress.plan import Plan
from vxl_jax.model import qwen2
from vxl_jax.model.layers import rotate
from vxl_jax.model.qwen2 import KVCache


def _step(params, cfg, mem_k, mem_v, x, is_vst=None):
    """Runs x [T, D] after a memory [L, M, K, H]; returns (hidden [T, D], kept keys (pre-RoPE), kept values).

    Kept: the VST rows' entries when is_vst marks some, else every row's.
    """
    m, t = mem_k.shape[1], x.shape[0]
    theta = cfg.llm.rope_theta
    memory = None
    if m:
        rotated = jax.vmap(lambda k: rotate(k[None], jnp.arange(m)[None], theta)[0])(jnp.asarray(mem_k))
        memory = KVCache(rotated[:, None], jnp.asarray(mem_v)[:, None])
    slots = None if is_vst is None else jnp.asarray(np.flatnonzero(is_vst), jnp.int32)[None]
    ctx = qwen2.make_context(cfg.llm, jnp.array([m]), t, vst_slots=slots)
    hidden, kept = qwen2.decode_layers(params["llm"], cfg.llm, jnp.asarray(x)[None], memory, ctx)
    n = kept.k.shape[2]
    back = -(m + jnp.arange(n))[None]
    keys = jax.vmap(lambda k: rotate(k, back, theta))(kept.k)
    return np.asarray(hidden[0]), np.asarray(keys[:, 0]), np.asarray(kept.v[:, 0])


def prefill_loop(params, cfg, plan: Plan, prefix, features, suffix):
    """Returns (memory keys, memory values [L, M, K, H], suffix hidden [S, D], memory size before each window)."""
    llm = params["llm"]
    table = np.asarray(llm["embed_tokens"])
    kv = (cfg.llm.num_layers, 0, cfg.llm.num_kv_heads, cfg.llm.head_dim)
    mem_k, mem_v = np.zeros(kv, np.float32), np.zeros(kv, np.float32)
    _, k, v = _step(params, cfg, mem_k, mem_v, table[np.asarray(prefix)])
    mem_k, mem_v = k, v
    before = []
    for w in plan.windows:
        before.append(mem_k.shape[1])
        order = w.interleaved()
        raw = np.asarray(features)[w.start - plan.prefix + np.maximum(order, 0)]
        x = np.where((order == -1)[:, None], np.asarray(llm["vst_embed"]), raw)
        _, k, v = _step(params, cfg, mem_k, mem_v, x, is_vst=(order == -1) if w.ratio is not None else None)
        mem_k = np.concatenate([mem_k, k], 1)
        mem_v = np.concatenate([mem_v, v], 1)
    hidden, k, v = _step(params, cfg, mem_k, mem_v, table[np.asarray(suffix)])
    return np.concatenate([mem_k, k], 1), np.concatenate([mem_v, v], 1), hidden, before
