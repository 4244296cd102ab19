"""Building blocks shared by the LLM: RMSNorm, rotary embedding, per-row writes (attention: attention.py).

Axis legend (einsum letters used throughout vxl_jax.model):
  B batch, T query positions, S key positions, D model width, N query heads,
  K kv heads, G query heads per kv head (N = K*G), H head dim, F MLP width,
  V vocabulary, L layers, P patch size, C channels.
"""

from __future__ import annotations

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


def rotate(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """x [B, T, heads, H] rotated to integer positions [B, T] (negative: rotated back)."""
    return apply_rope(x, *rope_tables(positions, x.shape[-1], theta))


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x [B, T, heads, H] with tables [B, T, H] (rotate-half, as HF Qwen2)."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return (x.astype(jnp.float32) * cos + rotated.astype(jnp.float32) * sin).astype(x.dtype)


def write_rows(buffer: jax.Array, rows: jax.Array, start: jax.Array) -> jax.Array:
    """buffer [B, S, ...] with rows [B, T, ...] written at per-row offsets start [B]."""
    def one(buf, new, s):
        return jax.lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), s, axis=0)
    return jax.vmap(one)(buffer, rows, start)
