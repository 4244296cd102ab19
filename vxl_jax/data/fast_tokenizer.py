"""A tokenizer folder read with the `tokenizers` library and jinja2 alone, without importing transformers.

Importing transformers and building its tokenizer costs ~0.65 s of every `vxl
infer` process (a fifth of a warm run on the tiny model). The ids come from
`tokenizer.json` in both cases (the Rust `tokenizers` library does the work
behind transformers' fast tokenizers), so this class offers the part of the HF
tokenizer API the project uses, with the same results:

  * `tok(text, add_special_tokens=...)["input_ids"]`, `convert_tokens_to_ids`,
    `decode(ids, skip_special_tokens=...)` (with `clean_up_tokenization_spaces`
    as the config says), `len(tok)`, the special tokens and their ids;
  * `apply_chat_template(messages, tokenize=False, add_generation_prompt=...)`:
    the checkpoint's template (`chat_template.jinja`, or `chat_template` in
    tokenizer_config.json) rendered in a sandboxed jinja2 environment set up as
    transformers sets up its own (trim_blocks, lstrip_blocks, loop controls,
    `raise_exception`, `strftime_now`, a JSON `tojson`), with the special tokens
    as template variables.

`tests/test_fast_tokenizer.py` checks it against transformers'
`PreTrainedTokenizerFast` on the tiny tokenizer and the real Qwen2 vocabulary.
A folder without tokenizer.json is not handled here (`from_dir` returns None).
"""

from __future__ import annotations

import datetime
import json
import os
from typing import Any, Optional, Sequence

_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")


def _content(value: Any) -> Optional[str]:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization` (only when the config asks for it)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _chat_template(folder: str, config: dict) -> Optional[str]:
    path = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            return f.read()
    template = config.get("chat_template") or _read_json(os.path.join(folder, "chat_template.json")).get(
        "chat_template")
    if isinstance(template, list):  # named templates: transformers picks "default"
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


class FastTokenizer:
    """The HF tokenizer API subset the project uses, on `tokenizers.Tokenizer` (see the module docstring)."""

    def __init__(self, tokenizer, config: dict, chat_template: Optional[str] = None):
        self._tok = tokenizer
        self.chat_template = chat_template
        self.clean_up_tokenization_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self._special = {name: _content(config.get(name)) for name in _SPECIAL}
        extra = config.get("additional_special_tokens") or config.get("extra_special_tokens") or []
        self.additional_special_tokens = [t for t in (_content(v) for v in extra) if t]
        self._template = None

    @classmethod
    def from_dir(cls, folder: str) -> Optional["FastTokenizer"]:
        """The folder's tokenizer, or None when it has no tokenizer.json (use transformers then)."""
        path = os.path.join(folder, "tokenizer.json")
        if not os.path.isfile(path):
            return None
        import tokenizers

        config = _read_json(os.path.join(folder, "tokenizer_config.json"))
        for name, value in _read_json(os.path.join(folder, "special_tokens_map.json")).items():
            config.setdefault(name, value)
        tok = tokenizers.Tokenizer.from_file(path)
        # Special tokens named in the config but missing from tokenizer.json's added tokens (transformers adds them).
        added = {t.content for t in tok.get_added_tokens_decoder().values()}
        decoder = config.get("added_tokens_decoder") or {}
        missing = [v for v in decoder.values() if isinstance(v, dict) and v.get("content") not in added]
        if missing:
            tok.add_special_tokens([tokenizers.AddedToken(
                v["content"], single_word=v.get("single_word", False), lstrip=v.get("lstrip", False),
                rstrip=v.get("rstrip", False), normalized=v.get("normalized", False),
                special=v.get("special", True)) for v in missing])
        return cls(tok, config, _chat_template(folder, config))

    # ------------------------------------------------------------------ ids

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict:
        return {"input_ids": self._tok.encode(text, add_special_tokens=add_special_tokens).ids}

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def convert_tokens_to_ids(self, token: str) -> Optional[int]:
        return self._tok.token_to_id(token)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        text = self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self.clean_up_tokenization_spaces else text

    def __getattr__(self, name: str):
        # bos_token / eos_token / ... and their *_id
        special = self.__dict__.get("_special", {})
        if name in special:
            return special[name]
        if name.endswith("_id") and name[:-3] in special:
            token = special[name[:-3]]
            return None if token is None else self._tok.token_to_id(token)
        raise AttributeError(name)

    @property
    def special_tokens_map(self) -> dict:
        out = {k: v for k, v in self._special.items() if v is not None}
        if self.additional_special_tokens:
            out["additional_special_tokens"] = list(self.additional_special_tokens)
        return out

    # ------------------------------------------------------------------ chat template

    def apply_chat_template(self, messages: Sequence[dict], *, tokenize: bool = False,
                            add_generation_prompt: bool = False, **kwargs):
        if self.chat_template is None:
            raise ValueError("the tokenizer has no chat template (chat_template.jinja or tokenizer_config.json)")
        if self._template is None:
            self._template = _compile(self.chat_template)
        text = self._template.render(messages=[dict(m) for m in messages], tools=None, documents=None,
                                     add_generation_prompt=add_generation_prompt,
                                     **{**self.special_tokens_map, **kwargs})
        return self(text, add_special_tokens=False)["input_ids"] if tokenize else text


def _compile(template: str):
    """The template in a sandbox set up as transformers sets up its own (see the module docstring)."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env.from_string(template)
