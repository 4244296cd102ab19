"""Schedules as plain functions: variable windows in the compiled scan, the dynamic (scene-change) schedule."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from loop_reference import prefill_loop
from tiny_inputs import random_features as _features
from tiny_inputs import random_prompt as _prompt
from tiny_inputs import windowed_model
from vxl_jax import pipeline
from vxl_jax.compress import prefill as prefill_lib
from vxl_jax.compress import schedules, segmentation
from vxl_jax.compress.memory import pre_rope_keys
from vxl_jax.compress.plan import PlanError
from vxl_jax.tiny import tiny_config

WINDOW = 24


@pytest.fixture(scope="module")
def model():
    return windowed_model(WINDOW)


def _given(lengths, ratios):
    return lambda video, key=None: schedules.Segments(tuple(lengths), tuple(ratios))


@pytest.mark.slow     # 33 s; variable windows in a batch: test_rows_with_different_window_lengths_batch_like_single_rows
def test_variable_windows_equal_a_python_loop_and_share_the_compilation(model):
    params, cfg = model
    rng = np.random.default_rng(0)
    prompt, feats = _prompt(rng, 10, 5), _features(rng, 100, cfg)
    run = lambda sched: pipeline.prepare(cfg, [prompt], [feats], sched, ratios=[3, 5, None])
    fixed = run(schedules.per_window([3, 5, 3, None, 5]))                 # windows 24, 24, 24, 24, 4
    variable = run(_given([10, 24, 7, 24, 19, 16], [5, 3, None, 3, 5, 5]))
    assert fixed.spec == variable.spec and fixed.arrays.num_windows == variable.arrays.num_windows == 8
    start = prefill_lib.TRACES["prefill"]
    for prepared in (fixed, variable):
        result = prefill_lib.prefill_jit(params, cfg, prepared.arrays, jnp.asarray(prepared.visual),
                                         spec=prepared.spec)
        k, v, hidden, before = prefill_loop(params, cfg, prepared.plans[0], prompt[:10], feats, prompt[11:])
        got_k, got_v = result.memory.row(0)
        got_k = pre_rope_keys(got_k, cfg.llm.rope_theta)               # the reference keeps keys before RoPE
        assert got_k.shape == k.shape
        np.testing.assert_allclose(got_k, k, atol=1e-5, rtol=0)
        np.testing.assert_allclose(got_v, v, atol=1e-5, rtol=0)
        np.testing.assert_allclose(np.asarray(result.suffix_hidden)[0, :5], hidden, atol=1e-5, rtol=0)
        assert list(np.asarray(result.memory_before)[:len(before), 0]) == before
    assert prefill_lib.TRACES["prefill"] - start == 1                     # one program for both schedules


def test_rows_with_different_window_lengths_batch_like_single_rows(model):
    params, cfg = model
    rng = np.random.default_rng(1)
    prompts = [_prompt(rng, 10, 5), _prompt(rng, 6, 8)]
    feats = [_features(rng, 60, cfg), _features(rng, 41, cfg)]
    scheds = [_given([20, 24, 16], [4, 4, 4]), _given([24, 5, 12], [4, 4, 4])]
    both = pipeline.prepare(cfg, prompts, feats, scheds)
    result = prefill_lib.prefill_jit(params, cfg, both.arrays, jnp.asarray(both.visual), spec=both.spec)
    for b in range(2):
        one = pipeline.prepare(cfg, [prompts[b]], [feats[b]], scheds[b])
        alone = prefill_lib.prefill_jit(params, cfg, one.arrays, jnp.asarray(one.visual), spec=one.spec)
        for got, want in zip(result.memory.row(b), alone.memory.row(0)):
            np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_bad_segments_are_refused(model):
    _, cfg = model
    rng = np.random.default_rng(2)
    prompt, feats = _prompt(rng, 10, 5), _features(rng, 50, cfg)
    with pytest.raises(PlanError, match="between 1 and the window size 24, got \\[25, 25\\]"):
        pipeline.prepare(cfg, [prompt], [feats], _given([25, 25], [4, 4]))
    with pytest.raises(PlanError, match="add up to 48 visual tokens, the video has 50"):
        pipeline.prepare(cfg, [prompt], [feats], _given([24, 24], [4, 4]))
    with pytest.raises(PlanError, match="2 window length\\(s\\) but 1 ratio"):
        pipeline.prepare(cfg, [prompt], [feats], _given([24, 26], [4]))


def test_depth_score_formula():
    # The slides' example: s_3 = 93 between neighbours whose best similarities are 98 (left) and 99 (right).
    s = np.asarray([98.0, 90.0, 93.0, 99.0, 95.0])
    d = segmentation.depth_scores(s)
    assert d[2] == 98 + 99 - 2 * 93
    assert d[0] == 0.0 + (99 - 98)                   # no left side: counts as s_0 itself
    np.testing.assert_allclose(d, [max(s[:i], default=s[i]) + max(s[i + 1:], default=s[i]) - 2 * s[i]
                                   for i in range(len(s))])


def _scenes(lengths, dim=32, noise=0.05, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((len(lengths), dim))
    return np.concatenate([c + noise * rng.standard_normal((n, dim)) for c, n in zip(centres, lengths)])


def test_segmentation_finds_known_cuts():
    assert segmentation.segment(_scenes([7, 5, 9]), threshold=0.5, min_frames=2, max_frames=10) == [7, 5, 9]
    # A 13-frame scene is split into windows of at most 10; a 1-frame flash is merged (min 2 frames).
    assert segmentation.segment(_scenes([13, 4, 6]), threshold=0.5, min_frames=2, max_frames=10) == [7, 6, 4, 6]
    cuts = segmentation.segment(_scenes([4, 1, 6], seed=3), threshold=0.5, min_frames=2, max_frames=10)
    assert sum(cuts) == 11 and min(cuts) >= 2 and len(cuts) == 2
    # No cut deeper than the threshold: fixed-size windows.
    assert segmentation.segment(_scenes([12]), threshold=0.5, min_frames=2, max_frames=10) == [6, 6]


def test_dynamic_schedule_cuts_windows_at_scene_changes(model):
    params, _ = model
    cfg = tiny_config()                                   # 144 tokens per frame, windows of 10 frames
    per_frame = cfg.tokens_per_frame
    frame_feats = _scenes([7, 5, 9], dim=cfg.llm.hidden_size)
    rng = np.random.default_rng(3)
    tokens = (np.repeat(frame_feats, per_frame, axis=0)
              + 0.01 * rng.standard_normal((21 * per_frame, cfg.llm.hidden_size))).astype(np.float32)
    sched = schedules.parse("dynamic:ratio=8,threshold=0.5,min_frames=2")
    prepared = pipeline.prepare(cfg, [_prompt(rng, 6, 4)], [tokens], sched)
    plan = prepared.plans[0]
    assert [w.raw // per_frame for w in plan.windows] == [7, 5, 9]
    assert [w.num_vst for w in plan.windows] == [7 * per_frame // 8, 5 * per_frame // 8, 9 * per_frame // 8]
    np.testing.assert_array_equal(prepared.arrays.visual_start[0, :3], [0, 7 * per_frame, 12 * per_frame])


def test_schedule_parsing_and_errors():
    video = schedules.VideoInfo(num_tokens=3000, tokens_per_frame=144, window=1440)
    assert schedules.parse("fixed:ratio=4")(video, None).ratios == (4, 4, 4)
    assert schedules.parse("per-window:ratios=2/none/8")(video, None).ratios == (2, None, 8)
    assert schedules.parse("uncompressed")(video, None).ratios == (None, None, None)
    drawn = schedules.parse("step-random:choices=2/4/8")(video, jax.random.key(1)).ratios
    assert drawn == schedules.step_random([2, 4, 8])(video, jax.random.key(1)).ratios
    paper = schedules.parse("curriculum:name=curriculum_paper,step=0")(video, None).ratios
    assert set(paper) <= {2, 4}
    with pytest.raises(PlanError, match="unknown schedule 'nope'"):
        schedules.parse("nope")
    with pytest.raises(PlanError, match="takes ratio"):
        schedules.parse("fixed:rate=4")
    with pytest.raises(PlanError, match="bad value for ratio"):
        schedules.parse("fixed:ratio=four")
    with pytest.raises(PlanError, match="frame features, but none were given"):
        schedules.dynamic()(schedules.VideoInfo(1440, 144, 1440), None)
