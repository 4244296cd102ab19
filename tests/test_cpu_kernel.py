"""The fused CPU flash-attention kernel (vxl_jax/kernels/cpu_attention.cc) against dense attention.

Every case builds the equivalent mask over [memory | own keys] (memory entries < mem_len[b], own key j
visible to query t iff j <= q_pos[b, t]) and compares the kernel's output with `dense_attention` and its
log-sum-exp with the masked logits' logsumexp (layout [B, K, G, T], as `attention._forward`).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vxl_jax.kernels import cpu_attention
from vxl_jax.model import attention

pytestmark = pytest.mark.skipif(not cpu_attention.available(),
                                reason=f"CPU attention kernel unavailable: {cpu_attention.unavailable_reason()}")

ATOL = 2e-5


def _mask_and_keep(mem_len, q_pos, s: int, u: int):
    """The equivalent mask [B, T, S + U] over [memory | own keys], and keep [B, S, 1, 1]: the memory entries
    below mem_len (the references zero the scratch region: NaN there would poison the dense einsum)."""
    b, t = q_pos.shape
    mem_mask = jnp.broadcast_to(jnp.arange(s)[None, None, :] < mem_len[:, None, None], (b, t, s))
    own_mask = jnp.arange(u)[None, None, :] <= q_pos[:, :, None]
    keep = (jnp.arange(s)[None, :] < mem_len[:, None])[..., None, None]
    return jnp.concatenate([mem_mask, own_mask], axis=-1), keep


@jax.jit
def _reference(q, k, v, mem_k, mem_v, mem_len, q_pos):
    """(out, lse) by one dense softmax over the concatenated keys with the equivalent mask."""
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    mask, keep = _mask_and_keep(mem_len, q_pos, mem_k.shape[1], k.shape[1])
    keys = jnp.concatenate([jnp.where(keep, mem_k, 0.0), k], 1)
    values = jnp.concatenate([jnp.where(keep, mem_v, 0.0), v], 1)
    out = attention.dense_attention(q, keys, values, mask)
    qf = q.reshape(b, t, kv_heads, n // kv_heads, h)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", qf, keys, precision="highest") * h ** -0.5
    lse = jax.nn.logsumexp(jnp.where(mask[:, None, None], logits, -jnp.inf), axis=-1)
    return out, lse


def _inputs(rng, b, t, s, g, kv_heads, h, u=None):
    u = t if u is None else u
    n = kv_heads * g
    f = lambda *shape: rng.standard_normal(shape, dtype=np.float32)
    return f(b, t, n, h), f(b, u, kv_heads, h), f(b, u, kv_heads, h), f(b, s, kv_heads, h), f(b, s, kv_heads, h)


def _check(out, lse, ref_out, ref_lse, atol=ATOL):
    out, lse = np.asarray(out), np.asarray(lse)
    assert np.isfinite(out).all() and np.isfinite(lse).all()
    np.testing.assert_allclose(out, np.asarray(ref_out), atol=atol, rtol=0)
    np.testing.assert_allclose(lse, np.asarray(ref_lse), atol=atol, rtol=1e-6)


CASES = [  # b, t, s, g, kv_heads, h, mem_len
    (1, 1, 0, 1, 1, 64, [0]),                 # decode with nothing but itself
    (2, 1, 260, 4, 2, 64, [259, 0]),          # decode over memory
    (1, 5, 3, 4, 2, 128, [3]),
    (2, 37, 260, 4, 2, 64, [0, 260]),         # one row without memory, one with the full buffer
    (2, 37, 3, 1, 2, 32, [1, 2]),
    (1, 300, 260, 1, 4, 128, [131]),
    (2, 300, 0, 4, 1, 64, [0, 0]),            # causal only
    (2, 700, 260, 4, 2, 64, [17, 260]),       # threaded
    (1, 37, 260, 2, 2, 48, [200]),            # head dim not a multiple of 16 (tails of the micro-kernels)
]


@pytest.mark.parametrize("b,t,s,g,kv_heads,h,mem_len", CASES)
def test_matches_dense(b, t, s, g, kv_heads, h, mem_len):
    rng = np.random.default_rng(t * 1000 + s + h)
    q, k, v, mk, mv = _inputs(rng, b, t, s, g, kv_heads, h)
    ml = jnp.asarray(mem_len, jnp.int32)
    out, lse = jax.jit(cpu_attention.forward)(q, k, v, mk, mv, ml)
    assert out.shape == q.shape and out.dtype == jnp.float32
    assert lse.shape == (b, kv_heads, g, t)
    ref_out, ref_lse = _reference(q, k, v, mk, mv, ml, jnp.broadcast_to(jnp.arange(t), (b, t)))
    _check(out, lse, ref_out, ref_lse)


def test_matches_xla_forward():
    """Same (out, lse) as the xla backend's blocked forward, the function the kernel replaces."""
    rng = np.random.default_rng(1)
    q, k, v, mk, mv = _inputs(rng, 2, 300, 260, 4, 2, 64)
    ml = jnp.asarray([100, 260], jnp.int32)
    out, lse = cpu_attention.forward(q, k, v, mk, mv, ml)
    ref_out, ref_lse = jax.jit(attention._forward, static_argnums=6)(q, k, v, mk, mv, ml, 128)
    _check(out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("g,h", [(4, 64), (1, 128)])
def test_query_subset(g, h):
    """Only some query rows (sorted random positions of a longer own-key sequence): U != T."""
    rng = np.random.default_rng(2)
    b, u, t, s = 2, 300, 45, 260
    q, k, v, mk, mv = _inputs(rng, b, t, s, g, 2, h, u=u)
    q_pos = jnp.asarray(np.stack([np.sort(rng.choice(u, t, replace=False)) for _ in range(b)]), jnp.int32)
    ml = jnp.asarray([37, 0], jnp.int32)
    out, lse = jax.jit(cpu_attention.forward)(q, k, v, mk, mv, ml, q_pos)
    _check(out, lse, *_reference(q, k, v, mk, mv, ml, q_pos))
    # Each row equals the same row of the full causal computation (rows are independent).
    q_full = rng.standard_normal((b, u, 2 * g, h), dtype=np.float32)
    rows = np.asarray(q_pos)
    q_full[np.arange(b)[:, None], rows] = q
    full_out, full_lse = cpu_attention.forward(q_full, k, v, mk, mv, ml)
    np.testing.assert_allclose(np.asarray(out), np.asarray(full_out)[np.arange(b)[:, None], rows], atol=ATOL)
    np.testing.assert_allclose(np.asarray(lse), np.take_along_axis(np.asarray(full_lse), rows[:, None, None], -1),
                               atol=ATOL)


def test_full_attention_without_own_keys():
    """CLIP-like full attention: every key as memory (mem_len = S), no own keys (U = 0)."""
    rng = np.random.default_rng(3)
    b, t, h, heads = 3, 77, 64, 4
    q, k, v, _, _ = _inputs(rng, b, t, 0, 1, heads, h)
    none = np.zeros((b, 0, heads, h), np.float32)
    out, lse = jax.jit(cpu_attention.forward)(q, none, none, k, v, jnp.full((b,), t, jnp.int32))
    np.testing.assert_allclose(np.asarray(out), np.asarray(attention.dense_attention(q, k, v)), atol=ATOL)
    _check(out, lse, *_reference(q, none, none, k, v, jnp.full((b,), t, jnp.int32), jnp.zeros((b, t), jnp.int32)))


def test_scratch_never_read():
    """NaN/inf beyond mem_len in the memory buffers must not reach the results."""
    rng = np.random.default_rng(4)
    b, t, s = 2, 37, 260
    q, k, v, mk, mv = _inputs(rng, b, t, s, 4, 2, 64)
    mem_len = [5, 200]
    for i, m in enumerate(mem_len):
        mk[i, m:] = np.nan
        mv[i, m:] = np.inf
    ml = jnp.asarray(mem_len, jnp.int32)
    out, lse = jax.jit(cpu_attention.forward)(q, k, v, mk, mv, ml)
    _check(out, lse, *_reference(q, k, v, mk, mv, ml, jnp.broadcast_to(jnp.arange(t), (b, t))))


def test_row_without_keys():
    """A row that sees no key (no memory, q_pos < 0) gets out 0 and lse -1e30; the others are unaffected."""
    rng = np.random.default_rng(5)
    q, k, v, mk, mv = _inputs(rng, 1, 4, 8, 2, 1, 32)
    q_pos = jnp.asarray([[-1, 0, 2, 3]], jnp.int32)
    out, lse = cpu_attention.forward(q, k, v, mk, mv, jnp.zeros((1,), jnp.int32), q_pos)
    assert np.all(np.asarray(out)[0, 0] == 0) and np.all(np.asarray(lse)[..., 0] == -1e30)
    ref_out, ref_lse = _reference(q, k, v, mk, mv, jnp.zeros((1,), jnp.int32), q_pos)
    _check(out[:, 1:], lse[..., 1:], ref_out[:, 1:], ref_lse[..., 1:])


def test_threads_agree(monkeypatch):
    """One thread and the default give the same bits (strips are independent)."""
    rng = np.random.default_rng(6)
    q, k, v, mk, mv = _inputs(rng, 1, 400, 100, 4, 2, 64)
    ml = jnp.asarray([100], jnp.int32)
    many = cpu_attention.forward(q, k, v, mk, mv, ml)
    monkeypatch.setenv("VXL_KERNEL_THREADS", "1")
    one = cpu_attention.forward(q, k, v, mk, mv, ml)
    for x, y in zip(many, one):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_vmap_and_validation():
    rng = np.random.default_rng(7)
    q, k, v, mk, mv = _inputs(rng, 1, 9, 6, 2, 1, 32)
    ml = jnp.asarray([4], jnp.int32)
    stacked = lambda x: jnp.stack([x, 2 * x])
    out, lse = jax.vmap(cpu_attention.forward)(stacked(q), k[None].repeat(2, 0), v[None].repeat(2, 0),
                                               mk[None].repeat(2, 0), mv[None].repeat(2, 0), ml[None].repeat(2, 0))
    ref = cpu_attention.forward(2 * q, k, v, mk, mv, ml)
    np.testing.assert_allclose(np.asarray(out[1]), np.asarray(ref[0]), atol=1e-6)
    np.testing.assert_allclose(np.asarray(lse[1]), np.asarray(ref[1]), atol=1e-6)
    with pytest.raises(ValueError, match="float32"):
        cpu_attention.forward(q.astype(jnp.bfloat16), k, v, mk, mv, ml)
    with pytest.raises(ValueError, match="multiple"):
        cpu_attention.forward(q[:, :, :1], np.concatenate([k, k], 2), np.concatenate([v, v], 2),
                              np.concatenate([mk, mk], 2), np.concatenate([mv, mv], 2), ml)
    with pytest.raises(ValueError, match="mem_len"):
        cpu_attention.forward(q, k, v, mk, mv, jnp.asarray([1, 2], jnp.int32))
    with pytest.raises(ValueError, match="q_pos"):
        cpu_attention.forward(q, k, v, mk, mv, ml, jnp.zeros((1, 3), jnp.int32))


def _portable_target(tmp_path, monkeypatch, target: str, symbol: str) -> str:
    """Builds the library without AVX-512 (the portable path) and registers `symbol` under a test name."""
    import ctypes

    monkeypatch.setenv("VXL_KERNEL_CACHE", str(tmp_path))
    lib = ctypes.CDLL(str(cpu_attention._build(cpu_attention._compiler(), ("-mno-avx512f",))))
    name = target + "_portable_test"
    jax.ffi.register_ffi_target(name, jax.ffi.pycapsule(getattr(lib, symbol)), platform="cpu")
    return name


@pytest.mark.slow
def test_portable_fallback(tmp_path, monkeypatch):
    """The scalar / auto-vectorised path (built without AVX-512) computes the same."""
    name = _portable_target(tmp_path, monkeypatch, cpu_attention.TARGET, cpu_attention.SYMBOL)
    rng = np.random.default_rng(8)
    b, t, s, g, kv_heads, h = 2, 70, 40, 4, 2, 40
    q, k, v, mk, mv = _inputs(rng, b, t, s, g, kv_heads, h)
    ml, q_pos = jnp.asarray([40, 3], jnp.int32), jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    call = jax.ffi.ffi_call(name, (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                                   jax.ShapeDtypeStruct((b, kv_heads, g, t), jnp.float32)))
    out, lse = call(q, k, v, mk, mv, ml, q_pos)
    _check(out, lse, *_reference(q, k, v, mk, mv, ml, q_pos))


def test_lse_merges_like_the_backward_expects():
    """exp(logits - lse) over the visible keys sums to one (the backward recomputes probabilities this way)."""
    rng = np.random.default_rng(9)
    q, k, v, mk, mv = _inputs(rng, 1, 20, 10, 2, 2, 64)
    ml = jnp.asarray([7], jnp.int32)
    _, lse = cpu_attention.forward(q, k, v, mk, mv, ml)
    keys = jnp.concatenate([mk[:, :7], k], 1)
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", q.reshape(1, 20, 2, 2, 64), keys, precision="highest") / 8.0
    mask = jnp.concatenate([jnp.ones((20, 7), bool), jnp.tril(jnp.ones((20, 20), bool))], 1)
    total = jnp.sum(jnp.where(mask, jnp.exp(logits - lse[..., None]), 0.0), -1)
    np.testing.assert_allclose(np.asarray(total), 1.0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------------
# The backward kernel: against jax.grad through dense attention with the equivalent mask.


@jax.jit
def _reference_grads(q, k, v, mem_k, mem_v, mem_len, q_pos, d_out):
    """(dq, dk, dv, d_mem_k, d_mem_v) of sum(d_out * dense attention) with the equivalent mask; the scratch
    region of the memory (>= mem_len) is replaced by zeros first, so its gradient is 0."""
    mask, keep = _mask_and_keep(mem_len, q_pos, mem_k.shape[1], k.shape[1])

    def loss(q, k, v, mem_k, mem_v):
        keys = jnp.concatenate([jnp.where(keep, mem_k, 0.0), k], 1)
        values = jnp.concatenate([jnp.where(keep, mem_v, 0.0), v], 1)
        with jax.default_matmul_precision("highest"):
            return jnp.sum(attention.dense_attention(q, keys, values, mask) * d_out)

    return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(q, k, v, mem_k, mem_v)


def _backward_case(rng, b, t, s, g, kv_heads, h, mem_len, u=None, q_pos=None, scratch=np.nan, reference=True):
    """Kernel forward + backward and the reference gradients; the memory beyond mem_len holds `scratch`."""
    q, k, v, mk, mv = _inputs(rng, b, t, s, g, kv_heads, h, u=u)
    d_out = rng.standard_normal(q.shape, dtype=np.float32)
    for i, m in enumerate(mem_len):
        mk[i, m:] = scratch
        mv[i, m:] = scratch
    ml = jnp.asarray(mem_len, jnp.int32)
    q_pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)) if q_pos is None else jnp.asarray(q_pos)
    out, lse = cpu_attention.forward(q, k, v, mk, mv, ml, q_pos)
    grads = jax.jit(cpu_attention.backward)(q, k, v, mk, mv, ml, q_pos, out, lse, d_out)
    ref = _reference_grads(q, k, v, mk, mv, ml, q_pos, d_out) if reference else None
    return (q, k, v, mk, mv, ml, q_pos, out, lse, d_out), grads, ref


def _check_grads(grads, ref, primals, mem_len, atol=ATOL):
    for name, x, y, p in zip(("dq", "dk", "dv", "d_mem_k", "d_mem_v"), grads, ref, primals):
        x = np.asarray(x)
        assert x.shape == p.shape and x.dtype == np.float32, name
        assert np.isfinite(x).all(), name
        np.testing.assert_allclose(x, np.asarray(y), atol=atol, rtol=1e-5, err_msg=name)
    for i, m in enumerate(mem_len):        # the scratch region's gradient is exactly zero
        assert not np.any(np.asarray(grads[3])[i, m:]) and not np.any(np.asarray(grads[4])[i, m:])


BACKWARD_CASES = CASES[:7] + [            # the forward's up to "causal only" (two pairs of equal cost), then
    (1, 37, 260, 2, 2, 48, [200]),            # head dim not a multiple of 16
    (2, 300, 260, 4, 1, 64, [17, 260]),       # threaded, pairs of different cost (split into parts)
]


@pytest.mark.parametrize("b,t,s,g,kv_heads,h,mem_len", BACKWARD_CASES)
def test_backward_matches_dense(b, t, s, g, kv_heads, h, mem_len):
    rng = np.random.default_rng(t * 1000 + s + h + 17)
    primals, grads, ref = _backward_case(rng, b, t, s, g, kv_heads, h, mem_len)
    _check_grads(grads, ref, primals[:5], mem_len)


def test_backward_full_attention_without_own_keys():
    """CLIP-like: every key as memory of full length, no own keys (U = 0): dk/dv are empty."""
    rng = np.random.default_rng(21)
    b, t, heads, h = 2, 77, 4, 64
    primals, grads, ref = _backward_case(rng, b, t, t, 1, heads, h, [t, t], u=0)
    assert grads[1].shape == (b, 0, heads, h) and grads[2].shape == (b, 0, heads, h)
    _check_grads(grads, ref, primals[:5], [t, t])
    # The same as jax.grad of the unmasked dense attention (what full_attention's gradient is).
    q, _, _, mk, mv = primals[:5]
    d_out = primals[9]
    dense = jax.jit(jax.grad(lambda q, k, v: jnp.sum(attention.dense_attention(q, k, v) * d_out), argnums=(0, 1, 2)))
    for x, y in zip((grads[0], grads[3], grads[4]), dense(q, mk, mv)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=ATOL, rtol=1e-5)


@pytest.mark.parametrize("g,h", [(4, 64), (1, 128)])
def test_backward_query_subset(g, h):
    """Rows at sorted random positions of a longer own-key sequence (U > T); scratch NaN beyond mem_len."""
    rng = np.random.default_rng(22)
    b, u, t, s = 2, 300, 45, 260
    q_pos = np.stack([np.sort(rng.choice(u, t, replace=False)) for _ in range(b)]).astype(np.int32)
    primals, grads, ref = _backward_case(rng, b, t, s, g, 2, h, [37, 0], u=u, q_pos=q_pos)
    _check_grads(grads, ref, primals[:5], [37, 0])


def test_backward_matches_xla_backward():
    """Same gradients as the xla backend's blocked backward (attention._flash_bwd), the rule the kernel replaces."""
    rng = np.random.default_rng(23)
    primals, grads, _ = _backward_case(rng, 2, 150, 130, 4, 2, 64, [50, 130], scratch=0.0, reference=False)
    q, k, v, mk, mv, ml, q_pos, out, lse, d_out = primals
    xla = jax.jit(lambda res, d: attention._flash_bwd(128, "xla", res, d))((q, k, v, mk, mv, ml, None, out, lse), d_out)
    for x, y in zip(grads, xla[:5]):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=ATOL, rtol=1e-5)


def test_backward_scratch_inf_and_rows_without_keys():
    """inf in the scratch region, a row that sees no key (q_pos < 0, no memory): it gets dq 0 and adds nothing."""
    rng = np.random.default_rng(24)
    q_pos = np.asarray([[-1, 0, 2, 3], [-1, -1, 1, 3]], np.int32)
    primals, grads, ref = _backward_case(rng, 2, 4, 8, 2, 1, 32, [0, 5], q_pos=q_pos, scratch=np.inf)
    assert np.all(np.asarray(primals[8])[0, ..., 0] == -1e30)
    assert not np.any(np.asarray(grads[0])[0, 0])
    _check_grads(grads, ref, primals[:5], [0, 5])


@pytest.mark.parametrize("threads,mem_len", [("2", [100]), ("3", [100, 7])])
def test_backward_threads_agree(monkeypatch, threads, mem_len):
    """One thread vs several: the same bits where the work is cut the same way (whole pairs of equal cost),
    else the same to rounding (pairs split into parts summed at the end: dk/dv sum ~1600 rows in another
    order, a few ulps)."""
    rng = np.random.default_rng(25)
    b = len(mem_len)
    primals, _, _ = _backward_case(rng, b, 400, 100, 4, 2 if b == 1 else 1, 64, mem_len, reference=False)
    monkeypatch.setenv("VXL_KERNEL_THREADS", threads)
    many = cpu_attention.backward(*primals)
    monkeypatch.setenv("VXL_KERNEL_THREADS", "1")
    one = cpu_attention.backward(*primals)
    for x, y in zip(many, one):
        if b == 1:
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        else:
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=1e-5)


def test_backward_vmap_and_validation():
    rng = np.random.default_rng(26)
    primals, grads, _ = _backward_case(rng, 1, 9, 6, 2, 1, 32, [4], scratch=0.0, reference=False)
    q, k, v, mk, mv, ml, q_pos, out, lse, d_out = primals
    twice = cpu_attention.backward(q, k, v, mk, mv, ml, q_pos, out, lse, 2 * d_out)   # linear in d_out
    stacked = jax.vmap(cpu_attention.backward, in_axes=(None,) * 9 + (0,))(
        q, k, v, mk, mv, ml, q_pos, out, lse, jnp.stack([d_out, 2 * d_out]))
    for x, y, z in zip(grads, twice, stacked):
        np.testing.assert_allclose(np.asarray(z[0]), np.asarray(x), atol=1e-6)
        np.testing.assert_allclose(np.asarray(z[1]), np.asarray(y), atol=1e-6)
    same = cpu_attention.backward(q, k, v, mk, mv, ml, None, out, lse, d_out)            # None = arange(T)
    for x, y in zip(grads, same):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    with pytest.raises(ValueError, match="lse"):
        cpu_attention.backward(q, k, v, mk, mv, ml, q_pos, out, lse[..., :3], d_out)
    with pytest.raises(ValueError, match="d_out"):
        cpu_attention.backward(q, k, v, mk, mv, ml, q_pos, out, lse, d_out.astype(jnp.bfloat16))
    with pytest.raises(ValueError, match="float32"):
        cpu_attention.backward(q.astype(jnp.bfloat16), k, v, mk, mv, ml, q_pos, out, lse, d_out)


@pytest.mark.slow
def test_portable_fallback_backward(tmp_path, monkeypatch):
    """The backward built without AVX-512 computes the same."""
    name = _portable_target(tmp_path, monkeypatch, cpu_attention.TARGET_BACKWARD, cpu_attention.SYMBOL_BACKWARD)
    rng = np.random.default_rng(27)
    primals, _, ref = _backward_case(rng, 2, 70, 40, 4, 2, 40, [40, 3])
    call = jax.ffi.ffi_call(name, tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in primals[:5]))
    grads = call(*primals)
    _check_grads(grads, ref, primals[:5], [40, 3])
