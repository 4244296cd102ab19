"""Qwen2 decoder with the Video-XL VST ("beacon") projections.

Pure functions of a params pytree:

  params = {
    "embed_tokens": [V, D],
    "vst_embed":    [1, D],              # input of every VST (beacon_embed_tokens)
    "layers":       DecoderLayer params stacked on a leading L axis,
    "norm":         {"scale": [D]},
    "lm_head":      [D, V],              # absent when tie_word_embeddings
  }

Attention always works on a preallocated KV buffer of pre-RoPE keys/values
([L, B, S, K, H]): the step's keys/values are written at a per-row offset, RoPE
is applied to queries and to the whole buffer with explicit positions, and a
boolean mask says which buffer entries each query sees. A plain forward, a
prefill chunk and a decode step are the same call with different buffers.

Axis legend: see vxl_jax/model/layers.py (B T S D N K G H F V L).
"""

from __future__ import annotations

import functools
from typing import Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp

from vxl_jax import parallel
from vxl_jax.config import Qwen2Config
from vxl_jax.model.layers import RMSNorm, apply_rope, attention, rope_tables, write_rows

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@flax.struct.dataclass
class KVCache:
    """Pre-RoPE keys and values of every layer: k, v [L, B, S, K, H]."""

    k: jax.Array
    v: jax.Array

    @classmethod
    def zeros(cls, cfg: Qwen2Config, batch: int, size: int, dtype=jnp.float32) -> "KVCache":
        shape = (cfg.num_layers, batch, size, cfg.num_kv_heads, cfg.head_dim)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))

    @property
    def size(self) -> int:
        return self.k.shape[2]


@flax.struct.dataclass
class AttnContext:
    """What every layer of one step shares: where to write, positions, mask, VST rows.

    write_at [B]: buffer offset of the step's first token per row.
    rope_q: (cos, sin) [B, T, H] for the queries; rope_k: (cos, sin) [B, S, H] for the buffer.
    mask [B, T, S]: True where a query may attend a buffer entry.
    is_vst [B, T] or None: rows that use the VST q/k/v projections.
    """

    write_at: jax.Array
    rope_q: tuple[jax.Array, jax.Array]
    rope_k: tuple[jax.Array, jax.Array]
    mask: jax.Array
    is_vst: Optional[jax.Array] = None


def make_context(cfg: Qwen2Config, write_at: jax.Array, num_new: int, buffer_size: int, *,
                 key_len: Optional[jax.Array] = None, is_vst: Optional[jax.Array] = None,
                 q_positions: Optional[jax.Array] = None, k_positions: Optional[jax.Array] = None,
                 mask: Optional[jax.Array] = None) -> AttnContext:
    """Context for `num_new` tokens written at `write_at` [B] into a buffer of `buffer_size`.

    By default positions are compact: a buffer entry's position is its index
    (valid entries are a prefix of the buffer), and the mask is causal over the
    buffer and hides entries at or beyond `key_len` [B] (default: everything up
    to the step's last token). Explicit positions or mask override that.
    """
    write_at = jnp.asarray(write_at, jnp.int32)
    if q_positions is None:
        q_positions = write_at[:, None] + jnp.arange(num_new, dtype=jnp.int32)[None, :]
    if k_positions is None:
        k_positions = jnp.broadcast_to(jnp.arange(buffer_size, dtype=jnp.int32), (write_at.shape[0], buffer_size))
    if mask is None:
        idx = jnp.arange(buffer_size, dtype=jnp.int32)
        q_idx = write_at[:, None] + jnp.arange(num_new, dtype=jnp.int32)[None, :]
        mask = idx[None, None, :] <= q_idx[:, :, None]
        if key_len is not None:
            mask = mask & (idx[None, None, :] < jnp.asarray(key_len, jnp.int32)[:, None, None])
    rope_q = rope_tables(q_positions, cfg.head_dim, cfg.rope_theta)
    rope_k = rope_tables(k_positions, cfg.head_dim, cfg.rope_theta)
    return AttnContext(write_at=write_at, rope_q=rope_q, rope_k=rope_k, mask=mask, is_vst=is_vst)


class DecoderLayer(nn.Module):
    """One Qwen2 block; VST rows use their own q/k/v projections, o_proj and MLP are shared."""

    cfg: Qwen2Config
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def _proj(self, heads: int, name: str):
        return nn.DenseGeneral((heads, self.cfg.head_dim), use_bias=True, dtype=self.dtype,
                               param_dtype=self.param_dtype, name=name)

    @nn.compact
    def __call__(self, x, cache_k, cache_v, ctx: AttnContext):
        cfg = self.cfg
        h = RMSNorm(cfg.rms_norm_eps, self.param_dtype, name="input_norm")(x)
        q = self._proj(cfg.num_heads, "q_proj")(h)          # [B, T, N, H]
        k = self._proj(cfg.num_kv_heads, "k_proj")(h)       # [B, T, K, H]
        v = self._proj(cfg.num_kv_heads, "v_proj")(h)
        vst_q = self._proj(cfg.num_heads, "vst_q_proj")
        vst_k = self._proj(cfg.num_kv_heads, "vst_k_proj")
        vst_v = self._proj(cfg.num_kv_heads, "vst_v_proj")
        if ctx.is_vst is not None or self.is_initializing():
            sel = (ctx.is_vst if ctx.is_vst is not None else jnp.zeros(x.shape[:2], bool))[..., None, None]
            q = jnp.where(sel, vst_q(h), q)
            k = jnp.where(sel, vst_k(h), k)
            v = jnp.where(sel, vst_v(h), v)
        cache_k = write_rows(cache_k, k, ctx.write_at)
        cache_v = write_rows(cache_v, v, ctx.write_at)
        q = apply_rope(q, *ctx.rope_q)
        keys = apply_rope(cache_k.astype(self.dtype), *ctx.rope_k)
        out = attention(q, keys, cache_v.astype(self.dtype), ctx.mask)
        x = x + nn.DenseGeneral(cfg.hidden_size, axis=(-2, -1), use_bias=False, dtype=self.dtype,
                                param_dtype=self.param_dtype, name="o_proj")(out)
        h = RMSNorm(cfg.rms_norm_eps, self.param_dtype, name="post_attention_norm")(x)
        x = x + Mlp(cfg.intermediate_size, self.dtype, self.param_dtype, name="mlp")(h)
        return x, cache_k, cache_v


class Mlp(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)), no biases."""

    width: int
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dense = functools.partial(nn.Dense, use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        gate = dense(self.width, name="gate_proj")(x)
        up = dense(self.width, name="up_proj")(x)
        return dense(x.shape[-1], name="down_proj")(nn.silu(gate) * up)


def init_params(cfg: Qwen2Config, key: jax.Array, param_dtype=jnp.float32) -> dict:
    """Fresh parameters with the right structure (values: Flax defaults, N(0,1) embeddings)."""
    k_layers, k_embed, k_vst, k_head = jax.random.split(key, 4)
    layer = DecoderLayer(cfg, param_dtype=param_dtype)
    x = jnp.zeros((1, 1, cfg.hidden_size), param_dtype)
    kv = jnp.zeros((1, 1, cfg.num_kv_heads, cfg.head_dim), param_dtype)
    ctx = make_context(cfg, jnp.zeros((1,), jnp.int32), 1, 1)
    init_one = lambda k: layer.init(k, x, kv, kv, ctx)["params"]
    params = {
        "embed_tokens": jax.random.normal(k_embed, (cfg.vocab_size, cfg.hidden_size), param_dtype),
        "vst_embed": jax.random.normal(k_vst, (1, cfg.hidden_size), param_dtype),
        "layers": jax.vmap(init_one)(jax.random.split(k_layers, cfg.num_layers)),
        "norm": {"scale": jnp.ones((cfg.hidden_size,), param_dtype)},
    }
    if not cfg.tie_word_embeddings:
        params["lm_head"] = (jax.random.normal(k_head, (cfg.hidden_size, cfg.vocab_size), param_dtype)
                             * cfg.hidden_size ** -0.5)
    return params


def embed(params: dict, ids: jax.Array, dtype=None) -> jax.Array:
    """Token embeddings [B, T, D]; ids must be valid vocabulary indices."""
    table = params["embed_tokens"]
    return jnp.take(table, ids, axis=0).astype(dtype or table.dtype)


def decode_layers(params: dict, cfg: Qwen2Config, x: jax.Array, cache: KVCache, ctx: AttnContext, *,
                  remat: str = "none", dtype=None) -> tuple[jax.Array, KVCache]:
    """Runs all layers on x [B, T, D]; returns the final-normed hidden states and the new buffer."""
    dtype = dtype or x.dtype
    layer = DecoderLayer(cfg, dtype=dtype, param_dtype=params["embed_tokens"].dtype)

    def body(h, xs):
        p, ck, cv = xs
        h, ck, cv = layer.apply({"params": p}, h, ck, cv, ctx)
        # Block boundary: rows stay on their data-parallel devices, the width whole (RULES).
        return parallel.constrain(h, ("batch", "seq", "act_embed")), (ck, cv)

    policy = REMAT_POLICIES[remat]
    if remat != "none":
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    x, (k, v) = jax.lax.scan(body, x.astype(dtype), (params["layers"], cache.k, cache.v))
    h = RMSNorm(cfg.rms_norm_eps).apply({"params": params["norm"]}, x)
    return h, KVCache(k, v)


def logits(params: dict, cfg: Qwen2Config, h: jax.Array) -> jax.Array:
    """Vocabulary logits [..., V] in float32 from final-normed hidden states."""
    if cfg.tie_word_embeddings:
        return jnp.einsum("...D,VD->...V", h, params["embed_tokens"].astype(h.dtype),
                          preferred_element_type=jnp.float32)
    return jnp.einsum("...D,DV->...V", h, params["lm_head"].astype(h.dtype), preferred_element_type=jnp.float32)


def extend_vocab(params: dict, embed_rows, head_rows) -> dict:
    """LLM params with rows appended to the embedding [n, D] and the LM head [n, D] (HF layout).

    Used to compare against a run of the original after `resize_token_embeddings`.
    """
    params = dict(params)
    params["embed_tokens"] = jnp.concatenate([params["embed_tokens"], jnp.asarray(embed_rows)], axis=0)
    if "lm_head" in params:
        params["lm_head"] = jnp.concatenate([params["lm_head"], jnp.asarray(head_rows).T], axis=1)
    return params
