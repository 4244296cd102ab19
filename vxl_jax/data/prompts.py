"""Prompts and labels in the Qwen chat format, with `<image>` as the video placeholder.

Token ids carry the placeholder as `IMAGE_TOKEN_INDEX` (-200); the model
expands it into the video's visual tokens (`videoxl.split_prompt`).

- `inference_prompt`: a question -> the ids of `[system][user: <image>\\n
  question][assistant header]`, rendered by the checkpoint's own chat template.
- `encode_conversation`: a LLaVA conversation (`[{"from": "human" | "gpt",
  "value": ...}, ...]`) -> ids and labels. The labels are by default exactly
  the original's Qwen preprocessing (TRAIN_FORMAT.md section 2): every turn's
  opening `<|im_start|>` and closing `<|im_end|>` + newline are labelled, as are
  the assistant replies; the role words, system text and user text are -100.
  `label_mode="answer_only"` labels only the replies and their `<|im_end|>`.

Each piece (role word, text between placeholders, reply) is tokenized on its
own, as the original does, so the ids match it token for token; a test checks
that the pieces concatenate to the chat template's text.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Literal, Optional, Sequence

import numpy as np

from vxl_jax.model.videoxl import IMAGE_TOKEN_INDEX

IGNORE_INDEX = -100
IMAGE_TOKEN = "<image>"
SYSTEM_MESSAGE = "You are a helpful assistant."  # the original's qwen_1_5 conversation template
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
LabelMode = Literal["original", "answer_only"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


class PromptError(ValueError):
    """A conversation that cannot become a training example (the reason says why)."""


_LOAD_LOCK = threading.Lock()  # transformers' lazy imports and logging switches are not thread-safe


def load_tokenizer(checkpoint_dir: str):
    """The HF tokenizer saved with a checkpoint (HF or converted JAX dir); a clear error when there is none."""
    if not any(os.path.isfile(os.path.join(checkpoint_dir, f)) for f in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"checkpoint {checkpoint_dir} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the "
            "tokenizer files of the model (e.g. Qwen2-7B-Instruct's) into it, or make a tiny model with "
            "`vxl tiny-model`, which writes one")
    import warnings

    with _LOAD_LOCK:
        from transformers.utils import logging as hf_logging
        # AutoTokenizer also reads config.json, whose `llava_qwen` type transformers does not know: it only warns.
        verbosity = hf_logging.get_verbosity()
        hf_logging.set_verbosity_error()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                if os.path.isfile(os.path.join(checkpoint_dir, "tokenizer.json")):
                    # The fast tokenizer straight from tokenizer.json (+ tokenizer_config.json: special tokens, chat
                    # template): the same ids as AutoTokenizer's Qwen2 class, without AutoTokenizer's config
                    # machinery, which imports torch (~1.8 s of every `vxl infer` process).
                    from transformers import PreTrainedTokenizerFast
                    return PreTrainedTokenizerFast.from_pretrained(checkpoint_dir, local_files_only=True)
                from transformers import AutoTokenizer
                return AutoTokenizer.from_pretrained(checkpoint_dir, local_files_only=True)
        finally:
            hf_logging.set_verbosity(verbosity)


@dataclasses.dataclass(frozen=True)
class ChatTokens:
    """The ids the Qwen format is built from (found by name, never assumed)."""
    im_start: int
    im_end: int
    newline: tuple[int, ...]

    @classmethod
    def of(cls, tokenizer) -> "ChatTokens":
        ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_start|>", "<|im_end|>")]
        unk = getattr(tokenizer, "unk_token_id", None)
        if any(i is None or i == unk for i in ids):
            raise ValueError("the tokenizer has no <|im_start|> / <|im_end|> tokens: not a Qwen chat tokenizer")
        return cls(ids[0], ids[1], tuple(_tok(tokenizer, "\n")))


def _tok(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []


def _with_placeholders(tokenizer, text: str) -> list[int]:
    """Tokenizes the text between `<image>`s separately, -200 in between (the original's rule)."""
    ids: list[int] = []
    for i, piece in enumerate(text.split(IMAGE_TOKEN)):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        ids += _tok(tokenizer, piece)
    return ids


def inference_prompt(tokenizer, question: str, *, system: Optional[str] = SYSTEM_MESSAGE,
                     with_video: bool = True) -> np.ndarray:
    """Ids of a one-question chat ending with the assistant header; `<image>\\n` leads the question
    unless it already holds the placeholder."""
    if with_video and IMAGE_TOKEN not in question:
        question = f"{IMAGE_TOKEN}\n{question}"
    messages = ([{"role": "system", "content": system}] if system is not None else [])
    messages.append({"role": "user", "content": question})
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return np.asarray(_with_placeholders(tokenizer, text), np.int64)


@dataclasses.dataclass(frozen=True)
class Encoded:
    input_ids: np.ndarray   # int64 [T], -200 at each placeholder
    labels: np.ndarray      # int64 [T], IGNORE_INDEX where there is no target (aligned, not shifted)

    @property
    def num_images(self) -> int:
        return int((self.input_ids == IMAGE_TOKEN_INDEX).sum())


def encode_conversation(tokenizer, conversations: Sequence[dict], *, system: str = SYSTEM_MESSAGE,
                        label_mode: LabelMode = "original", chat: Optional[ChatTokens] = None) -> Encoded:
    """A LLaVA conversation -> ids and labels, turn by turn as the original's Qwen preprocessing."""
    if label_mode not in ("original", "answer_only"):
        raise ValueError(f"label_mode is 'original' or 'answer_only', got {label_mode!r}")
    chat = chat or ChatTokens.of(tokenizer)
    turns = list(conversations)
    if turns and ROLES.get(turns[0].get("from")) != "user":
        turns = turns[1:]  # the original drops a leading non-human turn
    if not turns:
        raise PromptError("the conversation has no turns")
    nl = list(chat.newline)
    ids, labels = [], []

    def add(piece_ids: list[int], piece_labels: list[int]) -> None:
        ids.extend(piece_ids)
        labels.extend(piece_labels)

    system_ids = [chat.im_start] + _tok(tokenizer, "system") + nl + _tok(tokenizer, system) + [chat.im_end] + nl
    add(system_ids, _frame(chat, len(system_ids), nl, label_mode))
    for turn in turns:
        role = ROLES.get(turn.get("from"))
        if role is None:
            raise PromptError(f"unknown speaker {turn.get('from')!r} (expected one of {sorted(ROLES)})")
        value = turn.get("value")
        header = [chat.im_start] + _tok(tokenizer, role) + nl
        if role == "user":
            body = _with_placeholders(tokenizer, value or "")
            turn_ids = header + body + [chat.im_end] + nl
            add(turn_ids, _frame(chat, len(turn_ids), nl, label_mode))
        else:
            if value is not None and IMAGE_TOKEN in value:
                raise PromptError("a reply holds the <image> placeholder")
            reply = _tok(tokenizer, value or "")
            turn_ids = header + reply + [chat.im_end] + nl
            if label_mode == "original":
                turn_labels = [chat.im_start] + [IGNORE_INDEX] * (len(header) - 1) + reply + [chat.im_end] + nl
            else:
                turn_labels = [IGNORE_INDEX] * len(header) + reply + [chat.im_end] + [IGNORE_INDEX] * len(nl)
            add(turn_ids, turn_labels)
    return Encoded(np.asarray(ids, np.int64), np.asarray(labels, np.int64))


def _frame(chat: ChatTokens, n: int, nl: list[int], label_mode: LabelMode) -> list[int]:
    """Labels of a system/user turn: only its `<|im_start|>` and closing `<|im_end|>\\n` (original mode)."""
    if label_mode == "answer_only":
        return [IGNORE_INDEX] * n
    return [chat.im_start] + [IGNORE_INDEX] * (n - 2 - len(nl)) + [chat.im_end] + nl


def as_text(tokenizer, ids: np.ndarray) -> str:
    """Decodes ids with each -200 shown as `<image>` (to compare with the chat template's text)."""
    out, run = [], []
    for i in np.asarray(ids).tolist():
        if i == IMAGE_TOKEN_INDEX:
            out.append(tokenizer.decode(run, skip_special_tokens=False) + IMAGE_TOKEN)
            run = []
        else:
            run.append(i)
    return "".join(out) + tokenizer.decode(run, skip_special_tokens=False)
