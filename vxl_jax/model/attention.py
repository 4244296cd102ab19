"""Attention of one LLM step: its queries over [kept memory | the step's own tokens].

Every step of the LLM (the prefix, a compressed window, the suffix text, one
decode token) has the same shape: T new tokens whose queries see

  * the kept memory: entries [0, mem_len[b]) of a buffer [B, S, K, H], every one
    of them (no mask inside, the rest of the buffer is scratch);
  * the step's own keys [B, T, K, H], causally.

Keys arrive rotated (RoPE applied once, when an entry was made). The two halves
are the standard fused-kernel shapes: "full attention with per-row key lengths"
and "causal self-attention", merged by their log-sum-exp. Backends:

  xla     blocked online softmax with its own backward (`jax.custom_vjp`, flash
          style): the forward keeps only the output and the log-sum-exp per
          query, the backward recomputes the scores block by block, so training
          memory does not grow with the score matrix. The memory half loops over
          the key blocks some row needs (a dynamic trip count): its cost follows
          the memory's length, not the buffer's size. The causal half skips the
          blocks above the diagonal.
  cpu     fused CPU kernels (`vxl_jax/kernels/cpu_attention.cc`, XLA FFI custom
          calls compiled once per machine with the system C++ compiler): the
          forward (out + log-sum-exp) and the backward, each one pass over
          [memory | own keys] per strip of query rows, float32; 300-390 GFLOP/s
          on 2 AVX-512 cores where the xla path reaches 40-120.
  cudnn   each half through `jax.nn.dot_product_attention(implementation="cudnn")`
          (GPU only), merged by log-sum-exp.
  jax     the same two calls with XLA's reference implementation (any backend):
          the tested stand-in for the cudnn path's structure.
  dense   one softmax over the concatenated keys with an explicit mask: the
          reference the others are tested against; small shapes only.
  auto    chosen from the platform the program is built for (`vxl_jax.target`, `AUTO`):
          cudnn on GPU for bfloat16/float16 inputs; cpu on a one-device CPU program where
          the kernel builds; xla otherwise.

Axis legend: B batch, T queries, S memory keys, U the step's own keys (= T),
N query heads, K kv heads, G query heads per kv head (N = K*G), H head dim.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

from vxl_jax import target
from vxl_jax.config import ATTENTION_BACKENDS as BACKENDS
from vxl_jax.kernels import cpu_attention

BLOCK = 256            # queries per block, keys per tile (256 measured fastest on the CPU with diagonal-only masks)
_NEG = -1e30           # finite "minus infinity": no inf - inf in the online softmax


# What `auto` stands for, by the target platform (`vxl_jax.target`: the mesh the program is built for) and
# whether the inputs are 16-bit. cuDNN's fused kernels take no float32; the CPU kernel is a custom call with no
# sharding rule (on a mesh of several CPU devices XLA would gather its operands), so it serves one device only.
AUTO = {
    ("gpu", True): "cudnn",
    ("gpu", False): "xla",
    ("tpu", True): "xla",
    ("tpu", False): "xla",
    ("cpu", True): "cpu",
    ("cpu", False): "cpu",
}
# Backends that only compile for one platform: a program for any other is refused, not miscompiled.
PLATFORM_ONLY = {"cpu": "cpu", "cudnn": "gpu"}


def resolve(backend: str, dtype=jnp.bfloat16) -> str:
    """The backend a program for the current target runs: `auto` through `AUTO`; an explicit one as asked,
    checked against the target (a CPU custom call never reaches a GPU or TPU program)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {BACKENDS}")
    where = target.platform()
    if backend == "auto":
        half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        backend = AUTO[(where, half)]
        if backend == "cpu" and (target.device_count() != 1 or not cpu_attention.available()):
            backend = "xla"
        return backend
    if PLATFORM_ONLY.get(backend, where) != where:
        raise ValueError(f"attention backend {backend!r} runs on {PLATFORM_ONLY[backend]} only; "
                         f"this program is built for {where}")
    if backend == "cpu" and not cpu_attention.available():
        raise RuntimeError(f"attention backend 'cpu': the kernel is unavailable ({cpu_attention.unavailable_reason()})")
    return backend


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: Optional[jax.Array] = None) -> jax.Array:
    """Grouped-query attention with one softmax over all keys, float32 scores.

    q [B, T, N, H], k/v [B, S, K, H], mask [B, T, S] (True = may attend) or None
    (every query sees every key: the CLIP encoder). A query row with no visible
    key returns zeros.
    """
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    qf = q.reshape(b, t, kv_heads, n // kv_heads, h)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", qf, k, preferred_element_type=jnp.float32) * (h ** -0.5)
    if mask is not None:
        logits = jnp.where(mask[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, v, preferred_element_type=jnp.float32).reshape(b, t, n, h)
    if mask is not None:
        out = jnp.where(jnp.any(mask, axis=-1)[:, :, None, None], out, 0.0)
    return out.astype(q.dtype)


def attend(q: jax.Array, k: jax.Array, v: jax.Array, mem_k: Optional[jax.Array] = None,
           mem_v: Optional[jax.Array] = None, mem_len: Optional[jax.Array] = None, *,
           q_pos: Optional[jax.Array] = None, backend: str = "auto", block: int = BLOCK) -> jax.Array:
    """q [B, T, N, H] over the memory (mem_k/mem_v [B, S, K, H], entries < mem_len [B]) and k/v [B, T, K, H] causally.

    No memory (None): causal self-attention only. q_pos [B, T] (int): the query
    rows are a subset of the step's rows, row t at position q_pos[b, t] of k/v
    [B, U, K, H] (it sees own keys j <= q_pos[b, t]); a step that needs only
    some rows' outputs (the VSTs of a window's penultimate layer) computes only
    those. Returns [B, T, N, H] in q's dtype.
    """
    backend = resolve(backend, q.dtype)
    if q_pos is not None:
        q_pos = jnp.asarray(q_pos, jnp.int32)
        if backend in ("cudnn", "jax"):
            backend = "xla"        # a row subset is no standard causal shape; the blocked path takes any mask
    if mem_k is None:
        b, _, kv_heads, h = k.shape
        mem_k = mem_v = jnp.zeros((b, 0, kv_heads, h), k.dtype)
        mem_len = jnp.zeros((b,), jnp.int32)
    mem_len = jnp.asarray(mem_len, jnp.int32)
    if backend == "dense":
        return _dense_split(q, k, v, mem_k, mem_v, mem_len, q_pos)
    return _flash(q, k, v, mem_k, mem_v, mem_len, q_pos, block, backend)


def full_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, backend: str = "auto") -> jax.Array:
    """Every query sees every key (no mask): the CLIP encoder. q [B, T, N, H], k/v [B, S, K, H].

    The flash path keeps only the output and the log-sum-exp for the backward
    (a dense softmax would keep every frame's [N, T, S] probabilities).
    """
    backend = resolve(backend, q.dtype)
    if backend == "dense":
        return dense_attention(q, k, v)
    if backend in ("cudnn", "jax"):
        # cuDNN's training kernels take even lengths only: CLIP's 577 tokens run as 578, the pad key masked.
        t, s = q.shape[1], k.shape[1]
        q, k, v = _even(q), _even(k), _even(v)
        lengths = jnp.full((k.shape[0],), s, jnp.int32) if k.shape[1] != s else None
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths,
                                            implementation="cudnn" if backend == "cudnn" else "xla")[:, :t]
    b, s = k.shape[:2]
    none = jnp.zeros((b, 0) + k.shape[2:], k.dtype)
    # One key block covers the whole sequence (CLIP's 577 tokens): no partial block computed twice.
    return _flash(q, none, none, k, v, jnp.full((b,), s, jnp.int32), None, max(BLOCK, s), backend)


def _dense_split(q, k, v, mem_k, mem_v, mem_len, q_pos=None):
    b, t = q.shape[:2]
    s, u = mem_k.shape[1], k.shape[1]
    mem_mask = jnp.arange(s)[None, None, :] < mem_len[:, None, None]
    if q_pos is None:
        q_pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    causal = q_pos[:, :, None] >= jnp.arange(u)[None, None, :]
    mask = jnp.concatenate([jnp.broadcast_to(mem_mask, (b, t, s)), causal], axis=-1)
    return dense_attention(q, jnp.concatenate([mem_k, k], 1), jnp.concatenate([mem_v, v], 1), mask)


def _even(x: jax.Array) -> jax.Array:
    """x [B, T, ...] padded with zeros to an even T."""
    return x if x.shape[1] % 2 == 0 else jnp.pad(x, ((0, 0), (0, 1)) + ((0, 0),) * (x.ndim - 2))


def _two_calls(q, k, v, mem_k, mem_v, mem_len, backend):
    """Forward of the cudnn / jax backends: each half through jax.nn.dot_product_attention, merged by LSE.

    Returns (out [B, T, N, H], lse [B, K, G, T]) like `_forward`; the backward is the shared blocked one
    (the residual LSE of the library call is not differentiable, the merged one is all the backward needs).
    """
    implementation = "cudnn" if backend == "cudnn" else "xla"
    b, t, n, h = q.shape
    kv_heads = k.shape[2]

    def sdpa(q, k, v, **kw):
        # cuDNN's training kernels take even lengths only: an odd step runs one pad row longer (a pad query is
        # dropped; a pad own key comes after every real query, so causality hides it; a pad memory key lies past
        # every row's length).
        out, lse = jax.nn.dot_product_attention(_even(q), _even(k), _even(v), implementation=implementation,
                                                return_residual=True, **kw)
        return out[:, :t], lse[:, :t]

    to_stats = lambda lse: lse.astype(jnp.float32).reshape(b, t, kv_heads, n // kv_heads).transpose(0, 2, 3, 1)
    out_self, lse_self = sdpa(q, k, v, is_causal=True)
    if mem_k.shape[1] == 0:
        return out_self, to_stats(lse_self)
    out_mem, lse_mem = sdpa(q, mem_k, mem_v, key_value_seq_lengths=jnp.maximum(mem_len, 1))
    lse_mem = jnp.where((mem_len > 0)[:, None, None], lse_mem.astype(jnp.float32), _NEG)
    lse_self = lse_self.astype(jnp.float32)
    top = jnp.maximum(lse_mem, lse_self)
    w_mem, w_self = jnp.exp(lse_mem - top), jnp.exp(lse_self - top)
    out = (out_mem.astype(jnp.float32) * w_mem[..., None] + out_self.astype(jnp.float32) * w_self[..., None]) \
        / (w_mem + w_self)[..., None]
    return out.astype(q.dtype), to_stats(top + jnp.log(w_mem + w_self))


# ---------------------------------------------------------------------------------------------------------------
# The xla backend: flash-style blocked attention with its own backward.
# Layout inside: queries folded per kv head, qf [B, K, G, T, H] (pre-scaled by H^-0.5); statistics [B, K, G, T].


def _fold(x, kv_heads):
    b, t, n, h = x.shape
    return x.reshape(b, t, kv_heads, n // kv_heads, h).transpose(0, 2, 3, 1, 4)


def _unfold(x):
    b, kv_heads, g, t, h = x.shape
    return x.transpose(0, 3, 1, 2, 4).reshape(b, t, kv_heads * g, h)


def _scores(qf, kb):
    return jnp.einsum("BKGTH,BSKH->BKGTS", qf, kb, preferred_element_type=jnp.float32)


def _scores_t(qf, kt):
    """Scores against keys already laid out [B, K, S, H] (no per-tile transpose)."""
    return jnp.einsum("BKGTH,BKSH->BKGTS", qf, kt, preferred_element_type=jnp.float32)


def _query_blocks(t: int, block: int) -> list[tuple[int, int]]:
    count = -(-t // block)
    size = -(-t // count)                        # even blocks: little waste
    return [(i * size, min(t, (i + 1) * size)) for i in range(count)]


def _causal(q0: int, q1: int, k0: int = 0):
    """Mask of queries q0..q1-1 over the step's keys k0..q1-1, broadcastable to [B, K, G, T, S]."""
    return (jnp.arange(q0, q1)[:, None] >= jnp.arange(k0, q1)[None, :])[None, None, None]


def _own_tiles(q0: int, q1: int, u: int, block: int, q_pos):
    """(k0, k1, mask or None) tiles of the step's own keys that query rows q0..q1-1 see.

    Plain causal (q_pos None): the tiles left of the diagonal unmasked, the diagonal
    tile masked. Row subset: every tile of the u keys, masked by the rows' positions.
    """
    if q_pos is None:
        return [(k0, min(q0, k0 + block), None) for k0 in range(0, q0, block)] + [(q0, q1, _causal(q0, q1, q0))]
    pos = q_pos[:, None, None, q0:q1, None]                                      # [B, 1, 1, T, 1]
    return [(k0, min(u, k0 + block), pos >= jnp.arange(k0, min(u, k0 + block)))
            for k0 in range(0, u, block)]


def _memory_blocks(mem_len, s: int, block: int):
    """(block size, number of blocks some row needs, start of block i, valid mask of block i [B, bs])."""
    bs = min(block, s)
    count = (jnp.max(mem_len) + bs - 1) // bs

    def at(i):
        start = jnp.minimum(i * bs, s - bs)                  # the last block may overlap the one before
        idx = start + jnp.arange(bs)
        return start, (idx >= i * bs)[None, :] & (idx[None, :] < mem_len[:, None])

    return bs, count, at


def _online(state, scores, valid, vb, values_t=False):
    """One block of the online softmax: scores [B,K,G,T,S], valid broadcastable to it or None (all valid),
    values vb [B,S,K,H] (or [B,K,S,H] with values_t)."""
    run_max, run_sum, acc = state
    if valid is not None:
        scores = jnp.where(valid, scores, _NEG)
    new_max = jnp.maximum(run_max, scores.max(axis=-1))
    probs = jnp.exp(scores - new_max[..., None])
    if valid is not None:
        probs = jnp.where(valid, probs, 0.0)
    scale = jnp.exp(run_max - new_max)
    pv = "BKGTS,BKSH->BKGTH" if values_t else "BKGTS,BSKH->BKGTH"
    acc = acc * scale[..., None] + jnp.einsum(pv, probs.astype(vb.dtype), vb, preferred_element_type=jnp.float32)
    return new_max, run_sum * scale + probs.sum(axis=-1), acc


def _forward(q, k, v, mem_k, mem_v, mem_len, block, q_pos=None):
    """Per query block: the memory's key blocks (online softmax), then the step's own keys in tiles of
    `block` (`_own_tiles`: causally, only the diagonal tile masked)."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    g = n // kv_heads
    qf = _fold(q, kv_heads) * jnp.asarray(h ** -0.5, q.dtype)
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)          # [B, K, U, H]: once, not per tile
    s = mem_k.shape[1]
    if s:
        bs, count, at = _memory_blocks(mem_len, s, block)
    outs, lses = [], []
    for q0, q1 in _query_blocks(t, block):
        qb = qf[:, :, :, q0:q1]
        rows = q1 - q0
        state = (jnp.full((b, kv_heads, g, rows), _NEG, jnp.float32),
                 jnp.zeros((b, kv_heads, g, rows), jnp.float32), jnp.zeros((b, kv_heads, g, rows, h), jnp.float32))
        if s:
            def visit(i, st, qb=qb):
                start, valid = at(i)
                kb = jax.lax.dynamic_slice_in_dim(mem_k, start, bs, axis=1)
                vb = jax.lax.dynamic_slice_in_dim(mem_v, start, bs, axis=1)
                return _online(st, _scores(qb, kb), valid[:, None, None, None, :], vb)

            state = jax.lax.fori_loop(0, count, visit, state)
        if k.shape[1]:
            for k0, k1, valid in _own_tiles(q0, q1, k.shape[1], block, q_pos):
                state = _online(state, _scores_t(qb, kt[:, :, k0:k1]), valid, vt[:, :, k0:k1], values_t=True)
        run_max, run_sum, acc = state
        outs.append(acc / run_sum[..., None])                # every query sees a key: run_sum > 0
        lses.append(run_max + jnp.log(run_sum))
    out = jnp.concatenate(outs, axis=3)
    return _unfold(out).astype(q.dtype), jnp.concatenate(lses, axis=3)


def _as_f32(*arrays):
    """The CPU kernels take float32: a bfloat16 step computes its attention in float32 there."""
    return tuple(x.astype(jnp.float32) for x in arrays)


def _forward_any(q, k, v, mem_k, mem_v, mem_len, q_pos, block, backend):
    if backend == "xla":
        return _forward(q, k, v, mem_k, mem_v, mem_len, block, q_pos)
    if backend == "cpu":
        out, lse = cpu_attention.forward(*_as_f32(q, k, v, mem_k, mem_v), mem_len, q_pos)
        return out.astype(q.dtype), lse
    return _two_calls(q, k, v, mem_k, mem_v, mem_len, backend)


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8))
def _flash(q, k, v, mem_k, mem_v, mem_len, q_pos, block, backend):
    return _forward_any(q, k, v, mem_k, mem_v, mem_len, q_pos, block, backend)[0]


def _flash_fwd(q, k, v, mem_k, mem_v, mem_len, q_pos, block, backend):
    out, lse = _forward_any(q, k, v, mem_k, mem_v, mem_len, q_pos, block, backend)
    return out, (q, k, v, mem_k, mem_v, mem_len, q_pos, out, lse)


def _block_grads(qf, dof, delta, lse, kb, vb, valid):
    """Gradients of one (query block, key block) pair: (d qf, d kb, d vb); valid broadcastable to the scores
    [B,K,G,T,S], or None (every key visible)."""
    p = jnp.exp(_scores(qf, kb) - lse[..., None])                                # [B,K,G,T,S]
    if valid is not None:
        p = jnp.where(valid, p, 0.0)
    dv = jnp.einsum("BKGTS,BKGTH->BSKH", p, dof, preferred_element_type=jnp.float32)
    dp = jnp.einsum("BKGTH,BSKH->BKGTS", dof, vb, preferred_element_type=jnp.float32)
    ds = p * (dp - delta[..., None])
    dq = jnp.einsum("BKGTS,BSKH->BKGTH", ds, kb, preferred_element_type=jnp.float32)
    dk = jnp.einsum("BKGTS,BKGTH->BSKH", ds, qf, preferred_element_type=jnp.float32)
    return dq, dk, dv


def _flash_bwd(block, backend, res, d_out):
    q, k, v, mem_k, mem_v, mem_len, q_pos, out, lse = res
    if backend == "cpu":
        primals = (q, k, v, mem_k, mem_v)
        grads = cpu_attention.backward(*_as_f32(*primals), mem_len, q_pos, *_as_f32(out), lse, *_as_f32(d_out))
        return tuple(g.astype(x.dtype) for g, x in zip(grads, primals)) + (None, None)
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    scale = h ** -0.5
    qf = _fold(q, kv_heads).astype(jnp.float32) * scale
    dof = _fold(d_out, kv_heads).astype(jnp.float32)
    delta = jnp.sum(dof * _fold(out, kv_heads).astype(jnp.float32), axis=-1)          # [B,K,G,T]
    s = mem_k.shape[1]
    d_mem_k = jnp.zeros(mem_k.shape, jnp.float32)
    d_mem_v = jnp.zeros(mem_v.shape, jnp.float32)
    if s:
        bs, count, at = _memory_blocks(mem_len, s, block)
    kf, vf = k.astype(jnp.float32), v.astype(jnp.float32)
    dk, dv = jnp.zeros(kf.shape, jnp.float32), jnp.zeros(vf.shape, jnp.float32)
    dq_parts = []
    for q0, q1 in _query_blocks(t, block):
        sl = slice(q0, q1)
        qb, dob, db, lb = qf[:, :, :, sl], dof[:, :, :, sl], delta[:, :, :, sl], lse[:, :, :, sl]
        dq_b = jnp.zeros(qb.shape, jnp.float32)
        if k.shape[1]:
            for k0, k1, valid in _own_tiles(q0, q1, k.shape[1], block, q_pos):
                dq_t, dk_t, dv_t = _block_grads(qb, dob, db, lb, kf[:, k0:k1], vf[:, k0:k1], valid)
                dq_b = dq_b + dq_t
                dk, dv = dk.at[:, k0:k1].add(dk_t), dv.at[:, k0:k1].add(dv_t)
        if s:
            def visit(i, st, qb=qb, dob=dob, db=db, lb=lb):
                dq, dmk, dmv = st
                start, valid = at(i)
                kb = jax.lax.dynamic_slice_in_dim(mem_k, start, bs, axis=1).astype(jnp.float32)
                vb = jax.lax.dynamic_slice_in_dim(mem_v, start, bs, axis=1).astype(jnp.float32)
                dq_m, dk_m, dv_m = _block_grads(qb, dob, db, lb, kb, vb, valid[:, None, None, None, :])
                add = lambda buf, x: jax.lax.dynamic_update_slice_in_dim(
                    buf, jax.lax.dynamic_slice_in_dim(buf, start, bs, axis=1) + x, start, axis=1)
                return dq + dq_m, add(dmk, dk_m), add(dmv, dv_m)

            dq_b, d_mem_k, d_mem_v = jax.lax.fori_loop(0, count, visit, (dq_b, d_mem_k, d_mem_v))
        dq_parts.append(dq_b)
    dq = _unfold(jnp.concatenate(dq_parts, axis=3) * scale)
    return (dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_mem_k.astype(mem_k.dtype),
            d_mem_v.astype(mem_v.dtype), None, None)


_flash.defvjp(_flash_fwd, _flash_bwd)
