"""FastTokenizer (tokenizers + jinja2, no transformers import) == transformers' tokenizer on the same folder."""

import pytest

import qwen2_vocab
from vxl_jax.data import prompts, tiny_tokenizer
from vxl_jax.data.fast_tokenizer import FastTokenizer

TEXTS = ["", "hello", " What color is the first frame?", "\n", "\n\nA. yes\nB. no", "<|im_start|>user\nhi<|im_end|>",
         "视频里发生了什么？", "  leading and trailing  ", "tabs\tand\r\nwindows", "it's 3.14 -- ok!", "<image>\nQ?",
         "<|endoftext|><|im_end|>", "naïve café ß", "emoji 🙂 ok"]
CHATS = [
    [{"role": "user", "content": "<image>\nWhat is in the video?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again?"}],
]


def _folders(tmp_path_factory):
    out = {}
    tiny = tmp_path_factory.mktemp("tiny_tok")
    tiny_tokenizer.save(str(tiny), 512)
    out["tiny"] = str(tiny)
    try:
        out["qwen2"] = qwen2_vocab.make_dir(str(tmp_path_factory.mktemp("qwen2_tok")))
        out["qwen3_package"] = qwen2_vocab.package_files()   # Qwen3's template (tools, reasoning) in its config
    except FileNotFoundError:
        pass
    return out


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return {name: (FastTokenizer.from_dir(d), prompts.load_tokenizer(d, backend="transformers"))
            for name, d in _folders(tmp_path_factory).items()}


def test_same_ids_text_and_special_tokens(pairs):
    assert "tiny" in pairs
    for name, (fast, hf) in pairs.items():
        assert len(fast) == len(hf), name
        for text in TEXTS:
            for special in (True, False):
                assert fast(text, add_special_tokens=special)["input_ids"] == \
                    hf(text, add_special_tokens=special)["input_ids"], (name, text)
            ids = hf(text, add_special_tokens=False)["input_ids"]
            for skip in (True, False):
                assert fast.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip), (name, text)
        for token in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "hello", "no-such-token-xyz"):
            assert fast.convert_tokens_to_ids(token) == hf.convert_tokens_to_ids(token) or (
                fast.convert_tokens_to_ids(token) is None and hf.convert_tokens_to_ids(token) in (None, hf.unk_token_id))
        for attr in ("eos_token", "pad_token", "bos_token", "eos_token_id", "pad_token_id", "bos_token_id"):
            assert getattr(fast, attr) == getattr(hf, attr), (name, attr)


def test_same_chat_template_rendering(pairs):
    for name, (fast, hf) in pairs.items():
        for chat in CHATS:
            for gen in (True, False):
                assert fast.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen) == \
                    hf.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen), (name, chat, gen)


def test_same_training_and_inference_ids(pairs):
    conv = [{"from": "human", "value": "<image>\nWhat is in the video?"}, {"from": "gpt", "value": "A dog."},
            {"from": "human", "value": "And then?"}, {"from": "gpt", "value": "It runs."}]
    for name, (fast, hf) in pairs.items():
        if name == "qwen3_package":
            continue   # its additional special tokens differ from a Qwen2 checkpoint's: not a training folder
        a, b = prompts.encode_conversation(fast, conv), prompts.encode_conversation(hf, conv)
        assert a.input_ids.tolist() == b.input_ids.tolist() and a.labels.tolist() == b.labels.tolist()
        assert prompts.inference_prompt(fast, "Q?").tolist() == prompts.inference_prompt(hf, "Q?").tolist()


def test_load_tokenizer_prefers_the_fast_path_and_falls_back(tmp_path):
    tiny_tokenizer.save(str(tmp_path), 512)
    assert isinstance(prompts.load_tokenizer(str(tmp_path)), FastTokenizer)
    (tmp_path / "tokenizer.json").unlink()
    assert FastTokenizer.from_dir(str(tmp_path)) is None
    with pytest.raises(ValueError, match="backend"):
        prompts.load_tokenizer(str(tmp_path), backend="rust")
