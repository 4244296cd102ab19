"""The KV memory of a compressed sequence: an explicit pytree, never hidden state.

Per layer, pre-RoPE keys/values live in one preallocated buffer [L, B, S, K, H]
(the layer axis first, so the layer scan slices it); the valid entries of row b
are the prefix `[0, length[b])`, in the order `[prefix | kept window entries |
suffix | generated]`. Positions are the buffer indices (compact), applied as
RoPE at attention time. Entries at or beyond `length` are scratch: the next step
writes there, and masks hide them, so a fused attention kernel can stop at
`length` (`key_value_seq_lengths`).

Axis legend: L layers, B batch, S buffer, K kv heads, H head dim, M rows moved.
"""

from __future__ import annotations

import flax
import jax
import jax.numpy as jnp
import numpy as np

from vxl_jax.config import Qwen2Config
from vxl_jax.model.layers import write_rows
from vxl_jax.model.qwen2 import KVCache


@flax.struct.dataclass
class Memory:
    cache: KVCache      # k, v [L, B, S, K, H], pre-RoPE
    length: jax.Array   # [B] int32: valid entries per row

    @classmethod
    def empty(cls, cfg: Qwen2Config, batch: int, size: int, dtype=jnp.float32) -> "Memory":
        return cls(KVCache.zeros(cfg, batch, size, dtype), jnp.zeros((batch,), jnp.int32))

    @property
    def size(self) -> int:
        return self.cache.size

    def row(self, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Host copy of row b's valid keys and values, [L, length, K, H] each."""
        n = int(self.length[b])
        return np.asarray(self.cache.k[:, b, :n]), np.asarray(self.cache.v[:, b, :n])


def keep_rows(cache: KVCache, start: jax.Array, rows: jax.Array) -> KVCache:
    """Moves entries `start + rows[b, j]` down to `start + j` in every layer.

    start [B], rows [B, M] (offsets from start, increasing). Used after a
    compressed window: its VST entries are gathered right after the memory and
    the raw entries are left behind as scratch.
    """
    size = cache.k.shape[2]
    src = jnp.clip(start[:, None] + rows, 0, size - 1)                  # [B, M]

    def move(buf):                                                       # [L, B, S, K, H]
        picked = jnp.take_along_axis(buf, src[None, :, :, None, None], axis=2)
        return jax.vmap(write_rows, in_axes=(0, 0, None))(buf, picked, start)

    return KVCache(move(cache.k), move(cache.v))
