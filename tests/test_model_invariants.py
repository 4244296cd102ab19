"""Invariants of the model code: chunked prefill + decode == one full pass, batching, padding, remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vxl_jax.model import attention, layers, qwen2, videoxl
from vxl_jax.kernels import cpu_attention
from vxl_jax.tiny import random_params, tiny_config

# Every backend that runs here; the fused CPU kernel where it builds (it needs a C++ compiler).
BACKENDS = ["xla", "jax"] + (["cpu"] if cpu_attention.available() else [])


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config()
    return jax.tree.map(jnp.asarray, random_params(cfg, seed=5)), cfg


def _ids(seed, n, vocab=500):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, (1, n)))


def _full_logits(params, cfg, ids, **kw):
    hidden, _ = videoxl.forward(params, cfg, ids, **kw)
    return qwen2.logits(params["llm"], cfg.llm, hidden)


def test_chunked_prefill_then_decode_equals_one_pass(model):
    params, cfg = model
    ids = _ids(0, 24)
    full = _full_logits(params, cfg, ids)
    size = 32
    cache = qwen2.KVCache.zeros(cfg.llm, 1, size)
    outs, at = [], 0
    for chunk in (10, 7, 1, 1, 5):                 # two prefill chunks, two decode steps, one more chunk
        x = qwen2.embed(params["llm"], ids[:, at:at + chunk])
        ctx = qwen2.make_context(cfg.llm, jnp.array([at]), chunk)
        hidden, kept = qwen2.decode_layers(params["llm"], cfg.llm, x, cache if at else None, ctx)
        cache = qwen2.append(cache, kept, ctx.mem_len)
        outs.append(qwen2.logits(params["llm"], cfg.llm, hidden))
        at += chunk
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, atol=1e-5)


def test_batch_rows_with_padding_equal_each_row_alone(model):
    params, cfg = model
    a, b = _ids(1, 20), _ids(2, 13)
    batch = jnp.concatenate([a, jnp.pad(b, ((0, 0), (0, 7)))], axis=0)
    logits = _full_logits(params, cfg, batch)                     # right padding: causality hides it
    np.testing.assert_allclose(logits[0], _full_logits(params, cfg, a)[0], atol=1e-5)
    np.testing.assert_allclose(logits[1, :13], _full_logits(params, cfg, b)[0], atol=1e-5)


def test_visual_rows_take_features_in_order(model):
    params, cfg = model
    ids, mask = videoxl.expand_placeholder(np.array([3, 4, videoxl.IMAGE_TOKEN_INDEX, 5]), 6)
    feats = jax.random.normal(jax.random.key(0), (1, 6, cfg.llm.hidden_size))
    x = videoxl.embed_inputs(params, jnp.asarray(ids)[None], jnp.asarray(mask)[None], feats)
    np.testing.assert_array_equal(x[0, 2:8], feats[0])
    np.testing.assert_array_equal(x[0, [0, 1, 8]], params["llm"]["embed_tokens"][jnp.array([3, 4, 5])])


def test_vst_rows_use_the_vst_projections_and_only_vsts_are_kept(model):
    params, cfg = model
    x = jax.random.normal(jax.random.key(1), (1, 4, cfg.llm.hidden_size))
    plain = qwen2.make_context(cfg.llm, jnp.zeros(1, jnp.int32), 4)
    with_vst = qwen2.make_context(cfg.llm, jnp.zeros(1, jnp.int32), 4, vst_slots=jnp.array([[1, 3]]))
    run = lambda ctx: qwen2.decode_layers(params["llm"], cfg.llm, x, None, ctx)
    (h0, all_kept), (h1, vst_kept) = run(plain), run(with_vst)
    assert all_kept.k.shape[2] == 4 and vst_kept.k.shape[2] == 2
    np.testing.assert_array_equal(h0[0, 0], h1[0, 0])                        # row 0 sees no VST: unchanged
    assert float(jnp.abs(h0[0, 1] - h1[0, 1]).max()) > 1e-2                  # row 1: VST projections
    # Layer 0's VST keys: the VST k projection of the row, rotated to the slots they are kept in (0, 1).
    layer0 = jax.tree.map(lambda p: p[0], params["llm"]["layers"])
    normed = layers.RMSNorm(cfg.llm.rms_norm_eps).apply({"params": layer0["input_norm"]}, x)
    k_vst = jnp.einsum("BTD,DKH->BTKH", normed, layer0["vst_k_proj"]["kernel"]) + layer0["vst_k_proj"]["bias"]
    want = layers.rotate(k_vst[:, jnp.array([1, 3])], jnp.array([[0, 1]]), cfg.llm.rope_theta)
    np.testing.assert_allclose(vst_kept.k[0], want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("policy", ["full", "dots"])
def test_remat_changes_nothing(model, policy):
    params, cfg = model
    ids = _ids(3, 12)

    def loss(p, remat):
        hidden, _ = videoxl.forward(p, cfg, ids, remat=remat)
        return qwen2.logits(p["llm"], cfg.llm, hidden).std()
    g0 = jax.grad(loss)(params, "none")
    g1 = jax.grad(loss)(params, policy)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), g0, g1)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("block", [32, 512])
def test_attention_backends_equal_dense_attention_values_and_gradients(backend, block):
    """Memory half (per-row lengths, one row empty, a partial last block) + causal half, values and gradients;
    odd lengths with one block size (the cudnn path pads them to even ones, as cuDNN's training kernels need)."""
    rng = np.random.default_rng(0)
    b, n, k, h = 3, 4, 2, 8
    t, s = (71, 151) if block == 32 else (70, 150)
    q = jnp.asarray(rng.standard_normal((b, t, n, h)), jnp.float32)
    key, val = (jnp.asarray(rng.standard_normal((b, t, k, h)), jnp.float32) for _ in range(2))
    mem_k, mem_v = (jnp.asarray(rng.standard_normal((b, s, k, h)), jnp.float32) for _ in range(2))
    mem_len = jnp.array([40, 0, 150])
    run = lambda be: (lambda *a: attention.attend(*a, mem_len, backend=be, block=block))
    want = run("dense")(q, key, val, mem_k, mem_v)
    # The dense reference itself: one softmax over [memory < mem_len | causal self].
    full_k, full_v = jnp.concatenate([mem_k, key], 1), jnp.concatenate([mem_v, val], 1)
    mask = jnp.concatenate([jnp.broadcast_to(jnp.arange(s)[None, None] < mem_len[:, None, None], (b, t, s)),
                            jnp.broadcast_to(jnp.tril(jnp.ones((t, t), bool)), (b, t, t))], -1)
    np.testing.assert_allclose(want, attention.dense_attention(q, full_k, full_v, mask), atol=1e-6, rtol=0)
    np.testing.assert_allclose(run(backend)(q, key, val, mem_k, mem_v), want, atol=1e-5, rtol=0)
    loss = lambda be: (lambda *a: jnp.sum(jnp.sin(run(be)(*a))))
    args = (q, key, val, mem_k, mem_v)
    for got, ref in zip(jax.grad(loss(backend), argnums=range(5))(*args), jax.grad(loss("dense"), argnums=range(5))(*args)):
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
    # Memory entries past a row's length get no gradient.
    d_mem_k = jax.grad(loss(backend), argnums=3)(*args)
    assert not np.any(np.asarray(d_mem_k)[0, 40:]) and not np.any(np.asarray(d_mem_k)[1])


def test_attention_without_memory_is_causal_self_attention():
    rng = np.random.default_rng(1)
    q = jnp.asarray(rng.standard_normal((2, 9, 4, 8)), jnp.float32)
    key, val = (jnp.asarray(rng.standard_normal((2, 9, 2, 8)), jnp.float32) for _ in range(2))
    causal = jnp.broadcast_to(jnp.tril(jnp.ones((9, 9), bool)), (2, 9, 9))
    want = attention.dense_attention(q, key, val, causal)
    for backend in BACKENDS + ["dense"]:
        np.testing.assert_allclose(attention.attend(q, key, val, backend=backend, block=4), want, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_full_attention_equals_dense_attention_values_and_gradients(backend):
    """The CLIP encoder's unmasked attention (one key block over the whole sequence on the xla path)."""
    rng = np.random.default_rng(2)
    q, key, val = (jnp.asarray(rng.standard_normal((3, 37, 4, 8)), jnp.float32) for _ in range(3))
    np.testing.assert_allclose(attention.full_attention(q, key, val, backend=backend),
                               attention.dense_attention(q, key, val), atol=1e-6, rtol=0)
    loss = lambda fn: (lambda *a: jnp.sum(jnp.sin(fn(*a))))
    got = jax.grad(loss(lambda *a: attention.full_attention(*a, backend=backend)), argnums=(0, 1, 2))(q, key, val)
    want = jax.grad(loss(attention.dense_attention), argnums=(0, 1, 2))(q, key, val)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "jax"])     # jax takes the xla path for subsets
def test_attention_of_a_row_subset_equals_those_rows_of_the_full_attention(backend):
    """q_pos: only some query rows (per-row positions), values and gradients equal the full call's rows."""
    rng = np.random.default_rng(3)
    b, u, s, n, k, h = 2, 40, 30, 4, 2, 8
    q = jnp.asarray(rng.standard_normal((b, u, n, h)), jnp.float32)
    key, val = (jnp.asarray(rng.standard_normal((b, u, k, h)), jnp.float32) for _ in range(2))
    mem_k, mem_v = (jnp.asarray(rng.standard_normal((b, s, k, h)), jnp.float32) for _ in range(2))
    mem_len = jnp.array([12, 0])
    pos = jnp.asarray(np.stack([np.sort(rng.choice(u, 9, replace=False)) for _ in range(b)]), jnp.int32)
    pos = pos.at[0, -1].set(u - 1)
    pick = lambda x: jnp.take_along_axis(x, pos[:, :, None, None], axis=1)
    sub = lambda *a: attention.attend(pick(a[0]), *a[1:], mem_len, q_pos=pos, backend=backend, block=16)
    full = lambda *a: pick(attention.attend(*a, mem_len, backend="dense"))
    args = (q, key, val, mem_k, mem_v)
    np.testing.assert_allclose(sub(*args), full(*args), atol=1e-5, rtol=0)
    np.testing.assert_allclose(attention.attend(pick(q), key, val, mem_k, mem_v, mem_len, q_pos=pos, backend="dense"),
                               full(*args), atol=1e-6, rtol=0)
    loss = lambda f: (lambda *a: jnp.sum(jnp.sin(f(*a))))
    for got, ref in zip(jax.grad(loss(sub), argnums=range(5))(*args), jax.grad(loss(full), argnums=range(5))(*args)):
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)


def test_window_cuts_change_no_kept_entry(model):
    """need_hidden=False (last layer: entries only; the one before: VST rows only) keeps what the full pass keeps,
    with an invalid VST slot and rows of different memory lengths (3 layers: one of each mode). Gradients through
    the cuts: tests/test_train_fixture.py (the tiny model's 2 layers are a "vst" and an "entries" layer there)."""
    params, cfg = model
    layers_count = 3
    import dataclasses
    lcfg = dataclasses.replace(cfg.llm, num_layers=layers_count)
    stack = lambda p: jnp.concatenate([p, p[::-1] * 0.9])[:layers_count]      # the tiny model has 2 layers
    llm = dict(params["llm"], layers=jax.tree.map(stack, params["llm"]["layers"]))
    rng = np.random.default_rng(4)
    b, t, size = 2, 11, 24
    x = jnp.asarray(rng.standard_normal((b, t, lcfg.hidden_size)), jnp.float32)
    cache = qwen2.KVCache(*(jnp.asarray(rng.standard_normal((layers_count, b, size, lcfg.num_kv_heads, lcfg.head_dim)),
                                        jnp.float32) for _ in range(2)))
    ctx = qwen2.make_context(lcfg, jnp.array([5, 9]), t, vst_slots=jnp.array([[2, 6, 10], [1, 5, 9]]),
                             vst_valid=jnp.array([[True, True, True], [True, True, False]]))
    run = lambda p, need: qwen2.decode_layers(p, lcfg, x, cache, ctx, need_hidden=need)[1]
    want, got = run(llm, True), run(llm, False)
    valid = ctx.vst_valid[None, :, :, None, None]
    for a, c in ((got.k, want.k), (got.v, want.v)):
        np.testing.assert_allclose(jnp.where(valid, a, 0), jnp.where(valid, c, 0), atol=2e-5, rtol=0)
