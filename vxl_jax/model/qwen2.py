"""Qwen2 decoder with the Video-XL VST ("beacon") projections.

Pure functions of a params pytree:

  params = {
    "embed_tokens": [V, D],
    "vst_embed":    [1, D],              # input of every VST (beacon_embed_tokens)
    "layers":       DecoderLayer params stacked on a leading L axis,
    "norm":         {"scale": [D]},
    "lm_head":      [D, V],              # absent when tie_word_embeddings
  }

Every call is one *step*: T new tokens after a kept memory. The memory is a
preallocated buffer of rotated keys and values ([L, B, S, K, H]; RoPE applied
once, when an entry is made, at its compact position = its buffer index) whose
entries [0, mem_len[b]) the step's queries all see; the step's own tokens see
each other causally (`attention.attend`). A layer returns the entries the step
keeps: all of its tokens (prefix, text, a decode token, an uncompressed window)
or only its VSTs, rotated to the positions they take when kept (mem_len + j);
`decode_layers` writes them into the buffer at mem_len. A plain forward, a
prefill chunk, a compressed window and a decode step are the same call with
different contexts.

Axis legend: see vxl_jax/model/layers.py (B T S D N K G H F V L); M kept VST rows.
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
from vxl_jax.model.attention import attend
from vxl_jax.model.layers import RMSNorm, apply_rope, rope_tables, write_rows

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_saveable,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@flax.struct.dataclass
class KVCache:
    """Rotated keys and values of every layer: k, v [L, B, S, K, H] (entry i rotated to position i)."""

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
class StepContext:
    """What every layer of one step shares.

    mem_len [B]: memory entries the step's queries see (buffer [0, mem_len)); the
      step's entries are written there.
    rope: (cos, sin) [B, T, H] at the step's positions (mem_len + t, compact).
    vst_slots [B, M] or None: the step's rows that are VSTs (they take the VST
      q/k/v projections; only these rows are projected with them). Slots of
      invalid VSTs (vst_valid [B, M] False) are ordinary rows.
    keep_rope: (cos, sin) [B, M, H]: the positions the VST entries take when kept
      (mem_len + j). With VSTs the step keeps only them; without, all its entries.
    """

    mem_len: jax.Array
    rope: tuple[jax.Array, jax.Array]
    vst_slots: Optional[jax.Array] = None
    vst_valid: Optional[jax.Array] = None
    keep_rope: Optional[tuple[jax.Array, jax.Array]] = None


def make_context(cfg: Qwen2Config, mem_len: jax.Array, num_new: int, *, vst_slots: Optional[jax.Array] = None,
                 vst_valid: Optional[jax.Array] = None) -> StepContext:
    """Context for `num_new` tokens after `mem_len` [B] memory entries, compact positions."""
    mem_len = jnp.asarray(mem_len, jnp.int32)
    positions = mem_len[:, None] + jnp.arange(num_new, dtype=jnp.int32)[None, :]
    rope = rope_tables(positions, cfg.head_dim, cfg.rope_theta)
    if vst_slots is None:
        return StepContext(mem_len=mem_len, rope=rope)
    vst_slots = jnp.asarray(vst_slots, jnp.int32)
    if vst_valid is None:
        vst_valid = jnp.ones(vst_slots.shape, bool)
    kept_at = mem_len[:, None] + jnp.arange(vst_slots.shape[1], dtype=jnp.int32)[None, :]
    return StepContext(mem_len=mem_len, rope=rope, vst_slots=vst_slots, vst_valid=vst_valid,
                       keep_rope=rope_tables(kept_at, cfg.head_dim, cfg.rope_theta))


def _rows(x: jax.Array, index: jax.Array) -> jax.Array:
    """x [B, T, ...] at index [B, M] -> [B, M, ...]."""
    return jnp.take_along_axis(x, index.reshape(index.shape + (1,) * (x.ndim - 2)), axis=1)


def _set_rows(x: jax.Array, index: jax.Array, valid: jax.Array, rows: jax.Array) -> jax.Array:
    """x [B, T, ...] with rows [B, M, ...] written at index [B, M] where valid."""
    b = jnp.arange(x.shape[0])[:, None]
    return x.at[b, jnp.where(valid, index, x.shape[1])].set(rows.astype(x.dtype), mode="drop")


class DecoderLayer(nn.Module):
    """One Qwen2 block; VST rows use their own q/k/v projections, o_proj and MLP are shared."""

    cfg: Qwen2Config
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32

    def _proj(self, heads: int, name: str):
        return nn.DenseGeneral((heads, self.cfg.head_dim), use_bias=True, dtype=self.dtype,
                               param_dtype=self.param_dtype, name=name)

    @nn.compact
    def __call__(self, x, mem_k, mem_v, ctx: StepContext, rows: str = "all"):
        """x [B, T, D], this layer's memory mem_k/mem_v [B, S, K, H] -> (x, kept keys, kept values).

        rows: whose hidden states the step still needs after this layer.
          "all"      every row's (a plain step).
          "vst"      only the VST rows' (a window's penultimate layer: the last
                     layer reads just them): every row's keys and values, but the
                     queries, attention, o_proj and MLP only of the VST rows; the
                     other rows of x come back unchanged.
          "entries"  none: just the kept entries (x comes back unchanged), the
                     last layer of a window, whose hidden states nobody reads.
        """
        cfg = self.cfg
        h = RMSNorm(cfg.rms_norm_eps, self.param_dtype, name="input_norm")(x)
        vst = [self._proj(n, f"vst_{p}_proj") for n, p in ((cfg.num_heads, "q"), (cfg.num_kv_heads, "k"),
                                                            (cfg.num_kv_heads, "v"))]
        if rows == "entries":
            if ctx.vst_slots is not None:
                hv = _rows(h, ctx.vst_slots)
                return x, apply_rope(vst[1](hv), *ctx.keep_rope), vst[2](hv)
            return (x, apply_rope(self._proj(cfg.num_kv_heads, "k_proj")(h), *ctx.rope),
                    self._proj(cfg.num_kv_heads, "v_proj")(h))
        if rows == "vst" and ctx.vst_slots is None:
            raise ValueError('rows="vst" needs a step with VSTs (ctx.vst_slots)')
        k = self._proj(cfg.num_kv_heads, "k_proj")(h)       # [B, T, K, H]
        v = self._proj(cfg.num_kv_heads, "v_proj")(h)
        if self.is_initializing():
            for proj in vst:
                proj(h[:, :1])
        vst_k = vst_v = None
        if ctx.vst_slots is not None:
            hv = _rows(h, ctx.vst_slots)                     # [B, M, D]: only the VST rows
            vst_q, vst_k, vst_v = (proj(hv) for proj in vst)
            k, v = (_set_rows(a, ctx.vst_slots, ctx.vst_valid, r) for a, r in ((k, vst_k), (v, vst_v)))
        k = apply_rope(k, *ctx.rope)
        if rows == "vst":
            # Invalid VST slots are ordinary rows: their queries take q_proj (their outputs go unread).
            q = jnp.where(ctx.vst_valid[:, :, None, None], vst_q,
                          self._proj(cfg.num_heads, "q_proj")(hv).astype(vst_q.dtype))
            q = apply_rope(q, *(_rows(r, ctx.vst_slots) for r in ctx.rope))
            out = attend(q, k, v, mem_k, mem_v, ctx.mem_len, q_pos=ctx.vst_slots, backend=cfg.attention)
            xv = _rows(x, ctx.vst_slots)
        else:
            q = self._proj(cfg.num_heads, "q_proj")(h)      # [B, T, N, H]
            if ctx.vst_slots is not None:
                q = _set_rows(q, ctx.vst_slots, ctx.vst_valid, vst_q)
            q = apply_rope(q, *ctx.rope)
            out = attend(q, k, v, mem_k, mem_v, ctx.mem_len, backend=cfg.attention)
            xv = x
        xv = xv + nn.DenseGeneral(cfg.hidden_size, axis=(-2, -1), use_bias=False, dtype=self.dtype,
                                  param_dtype=self.param_dtype, name="o_proj")(out)
        h = RMSNorm(cfg.rms_norm_eps, self.param_dtype, name="post_attention_norm")(xv)
        xv = xv + Mlp(cfg.intermediate_size, self.dtype, self.param_dtype, name="mlp")(h)
        x = _set_rows(x, ctx.vst_slots, ctx.vst_valid, xv) if rows == "vst" else xv
        if vst_k is not None:                               # keep the VSTs, at their compacted positions
            return x, apply_rope(vst_k, *ctx.keep_rope), vst_v
        return x, k, v


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
    kv = jnp.zeros((1, 0, cfg.num_kv_heads, cfg.head_dim), param_dtype)
    ctx = make_context(cfg, jnp.zeros((1,), jnp.int32), 1)
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


def decode_layers(params: dict, cfg: Qwen2Config, x: jax.Array, memory: Optional[KVCache], ctx: StepContext, *,
                  remat: str = "none", dtype=None, need_hidden: bool = True) -> tuple[Optional[jax.Array], KVCache]:
    """Runs all layers on x [B, T, D] after `memory` (None: nothing before the step).

    Returns the final-normed hidden states and the step's kept entries
    [L, B, T or M, K, H] (write them with `append(buffer, entries, ctx.mem_len)`).
    need_hidden=False (a window: only its kept entries matter) returns None for
    the hidden states and skips the work nothing reads: the last layer only
    projects the kept rows' keys and values, and with VSTs the layer before it
    runs queries, attention and MLP only for the VST rows (the last layer reads
    nothing else).
    """
    dtype = dtype or x.dtype
    layer = DecoderLayer(cfg, dtype=dtype, param_dtype=params["embed_tokens"].dtype)
    modes = ("all",) if need_hidden else ("all", "vst", "entries") if ctx.vst_slots is not None else ("all", "entries")
    first_cut = cfg.num_layers - len(modes) + 1      # the layers from here on take modes[1:], one each

    def body(h, xs):
        p, mk, mv, i = xs
        branches = [functools.partial(lambda h, m: layer.apply({"params": p}, h, mk, mv, ctx, m), m=m)
                    for m in modes]
        if len(branches) == 1:
            h, k, v = branches[0](h)
        else:
            h, k, v = jax.lax.switch(jnp.clip(i - first_cut + 1, 0, len(modes) - 1), branches, h)
        # Block boundary: rows stay on their data-parallel devices, the width whole (RULES).
        return parallel.constrain(h, ("batch", "seq", "act_embed")), (k, v)

    policy = REMAT_POLICIES[remat]
    if remat != "none":
        body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    mem = (memory.k, memory.v) if memory is not None else (None, None)
    layer_ids = jnp.arange(cfg.num_layers, dtype=jnp.int32)
    x, (k, v) = jax.lax.scan(body, x.astype(dtype), (params["layers"], *mem, layer_ids))
    if not need_hidden:
        return None, KVCache(k, v)
    h = RMSNorm(cfg.rms_norm_eps).apply({"params": params["norm"]}, x)
    return h, KVCache(k, v)


def append(cache: KVCache, entries: KVCache, at: jax.Array) -> KVCache:
    """cache [L, B, S, K, H] with entries [L, B, M, K, H] written at per-row offsets at [B]."""
    write = jax.vmap(write_rows, in_axes=(0, 0, None))
    return KVCache(write(cache.k, entries.k, at), write(cache.v, entries.v, at))


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
