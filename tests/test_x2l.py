"""Video-X2L: bi-level encoding, selective re-loading, oracles (tiny random model, 4 tokens per frame)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vxl_jax import pipeline
from vxl_jax.compress import schedules
from vxl_jax.tiny import random_params, tiny_config
from vxl_jax.compress.memory import pre_rope_keys
from vxl_jax.x2l import bilevel, merge, oracles, runner
from vxl_jax.x2l.runner import X2LConfig

WINDOW = 24           # 6 frames of 4 tokens
LOW, HIGH = 2, 8


@pytest.fixture(scope="module")
def model():
    cfg = tiny_config()
    cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, image_size=56),
                              vst=dataclasses.replace(cfg.vst, window=WINDOW))
    assert cfg.tokens_per_frame == 4
    return jax.tree.map(jnp.asarray, random_params(cfg, seed=3)), cfg


@pytest.fixture(scope="module")
def video(model):
    _, cfg = model
    rng = np.random.default_rng(0)
    prefix, suffix = rng.integers(11, 490, 9), rng.integers(11, 490, 6)
    feats = (0.6 * rng.standard_normal((20 * cfg.tokens_per_frame, cfg.llm.hidden_size))).astype(np.float32)
    return prefix, suffix, feats                         # 80 tokens: chunks of 24, 24, 24, 8


@pytest.fixture(scope="module")
def encoded(model, video):
    params, cfg = model
    prefix, _, feats = video
    return runner.encode_video(params, cfg, [prefix], [feats], X2LConfig(low=LOW, high=HIGH))


def _plain(model, video, ratio, max_new_tokens=5):
    params, cfg = model
    prefix, suffix, feats = video
    prepared = pipeline.prepare(cfg, [np.concatenate([prefix, [-200], suffix])], [feats], schedules.fixed(ratio),
                                max_new_tokens=max_new_tokens)
    return prepared, *pipeline.run(params, cfg, prepared, max_new_tokens=max_new_tokens)


@pytest.mark.parametrize("chosen,ratio", [(True, LOW), (False, HIGH)], ids=["all-L-equals-low", "none-equals-high"])
def test_all_or_no_chunk_selected_equals_plain_compression(model, video, encoded, chosen, ratio):
    params, cfg = model
    _, suffix, _ = video
    prepared, result, gen = _plain(model, video, ratio)
    selected = [[chosen] * encoded.num_chunks[0]]
    out = runner.answer(params, cfg, encoded, selected, [suffix], max_new_tokens=5)
    np.testing.assert_allclose(np.asarray(out.last_logits), np.asarray(result.last_logits), atol=1e-5, rtol=0)
    np.testing.assert_array_equal(np.asarray(out.generation.tokens), np.asarray(gen.tokens))
    want_k, want_v = result.memory.row(0)
    got_k, got_v = out.generation.memory.row(0)
    n = prepared.plans[0].memory_after_prefill
    assert int(out.memory_entries[0]) + len(suffix) == n
    np.testing.assert_allclose(got_k[:, :n], want_k, atol=1e-5, rtol=0)
    np.testing.assert_allclose(got_v[:, :n], want_v, atol=1e-5, rtol=0)


def test_merged_memory_is_compact_ordered_and_the_same_from_host(model, encoded):
    params, cfg = model
    assert encoded.num_chunks == [4]
    assert list(np.diff(encoded.low_bounds[0])) == [12, 12, 12, 4]
    assert list(np.diff(encoded.high_bounds[0])) == [3, 3, 3, 1]
    # The device scan's window starts agree with the host plan's bounds.
    np.testing.assert_array_equal(np.asarray(encoded.device.low_starts)[:4, 0], encoded.low_bounds[0, :4])
    np.testing.assert_array_equal(np.asarray(encoded.device.high_starts)[:4, 0], encoded.high_bounds[0, :4])
    selected = [[False, True, False, True]]
    (level, index), = merge.sources(encoded, selected)
    assert len(level) == encoded.entries(0, selected[0]) == 9 + 3 + 12 + 3 + 4
    # Temporal order: prefix, then chunk by chunk, each chunk's entries contiguous and increasing.
    spans = [(0, 9, merge.LOW)] + [(int(b[0, w]), int(b[0, w + 1]), lv) for w, (b, lv) in enumerate(
        [(encoded.high_bounds, merge.HIGH), (encoded.low_bounds, merge.LOW)] * 2)]
    np.testing.assert_array_equal(index, np.concatenate([np.arange(a, b) for a, b, _ in spans]))
    np.testing.assert_array_equal(level, np.concatenate([np.full(b - a, lv) for a, b, lv in spans]))

    on_device = merge.merge_on_device(encoded, selected, 64, cfg.llm.rope_theta)
    host = encoded.offload()
    assert host.device is None
    from_host = merge.merge_from_host(host, selected, 64, cfg.llm.rope_theta)
    n = len(level)
    assert int(on_device.length[0]) == int(from_host.length[0]) == n
    np.testing.assert_array_equal(np.asarray(on_device.cache.k)[:, 0, :n], np.asarray(from_host.cache.k)[:, 0, :n])
    np.testing.assert_array_equal(np.asarray(on_device.cache.v)[:, 0, :n], np.asarray(from_host.cache.v)[:, 0, :n])
    # Entry for entry: the L memory's chunk 1 sits right after the prefix and H chunk 0, its keys
    # re-rotated from slots 21..32 to 12..23 (equal before RoPE).
    low_v = np.asarray(encoded.device.low.cache.v)[:, 0]
    np.testing.assert_array_equal(np.asarray(on_device.cache.v)[:, 0, 12:24], low_v[:, 21:33])
    theta = cfg.llm.rope_theta
    low_k = pre_rope_keys(np.asarray(encoded.device.low.cache.k)[:, 0, :33], theta)
    merged_k = pre_rope_keys(np.asarray(on_device.cache.k)[:, 0, :24], theta)
    np.testing.assert_allclose(merged_k[:, 12:24], low_k[:, 21:33], atol=1e-5, rtol=0)


def test_answers_from_host_memory_equal_answers_from_device_memory(model, video, encoded):
    params, cfg = model
    _, suffix, _ = video
    selected = [[True, False, False, True]]
    a = runner.answer(params, cfg, encoded, selected, [suffix], max_new_tokens=4)
    b = runner.answer(params, cfg, encoded.offload(), selected, [suffix], max_new_tokens=4)
    np.testing.assert_array_equal(np.asarray(a.last_logits), np.asarray(b.last_logits))
    np.testing.assert_array_equal(np.asarray(a.generation.tokens), np.asarray(b.generation.tokens))


def test_streamed_frames_match_features_and_one_compilation_per_bucket(model):
    params, cfg = model
    rng = np.random.default_rng(5)
    prefix = rng.integers(11, 490, 7)
    norm = (np.full(3, 127.5), np.full(3, 64.0))
    start = bilevel.TRACES["encode"]
    x2l = X2LConfig(low=LOW, high=HIGH)
    for frames in (13, 17):                        # 3 windows each: one bucket
        pixels = rng.integers(0, 256, (frames, 3, 56, 56), dtype=np.uint8)
        enc = runner.encode_video(params, cfg, [prefix], [pixels], x2l, pixel_norm=norm)
        assert enc.num_chunks == [3] and sum(n for _, n in enc.chunk_frames[0]) == frames
        assert enc.frame_features[0].shape == (frames, cfg.llm.hidden_size)
    assert bilevel.TRACES["encode"] - start == 1
    # The features path on the same pixels gives the same memories.
    from vxl_jax.model import videoxl
    x = videoxl.normalise_pixels(jnp.asarray(pixels), jnp.asarray(norm[0]), jnp.asarray(norm[1]))
    feats = np.asarray(videoxl.frame_features(params, cfg, x)).reshape(-1, cfg.llm.hidden_size)
    by_feats = runner.encode_video(params, cfg, [prefix], [feats], x2l)
    for a, b in ((enc.device.low, by_feats.device.low), (enc.device.high, by_feats.device.high)):
        np.testing.assert_allclose(a.row(0)[0], b.row(0)[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(enc.frame_features[0], by_feats.frame_features[0], atol=1e-5, rtol=0)


def _query(encoded, question_ids, key=None):
    return oracles.Query("what?", np.asarray(question_ids), encoded.chunk_frames[0], encoded.frame_features[0],
                         key=key)


def test_oracles_are_deterministic_and_the_attention_oracle_finds_the_matching_chunk(model, video):
    params, cfg = model
    prefix, _, feats = video
    table = np.asarray(params["llm"]["embed_tokens"])
    question = np.asarray([40, 41, 42])
    # Frames 12..17 (chunk 2) look like the question's mean embedding; the rest are noise.
    feats = feats.copy().reshape(20, 4, -1)
    feats[12:18] = 3.0 * table[question].mean(axis=0)
    enc = runner.encode_video(params, cfg, [prefix], [feats.reshape(80, -1)], X2LConfig(low=LOW, high=HIGH))
    attention = runner.build_oracle(X2LConfig(), params)
    scores = attention(_query(enc, question))
    assert scores.shape == (4,) and int(np.argmax(scores)) == 2
    np.testing.assert_array_equal(scores, attention(_query(enc, question)))
    key = jax.random.key(3)
    rand = oracles.random()
    np.testing.assert_array_equal(rand(_query(enc, question, key)), rand(_query(enc, question, key)))
    assert not np.array_equal(rand(_query(enc, question, key)), rand(_query(enc, question, jax.random.key(4))))
    assert list(oracles.uniform(2)(_query(enc, question))) == [1, 0, 0, 1]
    assert list(np.flatnonzero(oracles.select(oracles.last()(_query(enc, question)), 2))) == [2, 3]


def test_selection_rules():
    scores = [0.1, 0.9, 0.5, 0.9, 0.2]
    assert list(np.flatnonzero(oracles.select(scores, 2))) == [1, 3]               # ties: the earlier first
    assert list(np.flatnonzero(oracles.select(scores, 1))) == [1]
    assert list(np.flatnonzero(oracles.select(scores, 1, force_first=True, force_last=True))) == [0, 1, 4]
    assert oracles.select(scores, 9).all() and not oracles.select(scores, 0).any()
    with pytest.raises(ValueError, match="NaN"):
        oracles.select([0.1, float("nan")], 1)


def test_x2l_options_parse_and_refuse_nonsense():
    x = X2LConfig.parse("low=4,high=16,k=2,oracle=uniform,force_first=yes,offload=1")
    assert (x.low, x.high, x.k, x.oracle, x.force_first, x.offload) == (4, 16, 2, "uniform", True, True)
    with pytest.raises(ValueError, match="X2L options are"):
        X2LConfig.parse("lo=2")
    with pytest.raises(ValueError, match="low <= high"):
        X2LConfig.parse("low=8,high=2")
    with pytest.raises(ValueError, match="needs clip_dir"):
        X2LConfig.parse("oracle=clip")
    with pytest.raises(ValueError, match="unknown oracle"):
        X2LConfig.parse("oracle=psychic")


def test_clip_oracle_scores_chunks_by_text_to_frame_cosine(tmp_path):
    from vxl_jax.conversion.clip_model import load_clip_model, write_tiny_clip
    from vxl_jax.model import clip_dual

    write_tiny_clip(str(tmp_path / "clip"), seed=1)
    model = load_clip_model(str(tmp_path / "clip"))
    frames = np.random.default_rng(2).integers(0, 256, (7, 64, 64, 3), dtype=np.uint8)
    chunks = ((0, 3), (3, 3), (6, 1))
    query = oracles.Query("a red circle", np.zeros(1, np.int64), chunks, np.zeros((7, 4)), frames=frames)
    oracle = runner.build_oracle(X2LConfig(oracle="clip", clip_dir=str(tmp_path / "clip")), {})
    scores = oracle(query)
    np.testing.assert_array_equal(scores, oracle(query))                        # deterministic
    # By hand: cosine of the text embedding with each frame's, averaged per chunk.
    cos = np.asarray(clip_dual.similarity(model.embed_text(["a red circle"]), model.embed_frames(frames)))[0]
    np.testing.assert_allclose(scores, [cos[0:3].mean(), cos[3:6].mean(), cos[6]], atol=1e-6)
    # Channels-first frames (as the prefill holds them) give the same scores.
    first = oracles.Query("a red circle", np.zeros(1, np.int64), chunks, np.zeros((7, 4)),
                          frames=frames.transpose(0, 3, 1, 2))
    np.testing.assert_allclose(oracle(first), scores, atol=1e-6)
