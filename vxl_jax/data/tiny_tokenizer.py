"""A small byte-level BPE tokenizer with Qwen2's special tokens, for the tiny models.

Tiny checkpoints have a 512-row vocabulary, so the real Qwen2 tokenizer (151k
ids) cannot drive them. This one is trained offline, deterministically, on an
embedded corpus, and speaks the same chat format: `<|im_start|>`,
`<|im_end|>`, `<|endoftext|>` and a Qwen2-Instruct chat template. Its ids sit
where the fixtures' tiny checkpoint puts them for a vocabulary of V rows:
BPE tokens 0..V-13, `<|im_start|>` V-12, `<|im_end|>` V-11, `<|endoftext|>`
V-2 (the tiny config's eos, 510 for V = 512); the other top ids are reserved.
"""

from __future__ import annotations

import functools

IM_START, IM_END, END_OF_TEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"

# Qwen2-Instruct's format: a default system message, then `<|im_start|>role\ncontent<|im_end|>\n` per turn.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

_WORDS = """
the a an of in on at to and or is are was were be been what which who where when why how many much
video frame frames scene scenes camera person people man woman child dog cat car ball table room
street house tree sky water red green blue yellow white black small large moving moves left right
up down first last before after during while then there here this that these those it they he she
describe summarize answer question option options choose correct best show shows shown happen happens
happened beginning end middle minute minutes second seconds hour long short time times count number
color colour shape square circle object objects holding holds walking runs running sitting stands
you are helpful assistant please the image picture clip watch look see seen does do did not yes no
one two three four five six seven eight nine ten A B C D
""".split()


def _corpus() -> list[str]:
    # Sentences built from the word list in a fixed order: same corpus, same merges, every time.
    lines = []
    for i in range(len(_WORDS)):
        words = [_WORDS[(i * 7 + k * 13) % len(_WORDS)] for k in range(12)]
        lines.append(" ".join(words).capitalize() + ("?" if i % 3 == 0 else "."))
        lines.append("\n".join(words[:4]) + "\n")
    return lines + [" ".join(_WORDS), "0123456789 .,:;!?()[]{}'\"-_/<>\n\n"]


@functools.lru_cache(maxsize=4)
def _trained(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    if not 300 <= vocab_size <= 65536:
        raise ValueError(f"the tiny tokenizer is for vocabularies of 300 (256 bytes + specials) to 65536 ids, "
                         f"got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - 12, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=[], show_progress=False)
    tok.train_from_iterator(_corpus(), trainer=trainer)
    # The corpus runs out of merges at ~750 ids: larger vocabularies get unused filler ids before the specials.
    fillers = [f"<|unused_{k}|>" for k in range(vocab_size - 12 - tok.get_vocab_size())]
    specials = fillers + [IM_START, IM_END] + [f"<|reserved_{k}|>" for k in range(8)] + [END_OF_TEXT, "<|reserved_8|>"]
    tok.add_special_tokens(specials)
    return tok.to_str()


def build(vocab_size: int = 512):
    """A transformers fast tokenizer with `vocab_size` ids and the Qwen2 chat format."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_trained(vocab_size)),
                                  eos_token=IM_END, pad_token=END_OF_TEXT, clean_up_tokenization_spaces=False)
    tok.chat_template = CHAT_TEMPLATE
    assert tok.convert_tokens_to_ids(IM_START) == vocab_size - 12 and tok.convert_tokens_to_ids(END_OF_TEXT) == vocab_size - 2
    return tok


def save(out_dir: str, vocab_size: int = 512) -> None:
    """Writes the tokenizer files (tokenizer.json, tokenizer_config.json, chat template) into out_dir."""
    build(vocab_size).save_pretrained(out_dir)
