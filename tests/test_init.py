"""Fresh random parameters (model/init.py): the model's structure, the documented statistics, one cheap draw."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vxl_jax.model import clip, init, projector, qwen2, videoxl
from vxl_jax.tiny import tiny_config


def _flax_structure(cfg):
    k = jax.random.key(0)
    return {"vision": clip.init_params(cfg.vision, k), "llm": qwen2.init_params(cfg.llm, k),
            "projector": projector.init_params(cfg.vision.hidden_size, cfg.llm.hidden_size, k)}


def _leaves(params):
    return {jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}


@pytest.fixture(scope="module")
def drawn():
    cfg = tiny_config()
    return cfg, _leaves(jax.jit(lambda: videoxl.init_params(cfg, jax.random.key(0)))())


def test_same_structure_shapes_and_dtypes_as_the_modules(drawn):
    cfg, got = drawn
    want = jax.eval_shape(lambda: _flax_structure(cfg))
    assert jax.tree.structure(want) == jax.tree.structure(jax.eval_shape(lambda: videoxl.init_params(cfg, jax.random.key(0))))
    for path, leaf in jax.tree_util.tree_flatten_with_path(want)[0]:
        assert got[jax.tree_util.keystr(path)].shape == leaf.shape


def test_statistics_per_kind_of_leaf(drawn):
    cfg, got = drawn
    d = cfg.llm.hidden_size
    for name, x in got.items():
        if name.endswith("['bias']"):
            assert not x.any(), name
        elif name.endswith("['scale']"):
            assert np.all(x == 1), name
    heads_dim = cfg.llm.num_heads * cfg.llm.head_dim
    checks = {"['llm']['layers']['q_proj']['kernel']": d ** -0.5,
              "['llm']['layers']['o_proj']['kernel']": heads_dim ** -0.5,        # contracts (heads, head dim)
              "['llm']['layers']['mlp']['down_proj']['kernel']": cfg.llm.intermediate_size ** -0.5,
              "['llm']['embed_tokens']": 1.0, "['vision']['pos_embed']": 0.02}
    for name, std in checks.items():
        assert abs(got[name].std() / std - 1) < 0.1, (name, got[name].std(), std)
        assert abs(got[name].mean()) < 0.1 * std, name
    # Leaves are independent draws: no two random leaves of one shape are equal.
    assert not np.allclose(got["['llm']['layers']['q_proj']['kernel']"][0], got["['llm']['layers']['q_proj']['kernel']"][1])


def test_deterministic_per_key_and_big_leaves_drawn_alone(monkeypatch):
    cfg = tiny_config()
    draw = jax.jit(lambda k: videoxl.init_params(cfg, k))
    a, b, c = (_leaves(draw(jax.random.key(seed))) for seed in (1, 1, 2))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.allclose(a["['llm']['embed_tokens']"], c["['llm']['embed_tokens']"])
    monkeypatch.setattr(init, "SINGLE_DRAW_MAX", 1000)          # every sizeable leaf takes its own draw
    alone = _leaves(jax.jit(lambda k: videoxl.init_params(cfg, k))(jax.random.key(1)))
    emb = alone["['llm']['embed_tokens']"]
    assert abs(emb.std() - 1) < 0.05 and not np.allclose(emb, a["['llm']['embed_tokens']"])


def test_unknown_leaf_names_an_error():
    with pytest.raises(ValueError, match="no initialiser rule for parameter llm/mystery"):
        init.fill(lambda: {"llm": {"mystery": jnp.zeros((3,))}}, jax.random.key(0))
