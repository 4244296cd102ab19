"""An independent, unbatched Python-loop version of the compressed prefill, written from FORMAT.md section 5.

It shares only the decoder layers with the library (those are parity-tested on
their own). Each step is run the way the original runs it: memory keys/values
concatenated in front of the step's tokens, positions `arange(M + T)`, every
memory key visible and the step causal; after a compressed window the VST
entries (found from the plan's interleaving) are appended to the memory.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from vxl_jax.compress.plan import Plan
from vxl_jax.model import qwen2
from vxl_jax.model.qwen2 import KVCache


def _step(params, cfg, mem_k, mem_v, x, is_vst=None):
    """Runs x [T, D] after a memory [L, M, K, H]; returns (hidden [T, D], step keys, step values)."""
    m, t = mem_k.shape[1], x.shape[0]
    pad = np.zeros((mem_k.shape[0], t, *mem_k.shape[2:]), np.float32)
    cache = KVCache(jnp.asarray(np.concatenate([mem_k, pad], 1))[:, None],
                    jnp.asarray(np.concatenate([mem_v, pad], 1))[:, None])
    ctx = qwen2.make_context(cfg.llm, jnp.array([m]), t, m + t,
                             is_vst=None if is_vst is None else jnp.asarray(is_vst)[None])
    hidden, cache = qwen2.decode_layers(params["llm"], cfg.llm, jnp.asarray(x)[None], cache, ctx)
    return np.asarray(hidden[0]), np.asarray(cache.k[:, 0, m:]), np.asarray(cache.v[:, 0, m:])


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
        _, k, v = _step(params, cfg, mem_k, mem_v, x, is_vst=order == -1)
        keep = order == -1 if w.ratio is not None else np.ones(len(order), bool)
        mem_k = np.concatenate([mem_k, k[:, keep]], 1)
        mem_v = np.concatenate([mem_v, v[:, keep]], 1)
    hidden, k, v = _step(params, cfg, mem_k, mem_v, table[np.asarray(suffix)])
    return np.concatenate([mem_k, k], 1), np.concatenate([mem_v, v], 1), hidden, before
