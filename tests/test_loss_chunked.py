"""The chunked cross entropy (`train.chunked_ce`) against the full logits path: value, count, gradients, memory."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vxl_jax.config import VideoXLConfig
from vxl_jax.model import qwen2
from vxl_jax.train.chunked_ce import block_size, lm_head_cross_entropy
from vxl_jax.train.config import TrainConfig
from vxl_jax.train.loss import cross_entropy

BASE = VideoXLConfig.load("tiny").llm


def _case(vocab, width, tie, dtype, rows=2, tokens=9, seed=0):
    cfg = dataclasses.replace(BASE, vocab_size=vocab, hidden_size=width, tie_word_embeddings=tie)
    k = jax.random.split(jax.random.key(seed), 4)
    params = {"embed_tokens": jax.random.normal(k[0], (vocab, width)) * 0.5}
    if not tie:
        params["lm_head"] = jax.random.normal(k[1], (width, vocab)) * 0.5
    hidden = jax.random.normal(k[2], (rows, tokens, width)).astype(dtype)
    targets = jax.random.randint(k[3], (rows, tokens), -3, vocab)         # about 3 in vocab+3 ignored
    targets = targets.at[0, 0].set(vocab - 1).at[0, 1].set(0).at[1, 0].set(-100)   # both ends, an ignored one
    return cfg, params, hidden, targets


def _both(cfg, params, hidden, targets, block):
    full = lambda p, h: cross_entropy(qwen2.logits(p, cfg, h), targets)
    chunked = lambda p, h: lm_head_cross_entropy(p, cfg, h, targets, block=block)
    return [jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(params, hidden) for f in (full, chunked)]


@pytest.mark.parametrize("vocab,width,tie,block,dtype", [
    (512, 32, False, 8192, jnp.float32),     # one block (the tiny configs under the default)
    (512, 32, False, 8192, jnp.bfloat16),
    (300, 16, False, 128, jnp.float32),      # ragged: 3 blocks, the last clamped over the one before
    (300, 16, False, 128, jnp.bfloat16),
    (301, 16, True, 7, jnp.float32),         # tied head, odd block, 43 blocks
    (301, 16, True, 7, jnp.bfloat16),
    (1000, 24, False, 256, jnp.float32),     # ragged, 4 blocks
    (1024, 16, True, 256, jnp.float32),      # divisible: no overlap masking
])
def test_chunked_equals_full(vocab, width, tie, block, dtype):
    cfg, params, hidden, targets = _case(vocab, width, tie, dtype)
    ((want, want_n), want_g), ((got, got_n), got_g) = _both(cfg, params, hidden, targets, block)
    assert int(got_n) == int(want_n) == int(jnp.sum(targets >= 0))
    assert abs(float(got) - float(want)) <= 1e-6 * abs(float(want))
    assert got_g[1].dtype == hidden.dtype
    head = "embed_tokens" if tie else "lm_head"
    assert not tie or "lm_head" not in got_g[0]
    for g, w in ((got_g[0][head], want_g[0][head]), (got_g[1], want_g[1])):
        g, w = np.asarray(g, np.float32), np.asarray(w, np.float32)
        scale = np.abs(w).max()
        # float32: 1e-6 of the largest entry; bfloat16 (d hidden and the head's bfloat16 cotangent are rounded
        # to bfloat16 in both paths): one bfloat16 ulp of it.
        tol = (1e-6 if dtype == jnp.float32 else 2.0 ** -8) * scale
        assert np.abs(g - w).max() <= tol, (np.abs(g - w).max(), tol)
    if block >= vocab:   # one block: the very same operations
        np.testing.assert_array_equal(np.asarray(got_g[1], np.float32), np.asarray(want_g[1], np.float32))


def test_ignored_rows_have_no_gradient_and_nothing_labelled_is_zero():
    cfg, params, hidden, targets = _case(300, 16, False, jnp.float32)
    grad = jax.jit(jax.value_and_grad(lambda p, h, t: lm_head_cross_entropy(p, cfg, h, t, block=64),
                                      argnums=(0, 1), has_aux=True))
    (_, n), (_, g_h) = grad(params, hidden, targets.at[1].set(-100))
    assert int(n) > 0 and np.any(np.asarray(g_h[0])) and not np.any(np.asarray(g_h[1]))
    (ce0, n0), (g_p0, g_h0) = grad(params, hidden, jnp.full_like(targets, -100))
    assert float(ce0) == 0.0 and int(n0) == 0
    assert not np.any(np.asarray(g_h0)) and not np.any(np.asarray(g_p0["lm_head"]))


def test_block_size_balanced():
    assert block_size(152064, 8192) == 8064          # 19 blocks of 8064 (of 8192: 3584 columns recomputed)
    assert block_size(2048, 8192) == 2048            # at most the vocabulary: one block
    assert block_size(301, 7) == 7                    # never above the requested block
    with pytest.raises(ValueError):
        block_size(512, 0)


def test_no_vocabulary_sized_temporaries():
    """XLA's buffer assignment of the forward + backward: the chunked one holds no [N, V] buffer."""
    n, width, vocab = 512, 64, 32768
    cfg = dataclasses.replace(BASE, vocab_size=vocab, hidden_size=width, tie_word_embeddings=False)
    params = {"embed_tokens": jax.ShapeDtypeStruct((vocab, width), jnp.float32),
              "lm_head": jax.ShapeDtypeStruct((width, vocab), jnp.float32)}
    hidden = jax.ShapeDtypeStruct((1, n, width), jnp.float32)
    targets = jax.ShapeDtypeStruct((1, n), jnp.int32)

    def temp(loss):
        grad = jax.grad(lambda p, h, t: loss(p, h, t)[0], argnums=(0, 1))
        return jax.jit(grad).lower(params, hidden, targets).compile().memory_analysis().temp_size_in_bytes

    full = temp(lambda p, h, t: cross_entropy(qwen2.logits(p, cfg, h), t))
    chunked = temp(lambda p, h, t: lm_head_cross_entropy(p, cfg, h, t, block=2048))
    logits_bytes = n * vocab * 4
    assert full >= logits_bytes
    assert chunked < logits_bytes / 4, (chunked, full)
    print(f"temp full {full / 2**20:.1f} MiB, chunked {chunked / 2**20:.1f} MiB")


def test_config_loss_chunk():
    assert TrainConfig.from_dict({"step": {}}).step_settings().loss_chunk == 8192
    assert TrainConfig.from_dict({"step": {"loss_chunk": None}}).step_settings().loss_chunk is None
    assert TrainConfig.from_dict({"step": {"loss_chunk": 4096}}).step_settings().loss_chunk == 4096
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="loss_chunk"):
            TrainConfig.from_dict({"step": {"loss_chunk": bad}})
