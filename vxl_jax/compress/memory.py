"""The KV memory of a compressed sequence: an explicit pytree, never hidden state.

Per layer, keys/values live in one preallocated buffer [L, B, S, K, H] (the
layer axis first, so the layer scan slices it); the valid entries of row b are
the prefix `[0, length[b])`, in the order `[prefix | kept window entries |
suffix | generated]`. Positions are the buffer indices (compact), and keys are
stored rotated to them: RoPE is applied once per entry, when it is made (a VST
straight to the slot it is kept in), never again. Moving entries to other slots
(Video-X2L's merge) re-rotates them by the shift (`shift_keys`). Entries at or
beyond `length` are scratch: the next step writes there, and attention stops at
`length` (`key_value_seq_lengths` for a fused kernel).

Axis legend: L layers, B batch, S buffer, K kv heads, H head dim, M rows moved.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np

from vxl_jax.config import Qwen2Config
from vxl_jax.model.layers import rotate
from vxl_jax.model.qwen2 import KVCache


@flax.struct.dataclass
class Memory:
    cache: KVCache      # k, v [L, B, S, K, H], keys rotated to their slot
    length: jax.Array   # [B] int32: valid entries per row

    @classmethod
    def empty(cls, cfg: Qwen2Config, batch: int, size: int, dtype=jnp.float32) -> "Memory":
        return cls(KVCache.zeros(cfg, batch, size, dtype), jnp.zeros((batch,), jnp.int32))

    @property
    def size(self) -> int:
        return self.cache.size

    def row(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Host copy of row b's valid keys (rotated) and values, [L, length, K, H] each."""
        n = int(self.length[b])
        return np.asarray(self.cache.k[:, b, :n]), np.asarray(self.cache.v[:, b, :n])


def shift_keys(k: jax.Array, shift: jax.Array, theta: float) -> jax.Array:
    """Rotated keys [L, B, M, K, H] moved by `shift` [B, M] positions (new slot - old slot)."""
    return jax.vmap(lambda layer: rotate(layer, shift, theta))(k)


def pre_rope_keys(k, theta: float) -> np.ndarray:
    """Host keys [L, n, K, H] of one row as stored (entry i rotated to i) -> before RoPE (what the original caches)."""
    back = -jnp.arange(k.shape[1], dtype=jnp.int32)[None]             # entry i back from position i
    return np.asarray(shift_keys(jnp.asarray(k)[:, None], back, theta)[:, 0])
