"""Invariants of the model code: chunked prefill + decode == one full pass, batching, padding, remat."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vxl_jax.model import qwen2, videoxl
from vxl_jax.tiny import random_params, tiny_config


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
        ctx = qwen2.make_context(cfg.llm, jnp.array([at]), chunk, size)
        hidden, cache = qwen2.decode_layers(params["llm"], cfg.llm, x, cache, ctx)
        outs.append(qwen2.logits(params["llm"], cfg.llm, hidden))
        at += chunk
    np.testing.assert_allclose(np.concatenate(outs, axis=1), full, atol=1e-5)


def test_batch_rows_with_padding_equal_each_row_alone(model):
    params, cfg = model
    a, b = _ids(1, 20), _ids(2, 13)
    batch = jnp.concatenate([a, jnp.pad(b, ((0, 0), (0, 7)))], axis=0)
    logits = _full_logits(params, cfg, batch, lengths=jnp.array([20, 13]))
    np.testing.assert_allclose(logits[0], _full_logits(params, cfg, a)[0], atol=1e-5)
    np.testing.assert_allclose(logits[1, :13], _full_logits(params, cfg, b)[0], atol=1e-5)


def test_visual_rows_take_features_in_order(model):
    params, cfg = model
    ids, mask = videoxl.expand_placeholder(np.array([3, 4, videoxl.IMAGE_TOKEN_INDEX, 5]), 6)
    feats = jax.random.normal(jax.random.key(0), (1, 6, cfg.llm.hidden_size))
    x = videoxl.embed_inputs(params, jnp.asarray(ids)[None], jnp.asarray(mask)[None], feats)
    np.testing.assert_array_equal(x[0, 2:8], feats[0])
    np.testing.assert_array_equal(x[0, [0, 1, 8]], params["llm"]["embed_tokens"][jnp.array([3, 4, 5])])


def test_vst_rows_use_the_vst_projections(model):
    params, cfg = model
    x = jax.random.normal(jax.random.key(1), (1, 4, cfg.llm.hidden_size))
    is_vst = jnp.array([[False, True, False, True]])
    run = lambda vst: qwen2.decode_layers(params["llm"], cfg.llm, x, qwen2.KVCache.zeros(cfg.llm, 1, 4),
                                          qwen2.make_context(cfg.llm, jnp.zeros(1, jnp.int32), 4, 4, is_vst=vst))[1]
    plain, with_vst = run(None), run(is_vst)
    np.testing.assert_array_equal(plain.k[0, 0, 0], with_vst.k[0, 0, 0])      # row 0: ordinary projections
    assert float(jnp.abs(plain.k[0, 0, 1] - with_vst.k[0, 0, 1]).max()) > 1e-2  # row 1: VST projections


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


def test_blocked_attention_equals_dense_attention_values_and_gradients():
    from vxl_jax.model.layers import attention, dense_attention
    rng = np.random.default_rng(0)
    b, t, s, n, k, h = 2, 70, 150, 4, 2, 8
    q, key, val = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
                   for shape in ((b, t, n, h), (b, s, k, h), (b, s, k, h)))
    offset = jnp.array([40, 75])[:, None, None]                 # causal window after a memory, per row
    mask = jnp.arange(s)[None, None, :] <= offset + jnp.arange(t)[None, :, None]
    mask = mask.at[1, 5].set(False)                              # a query that sees nothing -> zeros
    blocked = lambda *a: attention(*a, block=32)                 # 3 query blocks x 5 key blocks, some skipped
    np.testing.assert_allclose(blocked(q, key, val, mask), dense_attention(q, key, val, mask), atol=1e-6, rtol=0)
    assert not np.any(np.asarray(blocked(q, key, val, mask))[1, 5])
    loss = lambda fn: (lambda q, k, v: jnp.sum(jnp.sin(fn(q, k, v, mask))))
    for g_blocked, g_dense in zip(jax.grad(loss(blocked), argnums=(0, 1, 2))(q, key, val),
                                  jax.grad(loss(dense_attention), argnums=(0, 1, 2))(q, key, val)):
        assert np.all(np.isfinite(np.asarray(g_blocked)))
        np.testing.assert_allclose(g_blocked, g_dense, atol=1e-5, rtol=0)
