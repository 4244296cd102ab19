"""Cross entropy through the LM head in vocabulary blocks: (Σ CE, count) without the [B, T, V] logits.

    ce_sum, count = lm_head_cross_entropy(llm_params, llm_cfg, hidden, targets, block=8192)

equals `cross_entropy(qwen2.logits(llm_params, llm_cfg, hidden), targets)` (same
head, same dtype policy: the head cast to the hidden states' dtype, float32
logits), and so do its gradients with respect to the hidden states and the
head, but neither pass materialises the logits:

  forward   a `lax.scan` over vocabulary blocks computes each block's logits
            [N, v] and folds them into an online log-sum-exp (running max and
            rescaled sum) and the picked target logit; it keeps only the
            per-token max and sum of exponentials [N] for the backward.
  backward  (`jax.custom_vjp`) a second scan recomputes each block's logits,
            forms d logits = (softmax - one_hot) for labelled tokens, adds its
            d hidden into a float32 [N, D] carry and writes its d head into the
            head-shaped gradient in place.

Why vocabulary blocks rather than token blocks: a token block still holds
[tokens, V] (V = 152,064 for the 7B: a 1,024-token block is 0.6 GB of float32
logits, and again for their gradient), and the whole head's gradient has to
be accumulated across token blocks anyway; a vocabulary block holds [N, v]
whatever the vocabulary, the head is read once per pass, and its gradient is
written block by block with no accumulation. The price is one more head matmul
in the backward (the recomputed logits), a few percent of a 7B step.

A vocabulary not divisible by the block: the block size is balanced over
ceil(V / block) blocks (a multiple of 128 where that stays within `block`), and
the last block is clamped to end at V, so it overlaps the one before; the
columns it re-reads are masked out of its log-sum-exp, target and gradient.

Sharding: the head's vocabulary axis is split over the mesh's "tensor" axis
(`parallel.RULES`); with tensor > 1 each block's dynamic slice may gather it (not measured),
so set the block to None (full logits) there until a tensor-parallel CE exists.

Axis legend: B batch, T tokens, N = B*T rows, D width, V vocabulary, v block.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from vxl_jax.config import Qwen2Config

DEFAULT_BLOCK = 8192      # vocabulary block: [N, 8192] float32 logits per step (134 MB at N = 4096)


def block_size(vocab: int, block: int) -> int:
    """The block actually used: at most `block` and V, balanced over ceil(V / block) blocks."""
    if block < 1:
        raise ValueError(f"vocabulary block must be >= 1, got {block}")
    if block >= vocab:
        return vocab
    blocks = -(-vocab // block)
    even = -(-vocab // blocks)
    return min(block, -(-even // 128) * 128)


def lm_head_cross_entropy(params: dict, cfg: Qwen2Config, hidden: jax.Array, targets: jax.Array, *,
                          block: int = DEFAULT_BLOCK) -> tuple[jax.Array, jax.Array]:
    """(Σ CE float32, count int32) of final-normed hidden [..., D] against targets [...] (negative: ignored).

    The head is `qwen2.logits`': the embedding [V, D] when tied, else lm_head [D, V], cast to hidden's dtype.
    """
    if cfg.tie_word_embeddings:
        w, axis = params["embed_tokens"], 0
    else:
        w, axis = params["lm_head"], 1
    h = hidden.reshape(-1, hidden.shape[-1])
    t = targets.reshape(-1).astype(jnp.int32)
    ce = _chunked_ce(block_size(w.shape[axis], block), axis, h, w.astype(h.dtype), t)
    return ce, jnp.sum(targets >= 0, dtype=jnp.int32)


def _block(w: jax.Array, axis: int, i: jax.Array, size: int, vocab: int):
    """Block i of the head: (start, w_block [D, v] or [v, D], fresh [v] = columns no earlier block had)."""
    start = jnp.minimum(i * size, vocab - size)
    w_blk = jax.lax.dynamic_slice_in_dim(w, start, size, axis=axis)
    cols = start + jnp.arange(size, dtype=jnp.int32)
    return start, w_blk, cols, (cols >= i * size)


def _logits(h: jax.Array, w_blk: jax.Array, axis: int) -> jax.Array:
    """[N, v] float32, as `qwen2.logits` computes them."""
    spec = "ND,VD->NV" if axis == 0 else "ND,DV->NV"
    return jnp.einsum(spec, h, w_blk, preferred_element_type=jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunked_ce(size: int, axis: int, h: jax.Array, w: jax.Array, t: jax.Array) -> jax.Array:
    return _forward(size, axis, h, w, t)[0]


def _forward(size, axis, h, w, t):
    vocab = w.shape[axis]
    blocks = -(-vocab // size)
    ragged = vocab % size != 0
    n = h.shape[0]

    def body(carry, i):
        m, s, picked = carry
        _, w_blk, cols, fresh = _block(w, axis, i, size, vocab)
        logits = _logits(h, w_blk, axis)
        if ragged:
            logits = jnp.where(fresh[None, :], logits, -jnp.inf)
        m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
        s = s * jnp.exp(m - m_new) + jnp.sum(jnp.exp(logits - m_new[:, None]), axis=-1)
        hit = cols[None, :] == t[:, None]            # a masked column never matches: its target is elsewhere
        if ragged:
            hit = hit & fresh[None, :]
        picked = picked + jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
        return (m_new, s, picked), None

    init = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.float32), jnp.zeros((n,), jnp.float32))
    (m, s, picked), _ = jax.lax.scan(body, init, jnp.arange(blocks, dtype=jnp.int32))
    ce = jnp.sum(jnp.where(t >= 0, (jnp.log(s) + m) - picked, 0.0))    # log-sum-exp as jax.nn.logsumexp adds it
    return ce, (m, s)


def _fwd(size, axis, h, w, t):
    ce, (m, s) = _forward(size, axis, h, w, t)
    return ce, (h, w, t, m, s)


def _bwd(size, axis, res, g):
    h, w, t, m, s = res
    vocab = w.shape[axis]
    blocks = -(-vocab // size)
    ragged = vocab % size != 0
    scale = jnp.where(t >= 0, g, 0.0).astype(jnp.float32)        # [N]: d Σ CE / d CE_n
    norm = scale / s                                               # softmax = exp(logit - max) / Σ exp, as the
                                                                   # full path's logsumexp differentiates

    def body(carry, i):
        dh, dw = carry
        start, w_blk, cols, fresh = _block(w, axis, i, size, vocab)
        logits = _logits(h, w_blk, axis)
        hit = cols[None, :] == t[:, None]
        if ragged:
            hit = hit & fresh[None, :]
        d = jnp.exp(logits - m[:, None]) * norm[:, None] - jnp.where(hit, scale[:, None], 0.0)
        if ragged:
            d = jnp.where(fresh[None, :], d, 0.0)                  # d logits [N, v]
        if axis == 0:
            dh = dh + jnp.einsum("NV,VD->ND", d, w_blk, preferred_element_type=jnp.float32)
            dw_blk = jnp.einsum("ND,NV->VD", h, d, preferred_element_type=jnp.float32)
        else:
            dh = dh + jnp.einsum("NV,DV->ND", d, w_blk, preferred_element_type=jnp.float32)
            dw_blk = jnp.einsum("ND,NV->DV", h, d, preferred_element_type=jnp.float32)
        # Every column is written by the one block that owns it; the overlapped columns of a clamped last block
        # add an exact 0 to what the block before wrote.
        old = jax.lax.dynamic_slice_in_dim(dw, start, size, axis=axis)
        dw = jax.lax.dynamic_update_slice_in_dim(dw, old + dw_blk.astype(dw.dtype), start, axis=axis)
        return (dh, dw), None

    init = (jnp.zeros(h.shape, jnp.float32), jnp.zeros(w.shape, w.dtype))
    (dh, dw), _ = jax.lax.scan(body, init, jnp.arange(blocks, dtype=jnp.int32))
    return dh.astype(h.dtype), dw, None


_chunked_ce.defvjp(_fwd, _bwd)
