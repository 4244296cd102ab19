"""Building blocks shared by the LLM: RMSNorm, rotary embedding, masked GQA attention.

Axis legend (einsum letters used throughout vxl_jax.model):
  B batch, T query positions, S key positions, D model width, N query heads,
  K kv heads, G query heads per kv head (N = K*G), H head dim, F MLP width,
  V vocabulary, L layers, P patch size, C channels.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import flax.linen as nn


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm: normalise in float32, scale in the input dtype."""

    eps: float = 1e-6
    param_dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(x.dtype) * normed.astype(x.dtype)


def rope_tables(positions: jax.Array, head_dim: int, theta: float) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [..., H] for integer positions [...] (rotate-half layout, float32)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq
    angles = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x [B, T, heads, H] with tables [B, T, H] (rotate-half, as HF Qwen2)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


def _fold_groups(q: jax.Array, kv_heads: int) -> jax.Array:
    """q [B, T, N, H] -> [B, K, G*T, H]: a kv head's G query heads folded into the query axis."""
    b, t, n, h = q.shape
    g = n // kv_heads
    return q.reshape(b, t, kv_heads, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kv_heads, g * t, h)


def _unfold_groups(out: jax.Array, t: int) -> jax.Array:
    """[B, K, G*T, H] -> [B, T, N, H]."""
    b, kv_heads, gt, h = out.shape
    g = gt // t
    return out.reshape(b, kv_heads, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, kv_heads * g, h)


def _fold_mask(mask: jax.Array, kv_heads: int, g: int) -> jax.Array:
    """mask [B, T, S] -> [B, K, G*T, S] matching `_fold_groups`."""
    b, t, s = mask.shape
    return jnp.broadcast_to(mask[:, None, None], (b, kv_heads, g, t, s)).reshape(b, kv_heads, g * t, s)


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    """Grouped-query attention with one softmax over all keys (same contract as `attention`).

    mask None: every query sees every key (the CLIP encoder).
    """
    t, n, h = q.shape[1:]
    kv_heads = k.shape[2]
    logits = jnp.einsum("BKQH,BSKH->BKQS", _fold_groups(q, kv_heads), k,
                        preferred_element_type=jnp.float32) * (h ** -0.5)
    if mask is not None:
        logits = jnp.where(_fold_mask(mask, kv_heads, n // kv_heads), logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = _unfold_groups(jnp.einsum("BKQS,BSKH->BKQH", probs, v, preferred_element_type=jnp.float32), t)
    if mask is not None:
        out = jnp.where(jnp.any(mask, axis=-1)[:, :, None, None], out, 0.0)
    return out.astype(q.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, block: int = 512) -> jax.Array:
    """Grouped-query attention with a boolean key mask.

    q [B, T, N, H], k/v [B, S, K, H], mask [B, T, S] (True = may attend).
    Scores and softmax are float32. A query row with no visible key returns
    zeros instead of NaN (padding rows).

    Blocked: queries in blocks of at most `block`, keys in blocks of `block`
    with a running (online) softmax, so the score matrix is never materialised
    whole, and a (query block, key block) pair the mask hides entirely is
    skipped (`lax.cond`). With a causal window written after a memory whose
    buffer tail is scratch, the cost follows the visible keys, not the buffer
    size. Equal to `dense_attention` to float rounding; differentiable (the
    loops are scans).
    """
    b, t, n, h = q.shape
    s, kv_heads = k.shape[1], k.shape[2]
    g = n // kv_heads
    if s <= block and t <= block:
        return dense_attention(q, k, v, mask)
    k_count = -(-s // block)
    k_pad = k_count * block - s
    q_count = -(-t // block)
    q_block = -(-t // q_count)                  # even query blocks: little padding
    q_pad = q_count * q_block - t
    k = jnp.pad(k, ((0, 0), (0, k_pad), (0, 0), (0, 0)))
    v = jnp.pad(v, ((0, 0), (0, k_pad), (0, 0), (0, 0)))
    mask = jnp.pad(mask, ((0, 0), (0, q_pad), (0, k_pad)))
    q = jnp.pad(q, ((0, 0), (0, q_pad), (0, 0), (0, 0)))
    k_blocks = k.reshape(b, k_count, block, kv_heads, h).swapaxes(0, 1)
    v_blocks = v.reshape(b, k_count, block, kv_heads, h).swapaxes(0, 1)
    q_blocks = q.reshape(b, q_count, q_block, n, h).swapaxes(0, 1)
    mask_blocks = mask.reshape(b, q_count, q_block, k_count, block).transpose(1, 3, 0, 2, 4)  # [Qb, Kb, B, T, S]
    neg = jnp.float32(-1e30)                    # finite: no inf - inf

    def one_query_block(xs):
        qb, mb = xs
        qg = _fold_groups(qb, kv_heads)
        needed = jnp.any(mb, axis=(1, 2, 3))

        def visit(state, ys):
            kb, vb, mkb, need = ys

            def update(state):
                run_max, run_sum, acc = state
                scores = jnp.einsum("BKQH,BSKH->BKQS", qg, kb, preferred_element_type=jnp.float32) * (h ** -0.5)
                scores = jnp.where(_fold_mask(mkb, kv_heads, g), scores, neg)
                new_max = jnp.maximum(run_max, scores.max(axis=-1))
                probs = jnp.exp(scores - new_max[..., None])
                scale = jnp.exp(run_max - new_max)
                acc = acc * scale[..., None] + jnp.einsum("BKQS,BSKH->BKQH", probs.astype(vb.dtype), vb,
                                                           preferred_element_type=jnp.float32)
                return new_max, run_sum * scale + probs.sum(axis=-1), acc

            return jax.lax.cond(need, update, lambda st: st, state), None

        rows = g * q_block
        init = (jnp.full((b, kv_heads, rows), neg), jnp.zeros((b, kv_heads, rows), jnp.float32),
                jnp.zeros((b, kv_heads, rows, h), jnp.float32))
        (_, run_sum, acc), _ = jax.lax.scan(visit, init, (k_blocks, v_blocks, mb, needed))
        return _unfold_groups(acc / jnp.where(run_sum == 0, 1.0, run_sum)[..., None], q_block)

    out = jax.lax.map(one_query_block, (q_blocks, mask_blocks))          # [Qb, B, q_block, N, H]
    out = out.swapaxes(0, 1).reshape(b, q_count * q_block, n, h)[:, :t]
    return jnp.where(jnp.any(mask[:, :t], axis=-1)[:, :, None, None], out, 0.0).astype(q.dtype)


def write_rows(buffer: jax.Array, rows: jax.Array, start: jax.Array) -> jax.Array:
    """buffer [B, S, ...] with rows [B, T, ...] written at per-row offsets start [B]."""
    def one(buf, new, s):
        return jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), s, axis=0)
    return jax.vmap(one)(buffer, rows, start)
