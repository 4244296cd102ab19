"""Training step pieces on one device: batch planning and targets, accumulation == one batch, configs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vxl_jax import parallel
from vxl_jax.config import VideoXLConfig
from vxl_jax.model import videoxl
from vxl_jax.train import batch as batch_lib, loss as loss_lib, optim, step as step_lib
from vxl_jax.train.config import TrainConfig, apply_overrides

from sharding_worker import make_batch


@pytest.fixture(scope="module")
def model():
    cfg = VideoXLConfig.load("tiny_112")
    return cfg, jax.tree.map(np.asarray, jax.jit(lambda: videoxl.init_params(cfg, jax.random.key(0)))())


def test_targets_are_the_rotated_labels_without_the_video():
    cfg = VideoXLConfig.load("tiny_112")
    ids = np.array([[5, 6, 7, -200, 8, 9, 10, 11, 0, 0]], np.int32)
    labels = np.array([[5, 6, -100, -100, -100, 9, 10, 11, -100, -100]], np.int32)
    batch = {"input_ids": ids, "labels": labels, "text_mask": ids != 0,
             "frames": np.zeros((1, 8, 3, 112, 112), np.uint8), "num_frames": np.array([6], np.int32),
             "ratios": np.array([[4, 4]], np.int32)}
    batch["text_mask"][0, :8] = True
    p = batch_lib.prepare(batch, cfg, (4,))
    # prefix [5, 6, 7]: position i predicts labels[i + 1]; the last one the <image> slot (never a target).
    np.testing.assert_array_equal(p.inputs.prefix_targets[0, :3], [6, -100, -100])
    # suffix [8, 9, 10, 11]: position j predicts the label of suffix token j + 1; the last none.
    np.testing.assert_array_equal(p.inputs.suffix_targets[0, :4], [9, 10, 11, -100])
    assert p.targets == 4 and p.tokens == 8 + 6 * cfg.tokens_per_frame
    assert p.inputs.prefix_targets.shape[1] == batch_lib.PREFIX_MULTIPLE
    assert p.inputs.suffix_targets.shape[1] == ids.shape[1]        # the loader's text bucket
    labels[0, 4] = 8                                                 # the token after <image> labelled
    with pytest.raises(ValueError, match="right after <image>"):
        batch_lib.prepare(dict(batch, labels=labels), cfg, (4,))


@pytest.mark.slow  # 47 s: two compiles of the accumulating step
def test_accumulation_equals_one_batch(model):
    """4 rows in one pass == 2 micro-batches of 2 (strided rows): same token mean, same update."""
    cfg, params = model
    ocfg = optim.OptimConfig(learning_rate=1e-3)
    prepared = batch_lib.prepare(make_batch(cfg), cfg, (2, 4))
    outs = []
    for accum in (1, 2):
        tx = optim.build(ocfg, params, 10)
        step = step_lib.make_step(cfg, tx, optim.trainable_mask(ocfg, params),
                                  step_lib.StepSettings(accum_steps=accum), return_grads=True)
        state, out = step_lib.jit_step(step)(step_lib.init_state(jax.tree.map(jnp.asarray, params), tx),
                                             prepared.inputs, spec=prepared.spec)
        outs.append((out, state))
    (a, sa), (b, sb) = outs
    assert int(a["target_tokens"]) == int(b["target_tokens"]) == prepared.targets
    # The loss is a float32 sum over all target tokens divided by their count; the micro-batches add their
    # partial sums in another order, so the mean may differ by a few ulps of the sum (1 ulp of a sum near
    # 280 over 40 tokens is 7.6e-7 of the mean): compare within 4 ulps of the sum, not a fixed 1e-6.
    ulp = float(np.spacing(np.float32(float(a["loss"]) * int(a["target_tokens"])))) / int(a["target_tokens"])
    assert abs(float(a["loss"]) - float(b["loss"])) <= 4 * ulp
    grad_diff = max(jax.tree.leaves(jax.tree.map(lambda x, y: float(jnp.abs(x - y).max()), a["grads"], b["grads"])))
    assert grad_diff <= 1e-6
    assert int(sa.step) == int(sb.step) == 1


@pytest.mark.slow  # ~40 s: two compiles of the loss gradient (the prefill's per-row check is in test_compression)
def test_per_row_ratios_equal_each_row_alone(model):
    """instance-random: rows with their own ratios in one step == the rows one by one (loss sum and grads)."""
    cfg, params = model
    batch = make_batch(cfg)
    batch["ratios"][:2] = [[4, 2], [2, 4]]   # row 0 and row 1 disagree on both windows; row 2 is text only
    batch["ratios"][3, 0] = 4
    ratios = (2, 4)
    loss_sum = jax.jit(jax.value_and_grad(lambda p, inputs, spec: loss_lib.loss_terms(p, cfg, inputs, spec=spec).ce_sum),
                       static_argnums=2)
    params = jax.tree.map(jnp.asarray, params)
    whole = batch_lib.prepare(batch, cfg, ratios)
    assert whole.inputs.plan.branch.tolist() == [0, 0]             # each window runs ratio 2's branch
    value, grads = loss_sum(params, whole.inputs, whole.spec)
    rows = [batch_lib.prepare({k: v[b:b + 1] for k, v in batch.items()}, cfg, ratios,
                              prefix_size=whole.inputs.prefix_targets.shape[1]) for b in range(4)]
    assert rows[1].inputs.plan.branch.tolist() == [0, 1]
    per_row = [loss_sum(params, r.inputs, r.spec) for r in rows]
    np.testing.assert_allclose(float(value), sum(float(v) for v, _ in per_row), rtol=2e-6)
    summed = jax.tree.map(lambda *g: sum(g), *[g for _, g in per_row])
    # ||delta|| / ||g|| over tensors with ||g|| > 1e-4 (CLIP's key bias has a zero true gradient: only noise).
    rel = [float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) for a, b in zip(jax.tree.leaves(grads),
                                                                              jax.tree.leaves(summed))
           if float(jnp.linalg.norm(b)) > 1e-4]
    assert len(rel) > 20 and max(rel) < 1e-5


def test_frozen_parameters_do_not_move(model):
    cfg, params = model
    ocfg = optim.OptimConfig(learning_rate=1e-2, groups=(optim.ParamGroup("^projector/"),
                                                         optim.ParamGroup(".*", trainable=False)))
    prepared = batch_lib.prepare(make_batch(cfg, rows=2), cfg, (2, 4))
    tx = optim.build(ocfg, params, 10)
    trainable = optim.trainable_mask(ocfg, params)
    step = step_lib.make_step(cfg, tx, trainable, step_lib.StepSettings(), return_grads=True)
    state = step_lib.init_state(jax.tree.map(jnp.asarray, params), tx)
    for _ in range(2):                      # the schedule's lr is 0 at step 0 only with warmup; none here
        state, out = step_lib.jit_step(step)(state, prepared.inputs, spec=prepared.spec)
    moved = jax.tree.map(lambda a, b: bool(np.any(np.asarray(a) != b)), state.params, params)
    assert moved["projector"]["fc1"]["kernel"] and moved["projector"]["fc2"]["bias"]
    frozen = [m for m, t in zip(jax.tree.leaves(moved), jax.tree.leaves(trainable)) if not t]
    assert frozen and not any(frozen)
    grads_frozen = [g for g, t in zip(jax.tree.leaves(out["grads"]), jax.tree.leaves(trainable)) if not t]
    assert all(not np.any(np.asarray(g)) for g in grads_frozen)
    assert int(out["skipped"]) == 0


def test_a_step_with_a_non_finite_loss_changes_nothing_but_the_counter(model):
    cfg, params = model
    ocfg = optim.OptimConfig(learning_rate=1e-2)
    prepared = batch_lib.prepare(make_batch(cfg, rows=2), cfg, (2, 4))
    tx = optim.build(ocfg, params, 10)
    step = step_lib.jit_step(step_lib.make_step(cfg, tx, optim.trainable_mask(ocfg, params), step_lib.StepSettings()))
    host = lambda tree: jax.tree.map(lambda x: np.array(x, copy=True), tree)  # noqa: E731
    state, out = step(step_lib.init_state(jax.tree.map(jnp.asarray, params), tx), prepared.inputs,
                      spec=prepared.spec)
    assert int(out["skipped"]) == 0 and np.isfinite(float(out["loss"]))
    poisoned = host(state.params)
    poisoned["projector"]["fc1"]["bias"][0] = np.nan                         # the forward is NaN from here on
    before = step_lib.TrainState(state.step, jax.tree.map(jnp.asarray, poisoned), state.opt_state, state.rng)
    kept_params, kept_opt, kept_step = host(before.params), host(before.opt_state), int(before.step)
    after, out = step(before, prepared.inputs, spec=prepared.spec)            # `before` is donated
    assert int(out["skipped"]) == 1 and not np.isfinite(float(out["loss"]))
    assert int(after.step) == kept_step + 1
    same = lambda a, b: np.array_equal(np.asarray(a), b, equal_nan=True)  # noqa: E731
    assert all(jax.tree.leaves(jax.tree.map(same, after.params, kept_params)))
    assert all(jax.tree.leaves(jax.tree.map(same, after.opt_state, kept_opt)))


def test_rules_table_falls_back_to_replication_when_a_dim_does_not_divide():
    shape = {"data": 1, "fsdp": 3, "tensor": 2}
    assert parallel.spec_for(("embed", "heads"), (64, 4), shape) == parallel.P(None, "tensor")
    assert parallel.spec_for(("batch", None), (6, 5), shape) == parallel.P("fsdp", None)
    assert parallel.logical_axes("llm/layers/vst_k_proj/kernel", 4) == ("layers", "embed", "kv_heads", "head_dim")
    with pytest.raises(ValueError, match="no sharding rule"):
        parallel.logical_axes("llm/new_thing", 2)
    with pytest.raises(ValueError, match="needs 8 devices"):
        parallel.MeshConfig(data=2, fsdp=2, tensor=2).shape(4)
    assert parallel.MeshConfig(data=-1, fsdp=2).shape(8) == (4, 2, 1)


def test_every_model_parameter_has_a_sharding_rule():
    for name in ("tiny", "videoxl_7b"):
        cfg = VideoXLConfig.load(name)
        abstract = jax.eval_shape(lambda: videoxl.init_params(cfg, jax.random.key(0)))
        jax.tree_util.tree_map_with_path(lambda p, x: parallel.logical_axes(parallel.param_name(p), x.ndim), abstract)


def test_shipped_training_configs_load_and_overrides_apply():
    for name in ("tiny_synthetic", "videoxl_7b_stage1", "videoxl_7b_stage2"):
        cfg = TrainConfig.load(name)
        cfg.optim_config(), cfg.step_settings(), cfg.mesh_config()
    stage1 = TrainConfig.load("videoxl_7b_stage1")
    params = jax.eval_shape(lambda: videoxl.init_params(VideoXLConfig.load("videoxl_7b"), jax.random.key(0)))
    mask = optim.trainable_mask(stage1.optim_config(), params)
    names = jax.tree.leaves(optim.param_names(params))
    trainable = {n for n, m in zip(names, jax.tree.leaves(mask)) if m}
    assert trainable and all(n.startswith("projector/") for n in trainable)
    stage2 = TrainConfig.load("videoxl_7b_stage2")
    assert all(jax.tree.leaves(optim.trainable_mask(stage2.optim_config(), params)))
    cfg = TrainConfig.load("tiny_synthetic", ["max_steps=12", "optim.learning_rate=3e-4", "data.curriculum=4",
                                              "mesh.fsdp=2", "description=hello world"])
    assert cfg.max_steps == 12 and cfg.optim_config().learning_rate == 3e-4 and cfg.mesh_config().fsdp == 2
    assert cfg.curriculum().all_ratios == (4,) and cfg.description == "hello world"
    assert apply_overrides({"a": {"b": 1}}, ["a.c=[1, 2]"]) == {"a": {"b": 1, "c": [1, 2]}}
    for bad, match in ((["max_step=3"], "unknown training config keys"), (["optim.lr=1"], "unknown OptimConfig"),
                       (["max_steps"], "key=value"), (["mesh.data=0"], "mesh sizes")):
        with pytest.raises(ValueError, match=match):
            TrainConfig.load("tiny_synthetic", bad)
    with pytest.raises(FileNotFoundError, match="tiny_synthetic"):
        TrainConfig.load("no_such_config")
    json.dumps(cfg.to_dict())
