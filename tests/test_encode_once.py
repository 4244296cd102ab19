"""Encode once, ask many: a video's memory reused by every question equals answering each from scratch."""

import numpy as np
import pytest

from tests.tiny_inputs import random_features, random_prompt, windowed_model
from vxl_jax import pipeline
from vxl_jax.compress import schedules
from vxl_jax.infer import Answerer
from vxl_jax.tiny import write_tiny_checkpoint
from vxl_jax.x2l.runner import X2LConfig

MAX_NEW = 6


def test_ask_on_an_encoded_batch_equals_the_whole_prefill_per_question():
    params, cfg = windowed_model(24)
    rng = np.random.default_rng(3)
    prefix = random_prompt(rng, 7, 0)                                  # ends at the placeholder
    videos = [random_features(rng, n, cfg) for n in (50, 31)]          # 3 and 2 windows of 24
    questions = [rng.integers(11, 490, n) for n in (5, 9, 3)]
    asked = [(0, 0), (0, 1), (1, 2), (1, 0)]                           # (video, question): batched, repeated
    sched = schedules.fixed(4)

    prepared = pipeline.prepare(cfg, [prefix] * 2, videos, sched, require_suffix=False)
    memory = pipeline.encode(params, cfg, prepared)
    logits, gen = pipeline.ask(params, cfg, memory, [v for v, _ in asked], [questions[q] for _, q in asked],
                               max_new_tokens=MAX_NEW, return_logits=True)
    before = np.asarray(memory.length)
    for i, (v, q) in enumerate(asked):
        whole = pipeline.prepare(cfg, [np.concatenate([prefix, questions[q]])], [videos[v]], sched,
                                 max_new_tokens=MAX_NEW)
        result, ref = pipeline.run(params, cfg, whole, max_new_tokens=MAX_NEW, return_logits=True)
        np.testing.assert_allclose(np.asarray(logits[i]), np.asarray(result.last_logits[0]), atol=2e-5, rtol=0)
        np.testing.assert_allclose(np.asarray(gen.step_logits[i]), np.asarray(ref.step_logits[0]), atol=2e-5,
                                   rtol=0)
        np.testing.assert_array_equal(np.asarray(gen.tokens[i]), np.asarray(ref.tokens[0]))
        assert int(gen.memory.length[i]) == int(ref.memory.length[0])
    np.testing.assert_array_equal(np.asarray(memory.length), before)   # the encoding is not consumed
    with pytest.raises(ValueError, match="outside the 2 encoded rows"):
        pipeline.ask(params, cfg, memory, [2], [questions[0]], max_new_tokens=2)
    with pytest.raises(ValueError, match="at least one token"):
        pipeline.ask(params, cfg, memory, [0], [questions[0][:0]], max_new_tokens=2)


@pytest.fixture(scope="module")
def answerer(tmp_path_factory):
    root = tmp_path_factory.mktemp("encode_once")
    write_tiny_checkpoint(str(root / "hf"), seed=5)
    return Answerer.load(str(root / "hf"))


def _frames(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 64, 64, 3), dtype=np.uint8)


def test_answerer_reuses_an_encoding_for_many_questions_and_batches_videos(answerer):
    videos = [_frames(1, 13), _frames(2, 9)]
    questions = ["What is red?", "Where does the square go, and when?", "How many?"]
    encoded = answerer.encode_many(videos, ratio=6)
    assert encoded[0].memory is encoded[1].memory and [e.row for e in encoded] == [0, 1]
    pairs = [(encoded[v], q) for v in (0, 1) for q in questions]
    got = answerer.answer(pairs, max_new_tokens=4)
    for (enc, q), answer in zip(pairs, got):
        ref = answerer.ask_frames(videos[enc.row], q, ratio=6, max_new_tokens=4)
        np.testing.assert_array_equal(answer.token_ids, ref.token_ids)
        assert answer.text == ref.text and answer.memory_entries == ref.memory_entries
        assert answer.details == ref.details
    with pytest.raises(ValueError, match="does not start like the encoded"):
        answerer.answer([(encoded[0], "Before <image> after")])


@pytest.mark.slow  # 40 s: the X2L encoding compiles its own programs
def test_answerer_reuses_an_x2l_encoding(answerer):
    frames = _frames(3, 23)
    x2l = X2LConfig(low=2, high=16, k=1, oracle="attention")
    encoded = answerer.encode(frames, x2l=x2l)
    for q in ("What is red?", "How many squares are there in the whole video?"):
        got = answerer.answer([(encoded, q)], max_new_tokens=4)[0]
        ref = answerer.ask_frames(frames, q, x2l=x2l, max_new_tokens=4)
        np.testing.assert_array_equal(got.token_ids, ref.token_ids)
        assert got.details["selected"] == ref.details["selected"]
