"""The optimizer's groups, schedule, clipping, freezing and weight decay (`vxl_jax.train.optim`)."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vxl_jax.config import VideoXLConfig
from vxl_jax.model import videoxl
from vxl_jax.train import optim
from vxl_jax.train.optim import OptimConfig, ParamGroup

# The two stages we ship.
STAGE1 = (ParamGroup("^projector/"), ParamGroup(".*", trainable=False))   # projector-only pretraining
STAGE2 = (ParamGroup("^vision/", lr_scale=0.1),)                          # full fine-tuning, slower vision


@pytest.fixture(scope="module")
def params():
    """The real tiny parameter tree; shapes from `init_params` (eval_shape: its eager init takes ~10 s
    on CPU), values random so every leaf is distinct and nonzero."""
    cfg = VideoXLConfig.load("tiny")
    shapes = jax.eval_shape(lambda k: videoxl.init_params(cfg, k), jax.random.key(0))
    rng = np.random.default_rng(0)
    return jax.tree.map(lambda s: jnp.asarray(rng.normal(size=s.shape), s.dtype), shapes)


def flat(tree):
    """{name: leaf} of a params-shaped tree."""
    return dict(zip(jax.tree.leaves(optim.param_names(tree)), jax.tree.leaves(tree)))


def random_like(tree, seed, scale=1.0):
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(scale * rng.normal(size=x.shape), x.dtype), tree)


def test_param_names(params):
    names = set(flat(params))
    assert {"projector/fc1/kernel", "llm/layers/vst_k_proj/bias", "vision/layers/fc1/kernel",
            "llm/norm/scale", "llm/embed_tokens"} <= names


def test_schedule_closed_form():
    peak, warmup, max_steps, end = 1e-3, 10, 110, 0.1
    sched = optim.lr_schedule(OptimConfig(learning_rate=peak, warmup_steps=warmup, end_lr_ratio=end), max_steps)

    def expected(step):
        if step < warmup:
            return peak * step / warmup
        t = min(step - warmup, max_steps - warmup) / (max_steps - warmup)
        return peak * (end + (1 - end) * 0.5 * (1 + math.cos(math.pi * t)))

    for step in (0, 5, 10, 35, 60, 109, 110, 500):
        np.testing.assert_allclose(float(sched(step)), expected(step), rtol=1e-5, atol=1e-12, err_msg=f"step {step}")
    assert float(sched(0)) == 0.0 and float(sched(500)) == pytest.approx(peak * end)
    assert float(sched(60)) == pytest.approx(peak * 0.55)            # half-way down the cosine

    no_warmup = optim.lr_schedule(OptimConfig(learning_rate=peak), 100)
    assert float(no_warmup(0)) == pytest.approx(peak) and float(no_warmup(100)) == pytest.approx(0.0, abs=1e-12)
    explicit = optim.lr_schedule(OptimConfig(learning_rate=peak, warmup_steps=2, decay_steps=4), 1000)
    assert float(explicit(4)) == pytest.approx(peak * 0.5) and float(explicit(6)) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError, match="no steps left"):
        optim.lr_schedule(OptimConfig(warmup_steps=10), 10)


def test_stage_configs(params):
    names = jax.tree.leaves(optim.param_names(params))

    cfg1 = OptimConfig(groups=STAGE1)
    train1 = jax.tree.leaves(optim.trainable_mask(cfg1, params))
    assert train1 == [n.startswith("projector/") for n in names] and sum(train1) == 4
    assert jax.tree.leaves(optim.group_of(cfg1, params)) == [0 if n.startswith("projector/") else 1 for n in names]

    cfg2 = OptimConfig(groups=STAGE2)
    assert all(jax.tree.leaves(optim.trainable_mask(cfg2, params)))
    groups2 = jax.tree.leaves(optim.group_of(cfg2, params))
    assert groups2 == [0 if n.startswith("vision/") else 1 for n in names]     # 1: the default group
    assert 0 < groups2.count(0) < len(names)


def test_frozen_params_unchanged(params):
    cfg = OptimConfig(learning_rate=1e-2, warmup_steps=2, weight_decay=0.1, groups=STAGE1)
    tx = optim.build(cfg, params, max_steps=10)
    update = jax.jit(tx.update)
    state, p = tx.init(params), params
    for seed in range(4):
        updates, state = update(random_like(params, seed), state, p)
        p = jax.tree.map(lambda a, u: a + u, p, updates)
    before, after = flat(params), flat(p)
    for name in before:
        if name.startswith("projector/"):
            assert np.all(np.asarray(after[name]) != np.asarray(before[name])), name
        else:
            np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def test_first_adam_step_is_lr_times_scale(params):
    """Adam's first update is -lr * g / (|g| + eps) = -lr * sign(g) for |g| >> eps: per group, lr * lr_scale."""
    lr = 1e-3
    cfg = OptimConfig(learning_rate=lr, eps=1e-12, groups=(ParamGroup("^vision/", lr_scale=0.1),
                                                           ParamGroup("^projector/", lr_scale=3.0)))
    tx = optim.build(cfg, params, max_steps=100)
    rng = np.random.default_rng(1)
    grads = jax.tree.map(lambda x: jnp.asarray(rng.choice([-1.0, 1.0], x.shape) * (1 + rng.random(x.shape)),
                                               x.dtype), params)
    updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
    for name, u in flat(updates).items():
        scale = 0.1 if name.startswith("vision/") else 3.0 if name.startswith("projector/") else 1.0
        np.testing.assert_allclose(u, -lr * scale * np.sign(flat(grads)[name]), rtol=1e-5, err_msg=name)


def test_weight_decay_skips_biases_and_norm_scales(params):
    """With zero gradients Adam's step is 0, so the update is the decay alone: -lr * wd * value."""
    lr, wd = 1e-2, 0.1
    cfg = OptimConfig(learning_rate=lr, weight_decay=wd, groups=(ParamGroup("^vision/", weight_decay=0.0),))
    tx = optim.build(cfg, params, max_steps=100)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, _ = jax.jit(tx.update)(zeros, tx.init(params), params)
    u, p = flat(updates), flat(params)
    decay = flat(optim.decay_mask(params))
    for name in ("projector/fc1/bias", "llm/norm/scale",          # ndim 1
                 "llm/layers/input_norm/scale", "llm/layers/q_proj/bias",    # stacked over layers: ndim 2, 3
                 "vision/layers/fc1/kernel"):                      # group with weight_decay=0
        np.testing.assert_array_equal(u[name], 0.0, err_msg=name)
    for name in ("projector/fc1/kernel", "llm/embed_tokens", "llm/layers/q_proj/kernel", "llm/lm_head"):
        np.testing.assert_allclose(u[name], -lr * wd * p[name], rtol=1e-6, err_msg=name)
    for name in decay:
        assert decay[name] == (name.rsplit("/", 1)[-1] not in ("bias", "scale")), name


def test_clip_and_zero(params):
    cfg = OptimConfig(clip_norm=1.0, groups=STAGE1)
    tx = optim.clip_and_zero(cfg, params)
    apply = jax.jit(lambda g: tx.update(g, tx.init(params), params)[0])
    grads = random_like(params, 2, scale=10.0)
    trainable_norm = float(optim.global_norm({k: v for k, v in grads.items() if k == "projector"}))
    assert trainable_norm > 1.0
    out, g = flat(apply(grads)), flat(grads)
    assert float(optim.global_norm(out)) == pytest.approx(1.0, rel=1e-5)
    for name in out:
        if name.startswith("projector/"):
            np.testing.assert_allclose(out[name], g[name] / trainable_norm, rtol=1e-5, err_msg=name)
        else:
            np.testing.assert_array_equal(out[name], 0.0, err_msg=name)

    small = jax.tree.map(lambda x: x / (2 * trainable_norm), grads)     # trainable norm 0.5: untouched
    out_small = flat(apply(small))
    np.testing.assert_allclose(out_small["projector/fc1/kernel"], flat(small)["projector/fc1/kernel"], rtol=1e-6)

    off = optim.clip_and_zero(OptimConfig(clip_norm=None, groups=STAGE1), params)
    out_off = flat(off.update(grads, off.init(params), params)[0])
    np.testing.assert_array_equal(out_off["projector/fc2/kernel"], g["projector/fc2/kernel"])
    np.testing.assert_array_equal(out_off["llm/lm_head"], 0.0)


def test_global_norm_float32():
    tree = {"a": jnp.full((300, 300), 3.0, jnp.bfloat16), "b": [jnp.array([4.0])]}
    n = optim.global_norm(tree)
    assert n.dtype == jnp.float32 and float(n) == pytest.approx(math.sqrt(9 * 300 * 300 + 16), rel=1e-6)
    assert float(optim.global_norm({})) == 0.0


def test_pattern_errors(params):
    with pytest.raises(ValueError) as e:
        OptimConfig(groups=(ParamGroup("(["), ParamGroup("^ok/"), ParamGroup("[[a]")))
    assert "'(['" in str(e.value) and "'[[a]'" in str(e.value) and "^ok/" not in str(e.value)

    typo = OptimConfig(groups=(ParamGroup("^projecter/"), ParamGroup("^vision/")))
    for fn in (optim.group_of, optim.trainable_mask, optim.describe, optim.clip_and_zero):
        with pytest.raises(ValueError, match=r"matching no parameter.*\^projecter/"):
            fn(typo, params)
    with pytest.raises(ValueError, match=r"matching no parameter.*\^projecter/"):
        optim.build(typo, params, 10)

    shadowed = OptimConfig(groups=(ParamGroup(".*", trainable=False), ParamGroup("^vision/")))
    with pytest.raises(ValueError, match=r"earlier group.*\^vision/"):
        optim.group_of(shadowed, params)

    with pytest.raises(ValueError, match="end_lr_ratio"):
        OptimConfig(end_lr_ratio=2.0)


def test_from_dict_round_trip_and_unknown_keys():
    cfg = OptimConfig(learning_rate=2e-5, warmup_steps=30, decay_steps=900, end_lr_ratio=0.1, weight_decay=0.05,
                      clip_norm=None, groups=(ParamGroup("^vision/", lr_scale=0.1, weight_decay=0.0),
                                              ParamGroup("^llm/embed_tokens$", trainable=False)))
    again = OptimConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg and isinstance(again.groups, tuple)
    assert OptimConfig.from_dict({}) == OptimConfig()

    with pytest.raises(ValueError, match=r"unknown OptimConfig keys: \['lr', 'warmup'\]"):
        OptimConfig.from_dict({"learning_rate": 1e-4, "lr": 1e-4, "warmup": 3})
    with pytest.raises(ValueError, match=r"groups\[1\].*\['lr'\]"):
        OptimConfig.from_dict({"groups": [{"pattern": "^a"}, {"pattern": "^b", "lr": 2.0}]})


def test_describe(params):
    text = optim.describe(OptimConfig(groups=STAGE1), params)
    assert "^projector/" in text and ".*" in text and "(default)" not in text
    assert "trainable: 6,272 of" in text
    text2 = optim.describe(OptimConfig(groups=STAGE2), params)
    assert "^vision/" in text2 and "0.1" in text2 and "(default)" in text2
