"""The compressed prefill and decoding: invariants on a tiny random model (windows of 24 tokens).

Parity with the original is in test_golden.py; here the scan is checked against
an independent Python loop, the batch against single rows, decoding against a
teacher-forced pass, and compilations are counted.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loop_reference import prefill_loop
from tiny_inputs import random_features as _features
from tiny_inputs import random_prompt as _prompt
from tiny_inputs import windowed_model
from vxl_jax import generate as gen_lib
from vxl_jax import pipeline
from vxl_jax.compress import prefill as prefill_lib
from vxl_jax.compress.memory import pre_rope_keys
from vxl_jax.compress import schedules
from vxl_jax.compress.plan import PlanError
from vxl_jax.model import qwen2

WINDOW = 24


@pytest.fixture(scope="module")
def model():
    return windowed_model(WINDOW)


def _row(result, b, cfg):
    """Row b's memory as the original keeps it: keys before RoPE."""
    k, v = result.memory.row(b)
    return pre_rope_keys(k, cfg.llm.rope_theta), v


# "carry" (one ratio throughout, 12 s) runs with the slow tests: "mixed" carries the memory through every branch.
@pytest.mark.parametrize("ratios", [[3, None, 7, 5, 2], pytest.param([7, 7, 7, 7, 7], marks=pytest.mark.slow)],
                         ids=["mixed", "carry"])
def test_scan_equals_a_python_loop_over_windows(model, ratios):
    params, cfg = model
    rng = np.random.default_rng(0)
    prompt, feats = _prompt(rng, 10, 5), _features(rng, 100, cfg)        # windows 24,24,24,24,4
    prepared = pipeline.prepare(cfg, [prompt], [feats], schedules.per_window(ratios))
    result = prefill_lib.prefill_jit(params, cfg, prepared.arrays, jnp.asarray(prepared.visual),
                                     spec=prepared.spec)
    plan = prepared.plans[0]
    prefix, suffix = prompt[:10], prompt[11:]
    k, v, hidden, before = prefill_loop(params, cfg, plan, prefix, feats, suffix)
    got_k, got_v = _row(result, 0, cfg)
    assert got_k.shape == k.shape == (cfg.llm.num_layers, plan.memory_after_prefill, 2, 16)
    np.testing.assert_allclose(got_k, k, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got_v, v, atol=1e-5, rtol=0)
    np.testing.assert_allclose(result.suffix_hidden[0, :5], hidden, atol=1e-5, rtol=0)
    np.testing.assert_array_equal(result.memory_before[:len(before), 0], before)


def _batch_rows(cfg):
    rng = np.random.default_rng(1)
    # Different prefix, video and suffix lengths: 5 windows (last one partial) and 3 windows.
    return ([_prompt(rng, 10, 5), _prompt(rng, 6, 9)], [_features(rng, 100, cfg), _features(rng, 50, cfg)])


def test_batch_of_two_equals_each_alone(model):
    params, cfg = model
    prompts, feats = _batch_rows(cfg)
    kw = dict(max_new_tokens=5, return_logits=True)
    both = pipeline.run(params, cfg, pipeline.prepare(cfg, prompts, feats, schedules.fixed(7), max_new_tokens=5), **kw)
    for b in range(2):
        alone = pipeline.run(params, cfg, pipeline.prepare(cfg, prompts[b:b + 1], feats[b:b + 1],
                                                           schedules.fixed(7), max_new_tokens=5), **kw)
        for got, want in zip(_row(both[0], b, cfg), _row(alone[0], 0, cfg)):
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        np.testing.assert_allclose(both[0].last_logits[b], alone[0].last_logits[0], atol=1e-5, rtol=0)
        np.testing.assert_array_equal(both[1].tokens[b], alone[1].tokens[0])
        np.testing.assert_allclose(both[1].step_logits[b], alone[1].step_logits[0], atol=1e-5, rtol=0)


def test_per_row_ratios_in_one_batch_equal_each_row_alone(model):
    # instance-random training: rows give a window index different ratios (and different carries).
    params, cfg = model
    prompts, feats = _batch_rows(cfg)
    prompts, feats = prompts + prompts[:1], feats + feats[:1]
    rows = [schedules.per_window([2, 7, 5, 3, 7]), schedules.fixed(5), schedules.per_window([7, 2, 4, 4, 16])]
    prepared = pipeline.prepare(cfg, prompts, feats, rows, max_new_tokens=3, ratios=[2, 3, 4, 5, 7, 16])
    assert prepared.arrays.branch[:3].tolist() == [prepared.spec.ratios.index(r) for r in (2, 2, 4)]
    kw = dict(max_new_tokens=3, return_logits=True)
    both = pipeline.run(params, cfg, prepared, **kw)
    for b in range(3):
        alone = pipeline.run(params, cfg, pipeline.prepare(cfg, prompts[b:b + 1], feats[b:b + 1], rows[b],
                                                           max_new_tokens=3), **kw)
        assert int(both[0].memory.length[b]) == int(alone[0].memory.length[0])
        for got, want in zip(_row(both[0], b, cfg), _row(alone[0], 0, cfg)):
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)
        np.testing.assert_allclose(both[0].last_logits[b], alone[0].last_logits[0], atol=1e-5, rtol=0)
        np.testing.assert_array_equal(both[1].tokens[b], alone[1].tokens[0])


def test_prefill_then_decode_equals_a_teacher_forced_pass(model):
    params, cfg = model
    rng = np.random.default_rng(2)
    prompt, feats = _prompt(rng, 10, 5), _features(rng, 100, cfg)
    prepared = pipeline.prepare(cfg, [prompt], [feats], schedules.fixed(3), max_new_tokens=6)
    _, gen = pipeline.run(params, cfg, prepared, max_new_tokens=6, return_logits=True)
    tokens = np.asarray(gen.tokens[0])
    forced = np.concatenate([prompt, tokens[:-1]])            # the generated tokens become suffix text
    forced_in = pipeline.prepare(cfg, [forced], [feats], schedules.fixed(3))
    result = prefill_lib.prefill_jit(params, cfg, forced_in.arrays, jnp.asarray(forced_in.visual),
                                     spec=forced_in.spec)
    logits = qwen2.logits(params["llm"], cfg.llm, result.suffix_hidden[0, 4:10])
    np.testing.assert_allclose(logits, gen.step_logits[0], atol=1e-4, rtol=0)
    np.testing.assert_array_equal(np.argmax(logits, -1), tokens)


def test_one_compilation_per_bucket(model):
    params, cfg = model
    rng = np.random.default_rng(3)
    runs = [(_prompt(rng, 10, 5), _features(rng, 110, cfg)),    # 5 windows -> bucket of 8
            (_prompt(rng, 12, 7), _features(rng, 160, cfg)),    # 7 windows -> bucket of 8
            (_prompt(rng, 9, 3), _features(rng, 120, cfg))]     # 5 windows -> bucket of 8
    start = dict(prefill_lib.TRACES), dict(gen_lib.TRACES)
    for prompt, feats in runs:
        prepared = pipeline.prepare(cfg, [prompt], [feats], schedules.fixed(5), max_new_tokens=4)
        assert prepared.arrays.num_windows == 8
        pipeline.run(params, cfg, prepared, max_new_tokens=4)
    assert prefill_lib.TRACES["prefill"] - start[0]["prefill"] == 1
    assert gen_lib.TRACES["generate"] - start[1]["generate"] == 1
    # A longer video leaves the bucket: one more compilation.
    prepared = pipeline.prepare(cfg, [runs[0][0]], [_features(rng, 9 * WINDOW, cfg)], schedules.fixed(5),
                                max_new_tokens=4)
    assert prepared.arrays.num_windows == 16
    pipeline.run(params, cfg, prepared, max_new_tokens=4)
    assert prefill_lib.TRACES["prefill"] - start[0]["prefill"] == 2


def test_step_random_schedule_is_reproducible(model):
    params, cfg = model
    video = lambda windows: schedules.VideoInfo(windows * cfg.vst.window, cfg.tokens_per_frame, cfg.vst.window)
    draw = lambda seed, n=12: schedules.step_random([2, 4, 8])(video(n), jax.random.key(seed)).ratios
    assert draw(0) == draw(0) and set(draw(0)) <= {2, 4, 8}
    assert draw(0, 5) == draw(0)[:5]                       # prefix-stable: rows of a batch agree per window
    assert len({tuple(draw(s)) for s in range(6)}) > 1
    with pytest.raises(PlanError, match="explicit PRNG key"):
        schedules.step_random([2, 4])(video(3), None)
    rng = np.random.default_rng(4)
    prompt, feats = _prompt(rng, 10, 5), _features(rng, 100, cfg)
    logits = []
    for _ in range(2):
        prepared = pipeline.prepare(cfg, [prompt], [feats], schedules.step_random([2, 4, 8]),
                                    key=jax.random.key(42), ratios=[2, 4, 8])
        logits.append(np.asarray(prefill_lib.prefill_jit(params, cfg, prepared.arrays,
                                                         jnp.asarray(prepared.visual),
                                                         spec=prepared.spec).last_logits))
    np.testing.assert_array_equal(*logits)


def test_bad_ratios_fail_before_anything_runs(model):
    _, cfg = model
    rng = np.random.default_rng(5)
    prompt, feats = _prompt(rng, 10, 5), _features(rng, 100, cfg)
    for bad in (0, -2, 2.5):
        with pytest.raises(PlanError, match="integers >= 1"):
            schedules.fixed(bad)
    with pytest.raises(PlanError, match="integers >= 1"):
        pipeline.prepare(cfg, [prompt], [feats], lambda video, key: schedules.Segments(
            (video.num_tokens,), (0,)))
    with pytest.raises(PlanError, match="2 ratio\\(s\\) but the video has 5 window"):
        pipeline.prepare(cfg, [prompt], [feats], schedules.per_window([2, 4]))
    with pytest.raises(PlanError, match="not in the compiled set"):
        pipeline.prepare(cfg, [prompt], [feats], schedules.fixed(4), ratios=[2, 8])
    with pytest.raises(PlanError, match="uncompressed window \\(ratio None\\) cannot share"):
        pipeline.prepare(cfg, [prompt, prompt], [feats, feats], [schedules.fixed(2), schedules.uncompressed()])
    with pytest.raises(PlanError, match="no text after the video"):
        pipeline.prepare(cfg, [prompt[:11]], [feats], schedules.fixed(4))


def test_eos_stops_a_row_and_pads_the_rest(model):
    params, cfg = model
    prompts, feats = _batch_rows(cfg)
    prepared = pipeline.prepare(cfg, prompts, feats, schedules.fixed(4), max_new_tokens=6)
    _, free = pipeline.run(params, cfg, prepared, max_new_tokens=6)
    eos = int(free.tokens[0, 2])                                # row 0's third token becomes the eos
    _, stopped = pipeline.run(params, cfg, prepared, max_new_tokens=6, eos_ids=[eos], pad_id=-1)
    first = int(np.flatnonzero(np.asarray(free.tokens[0]) == eos)[0])
    np.testing.assert_array_equal(stopped.tokens[0, :first + 1], free.tokens[0, :first + 1])
    assert np.all(np.asarray(stopped.tokens[0, first + 1:]) == -1) and int(stopped.num_tokens[0]) == first + 1
    row1 = np.asarray(free.tokens[1])
    n1 = int(np.flatnonzero(row1 == eos)[0]) + 1 if eos in row1 else 6
    np.testing.assert_array_equal(stopped.tokens[1, :n1], row1[:n1])
    assert int(stopped.num_tokens[1]) == n1


def test_sampling_filters_and_keys(model):
    params, cfg = model
    rng = np.random.default_rng(6)
    prepared = pipeline.prepare(cfg, [_prompt(rng, 10, 5)], [_features(rng, 100, cfg)], schedules.fixed(4),
                                max_new_tokens=6)
    run = lambda sampling, seed: np.asarray(pipeline.run(params, cfg, prepared, max_new_tokens=6, sampling=sampling,
                                                         key=jax.random.key(seed))[1].tokens)
    greedy = np.asarray(pipeline.run(params, cfg, prepared, max_new_tokens=6)[1].tokens)
    np.testing.assert_array_equal(run(gen_lib.Sampling(temperature=1.0, top_k=1), 0), greedy)
    np.testing.assert_array_equal(run(gen_lib.Sampling(temperature=1.0, top_p=1e-6), 0), greedy)
    hot = gen_lib.Sampling(temperature=5.0)
    np.testing.assert_array_equal(run(hot, 3), run(hot, 3))
    assert len({run(hot, s).tobytes() for s in range(4)}) > 1

    logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda s: np.isfinite(np.asarray(gen_lib.filter_logits(logits, s)))[0].tolist()
    assert kept(gen_lib.Sampling(temperature=1.0, top_k=2)) == [True, True, False, False]
    assert kept(gen_lib.Sampling(temperature=1.0, top_p=0.75)) == [True, True, False, False]
    assert kept(gen_lib.Sampling(temperature=1.0, top_p=0.85)) == [True, True, True, False]
    with pytest.raises(ValueError, match="explicit PRNG key"):
        pipeline.run(params, cfg, prepared, max_new_tokens=2, sampling=hot)
    with pytest.raises(ValueError, match="top_p must be in"):
        gen_lib.Sampling(temperature=1.0, top_p=0.0)


def test_memory_too_small_for_decoding_is_an_error(model):
    params, cfg = model
    rng = np.random.default_rng(8)
    prepared = pipeline.prepare(cfg, [_prompt(rng, 10, 5)], [_features(rng, 100, cfg)], schedules.fixed(24))
    with pytest.raises(ValueError, match="pack the prefill with max_new_tokens >= 400"):
        pipeline.run(params, cfg, prepared, max_new_tokens=400)
