"""lmms-eval's prompts and answer extraction for Video-MME, MLVU (dev), LongVideoBench and LVBench.

Published numbers on these benchmarks come from lmms-eval, so a checkpoint is asked the text lmms-eval sends
and scored on the letter lmms-eval reads, quirks included: these are its rules, not better ones. Read from
lmms-eval at commit 75571cfe0fa3 (v0.7.2 plus 41 commits; there is no v0.7.3 tag; the task files and the shared
extractor are as in v0.7.2 except for dataset paths), `lmms_eval/tasks/{videomme,mlvu,longvideobench,lvbench}`
and `lmms_eval/tasks/_task_utils/mcq_extract.py`. Prompts use each task's `default` kwargs (pre/post prompt),
the set a model with no entry of its own in the task's yaml gets, as a Video-XL-like model does; the text is
what `doc_to_text` returns, before the model's chat template and video token.

Extraction, per task:

- Video-MME, MLVU dev, LVBench: `mcq_letter` (lmms-eval's `extract_mcq_answer`, choices A-D whatever the
  option count): every A-D found in a known shape is a candidate, ranked by shape (first character, last
  character, after an answer phrase, "(B)", "B.", "B:", "B)", "B ") and then by position (later wins); a
  letter anywhere counts only if no shape matched. Case-sensitive: "b" is no answer.
- LongVideoBench: the first A-E anywhere after deleting answer phrases ("The best answer is", ...); with
  none, lmms-eval draws a letter at random, which cannot be replayed, so it is None here.

Before either, lmms-eval's default `--reasoning_tags` removes <think>...</think> and <analysis>...</analysis>
blocks. A letter past the question's options (lmms-eval's answer, never right) is None here.
"""

from __future__ import annotations

import re
from typing import Callable, NamedTuple, Optional, Sequence

from vxl_jax.eval import mcqa

# ---------------------------------------------------------------- reading the response

# lmms-eval's default `--reasoning_tags` (the CLI's, used by every task here).
REASONING_TAGS = (("<think>", "</think>"), ("<analysis>", "</analysis>"))


def strip_reasoning(text: str, tags: Sequence[tuple[str, str]] = REASONING_TAGS) -> str:
    """The response without its reasoning blocks, stripped, as lmms-eval scores it.

    Each closed block goes; a closing tag with no opening one (a template that pre-fills "<think>") leaves
    only what follows the last closing tag; an opening tag never closed stays.
    """
    for start, end in tags:
        while start in text and end in text:
            i = text.find(start)
            j = text.find(end, i)
            if j == -1:   # the only closing tag comes before the opening one
                break
            text = text[:i] + text[j + len(end):]
        if end in text and start not in text:
            text = text.rsplit(end, 1)[-1]
    return text.strip()


# Phrases after which the next A-D is an answer (lmms-eval's list, Korean/Chinese/Japanese included).
ANSWER_PHRASES = (
    "the answer is", "answer is", "the correct answer is", "correct answer is", "the best answer is",
    "best answer is", "the correct option is", "correct option is", "the best option is", "best option is",
    "the choice is", "choice is", "the correct choice is", "correct choice is", "i choose", "i select", "i pick",
    "my answer is", "my choice is", "옵션", "정답은", "답은", "답:", "答案是", "答案为", "选", "答えは")

# Shapes a letter is found in, most trusted first (lmms-eval's ranks).
_FIRST, _LAST, _PHRASE, _FALLBACK = 10, 9, 7, 0
_SHAPES = (("({})", 6), ("{}.", 5), ("{}:", 4), ("{})", 3), ("{} ", 2))
# Stripped from both ends one after the other, in this order (so "B.'" keeps its "." but loses its "'").
_EDGE_PUNCTUATION = (",", ".", "!", "?", ";", ":", "'", '"')


def mcq_letter(response: str, choices: str = "ABCD") -> str:
    """The letter lmms-eval's `extract_mcq_answer` reads from a response, or "" for none."""
    text = response.strip()
    if not text:
        return ""
    for mark in _EDGE_PUNCTUATION:
        text = text.strip(mark)
    text = f" {text} "   # so "B " and " B" shapes match at the ends
    found: list[tuple[int, int, str]] = []   # (rank, position, letter)
    for letter in choices:
        for shape, rank in _SHAPES:
            at = text.rfind(shape.format(letter))
            if at != -1:
                found.append((rank, at, letter))
    lower = text.lower()   # positions found here index `text` (as lmms-eval does)
    for phrase in ANSWER_PHRASES:
        at = lower.find(phrase)
        if at != -1:
            for letter in choices:
                pos = text.find(letter, at + len(phrase))   # anywhere after it, even inside a word
                if pos != -1:
                    found.append((_PHRASE, pos, letter))
    bare = text.strip()
    for letter in choices:   # a first or last character that is not part of a word ("A cat" still counts)
        if bare.startswith(letter) and (len(bare) == 1 or not bare[1].isalpha()):
            found.append((_FIRST, 0, letter))
        if bare.endswith(letter) and (len(bare) == 1 or not bare[-2].isalpha()):
            found.append((_LAST, len(text) - 1, letter))
    if not found:
        found = [(_FALLBACK, text.rfind(letter), letter) for letter in choices if letter in text]
    # Distinct letters never share a (rank, position), so the best is unique.
    return max(found, key=lambda f: f[:2])[2] if found else ""


# Deleted (every occurrence, case-sensitive, in this order) before LongVideoBench looks for a letter.
LVB_PREFIXES = ("The best answer is", "The correct answer is", "The answer is", "The answer",
                "The best option is", "The correct option is", "Best answer:", "Best option:")
_LVB_LETTER = re.compile(r"[ABCDE]")


def lvb_letter(response: str) -> Optional[str]:
    """The letter lmms-eval's LongVideoBench `parse_multi_choice_response` reads: the first capital A-E
    anywhere (inside a word too) once the answer phrases are gone. None where it would guess at random."""
    text = response.strip()
    for prefix in LVB_PREFIXES:
        text = text.replace(prefix, "")
    m = _LVB_LETTER.search(text)
    return m[0] if m else None


def _index(letter: Optional[str], q: mcqa.Question) -> Optional[int]:
    k = mcqa.LETTERS.find(letter) if letter else -1
    return k if 0 <= k < len(q.options) else None


# ---------------------------------------------------------------- per benchmark

def _lettered(options: Sequence[str], shape: str) -> list[str]:
    return [shape.format(letter=mcqa.LETTERS[k], text=text) for k, text in enumerate(options)]


VIDEOMME_PREAMBLE = ("Select the best answer to the following multiple-choice question based on the video and "
                     "the subtitles. Respond with only the letter (A, B, C, or D) of the correct option.")
VIDEOMME_POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."


def videomme_prompt(q: mcqa.Question) -> str:
    """`videomme_doc_to_text`: preamble (it names subtitles even without them), question, the options as the
    annotation spells them ("A. text"), then the post prompt, which starts with its own newline."""
    options = q.raw_options or _lettered(q.options, "{letter}. {text}")
    return "\n".join([VIDEOMME_PREAMBLE, q.question, *options, VIDEOMME_POST_PROMPT])


def videomme_extract(response: str, q: mcqa.Question) -> Optional[int]:
    return _index(mcq_letter(strip_reasoning(response)), q)


MLVU_POST_PROMPT = "\nOnly give the best option.\nBest option: ("


def mlvu_question(q: mcqa.Question) -> str:
    """MLVU dev's question field as lmms-eval has it: verbatim when loaded from that export, else rebuilt from
    the original annotation as the export writes it (question, then a "(A) text" line per option, each
    ending in a newline)."""
    if q.raw_question is not None:
        return q.raw_question
    return q.question + "\n" + "".join(line + "\n" for line in _lettered(q.options, "({letter}) {text}"))


def mlvu_prompt(q: mcqa.Question) -> str:
    """`mlvu_doc_to_text`: the question (options included) then the post prompt ending in an open "(" that the
    model is to close after a letter."""
    return mlvu_question(q) + MLVU_POST_PROMPT


def mlvu_extract(response: str, q: mcqa.Question) -> Optional[int]:
    return _index(mcq_letter(strip_reasoning(response)), q)


LVB_POST_PROMPT = "Answer with the option's letter from the given choices directly.\n"


def longvideobench_prompt(q: mcqa.Question) -> str:
    """`longvideobench_doc_to_text` (the `_v` tasks, no subtitles): question, "A. text" lines, post prompt
    (which ends in a newline)."""
    return "\n".join([q.question, *_lettered(q.options, "{letter}. {text}"), LVB_POST_PROMPT])


def longvideobench_extract(response: str, q: mcqa.Question) -> Optional[int]:
    return _index(lvb_letter(strip_reasoning(response)), q)


# The yaml's default; lvbench's code falls back to the same text with a full stop, which the yaml overrides.
LVBENCH_POST_PROMPT = "\nAnswer the question with the option letter"


def lvbench_prompt(q: mcqa.Question) -> str:
    """`lvbench_doc_to_text`: the question as annotated (its "(A) text" option lines included); an export that
    keeps the options apart gets them appended as such lines; then the post prompt."""
    if q.raw_question is None:
        text = "\n".join([q.question, *_lettered(q.options, "({letter}) {text}")])
    else:
        text = q.raw_question
        if q.raw_options:
            text += "\n" + "\n".join(_lettered(q.raw_options, "({letter}) {text}"))
    return text + LVBENCH_POST_PROMPT


def lvbench_extract(response: str, q: mcqa.Question) -> Optional[int]:
    return _index(mcq_letter(strip_reasoning(response)), q)


class Task(NamedTuple):
    prompt: Callable[[mcqa.Question], str]
    extract: Callable[[str, mcqa.Question], Optional[int]]


TASKS: dict[str, Task] = {
    "videomme": Task(videomme_prompt, videomme_extract),
    "mlvu": Task(mlvu_prompt, mlvu_extract),
    "longvideobench": Task(longvideobench_prompt, longvideobench_extract),
    "lvbench": Task(lvbench_prompt, lvbench_extract),
}

GENERIC = "generic"


def _task(q: mcqa.Question) -> Optional[Task]:
    if q.benchmark == GENERIC:
        return None
    if q.benchmark not in TASKS:
        raise ValueError(f"question {q.id}: no lmms-eval rules for benchmark {q.benchmark!r} "
                         f"(known: {GENERIC}, {', '.join(TASKS)})")
    return TASKS[q.benchmark]


def prompt_for(q: mcqa.Question) -> str:
    """The prompt lmms-eval sends for this question; Video-XL's own form (`mcqa.prompt`) for "generic"."""
    task = _task(q)
    return mcqa.prompt(q.question, q.options) if task is None else task.prompt(q)


def choice_for(q: mcqa.Question, response: str) -> Optional[int]:
    """The option index lmms-eval scores for this response (None: none, or one lmms-eval could not count
    right); `mcqa.parse_choice` for "generic"."""
    task = _task(q)
    return mcqa.parse_choice(response, q.options) if task is None else task.extract(response, q)
