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
  A user turn with `<image>` is built as the original's training data path
  builds it (`preprocess_multimodal` then `preprocess_qwen`): a lone
  placeholder is moved to the front on its own line, the placeholders are
  followed by a newline token of their own and then by the tokens of the text
  after them, so `<image>\nQuestion` gives `-200, "\n", "\n", Question`: two
  newlines where the inference prompt has one (a quirk of the original that
  training copies by default, README "Quirks"). `placeholder_newline="single"`
  tokenizes the text as written instead, as the inference prompt does.

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
PlaceholderNewline = Literal["double", "single"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json")


class PromptError(ValueError):
    """A conversation that cannot become a training example (the reason says why)."""


_LOAD_LOCK = threading.Lock()  # transformers' lazy imports and logging switches are not thread-safe


def load_tokenizer(checkpoint_dir: str, *, backend: Literal["auto", "transformers"] = "auto"):
    """The tokenizer saved with a checkpoint (HF or converted JAX dir); a clear error when there is none.

    "auto": with a tokenizer.json, `fast_tokenizer.FastTokenizer` (the same ids without importing
    transformers, ~0.65 s less per process); otherwise, or with "transformers", transformers' own class.
    """
    if not any(os.path.isfile(os.path.join(checkpoint_dir, f)) for f in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"checkpoint {checkpoint_dir} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the "
            "tokenizer files of the model (e.g. Qwen2-7B-Instruct's) into it, or make a tiny model with "
            "`vxl tiny-model`, which writes one")
    if backend not in ("auto", "transformers"):
        raise ValueError(f"backend is 'auto' or 'transformers', got {backend!r}")
    if backend == "auto":
        from vxl_jax.data.fast_tokenizer import FastTokenizer
        fast = FastTokenizer.from_dir(checkpoint_dir)
        if fast is not None:
            return fast
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
    reply: Optional[np.ndarray] = None  # bool [T]: the tokens of the assistant replies' text

    def truncated(self, length: int) -> "Encoded":
        """The first `length` tokens (the original cuts its batches to the tokenizer's model_max_length)."""
        reply = None if self.reply is None else self.reply[:length]
        return Encoded(self.input_ids[:length], self.labels[:length], reply)

    @property
    def num_images(self) -> int:
        return int((self.input_ids == IMAGE_TOKEN_INDEX).sum())


def _user_text(tokenizer, text: str, nl: list[int], placeholder_newline: PlaceholderNewline) -> list[int]:
    """Ids of a user turn's text (see the module docstring for the two rules)."""
    n = text.count(IMAGE_TOKEN)
    if placeholder_newline == "single" or n == 0:
        return _with_placeholders(tokenizer, text)
    if n == 1 and not text.startswith(IMAGE_TOKEN):
        text = (IMAGE_TOKEN + "\n" + text.replace(IMAGE_TOKEN, "").strip()).strip()  # moved to the front
    lead = IMAGE_TOKEN * n
    if not text.startswith(lead):
        # Placeholders between pieces of text (interleaved images): the original cuts len(lead) characters
        # off the text whatever they are; the text is kept as written here instead.
        return _with_placeholders(tokenizer, text)
    return [IMAGE_TOKEN_INDEX] * n + nl + _tok(tokenizer, text[len(lead):])


def encode_conversation(tokenizer, conversations: Sequence[dict], *, system: str = SYSTEM_MESSAGE,
                        label_mode: LabelMode = "original", chat: Optional[ChatTokens] = None,
                        placeholder_newline: PlaceholderNewline = "double") -> Encoded:
    """A LLaVA conversation -> ids and labels, turn by turn as the original's Qwen preprocessing.

    placeholder_newline: "double" (default) builds user turns with `<image>` as
    the original's training preprocessing does (a newline token after the
    placeholders, then the text after them, which usually starts with its own
    newline); "single": the text as written, as the inference prompt.
    """
    if label_mode not in ("original", "answer_only"):
        raise ValueError(f"label_mode is 'original' or 'answer_only', got {label_mode!r}")
    if placeholder_newline not in ("double", "single"):
        raise ValueError(f"placeholder_newline is 'double' or 'single', got {placeholder_newline!r}")
    chat = chat or ChatTokens.of(tokenizer)
    turns = list(conversations)
    if turns and ROLES.get(turns[0].get("from")) != "user":
        turns = turns[1:]  # the original drops a leading non-human turn
    if not turns:
        raise PromptError("the conversation has no turns")
    nl = list(chat.newline)
    ids, labels, reply_mask = [], [], []

    def add(piece_ids: list[int], piece_labels: list[int], reply_tokens: int = 0) -> None:
        ids.extend(piece_ids)
        labels.extend(piece_labels)
        start = len(piece_ids) - reply_tokens - 1 - len(nl)  # a reply is followed by <|im_end|> and the newline
        reply_mask.extend(start <= i < start + reply_tokens for i in range(len(piece_ids)))

    system_ids = [chat.im_start] + _tok(tokenizer, "system") + nl + _tok(tokenizer, system) + [chat.im_end] + nl
    add(system_ids, _frame(chat, len(system_ids), nl, label_mode))
    for turn in turns:
        role = ROLES.get(turn.get("from"))
        if role is None:
            raise PromptError(f"unknown speaker {turn.get('from')!r} (expected one of {sorted(ROLES)})")
        value = turn.get("value")
        header = [chat.im_start] + _tok(tokenizer, role) + nl
        if role == "user":
            body = _user_text(tokenizer, value or "", nl, placeholder_newline)
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
            add(turn_ids, turn_labels, len(reply))
    return Encoded(np.asarray(ids, np.int64), np.asarray(labels, np.int64), np.asarray(reply_mask, bool))


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
