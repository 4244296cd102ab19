"""Multiple-choice video QA: MLVU, Video-MME, LongVideoBench and LVBench annotations, the prompt, answer
parsing, scoring.

Layouts read (detected per file from its first record; a file is a JSON list, or JSON Lines: one record a line):

- MLVU (one JSON list per task, e.g. `json/1_plotQA.json`): records with "video",
  "duration" (seconds), "question", "candidates" (option texts), "answer" (the
  text of the right candidate) and "question_type". Its videos sit in one folder
  per task (`video/1_plotQA/...`), so a video is looked for at `ROOT/video` and
  then at `ROOT/<json file stem>/video`.
- MLVU dev as lmms-eval reads it (`sy1998/MLVU_dev`, exported to JSON): "video_name", "duration",
  "question" (the options already appended as "(A) text" lines), "candidates", "answer" (a letter),
  "task_type", "question_id". The videos sit flat under the root.
- Video-MME flat (the HF release as JSON): one record per question with
  "video_id", "videoID", "duration" (short/medium/long), "domain",
  "sub_category", "task_type", "question_id", "question", "options"
  (["A. text", ...]) and "answer" (a letter). The file is `<videoID>.mp4`.
- Video-MME nested: one record per video with the video fields and a
  "questions" list of {question_id, task_type, question, options, answer}.
- LongVideoBench (`lvb_val.json`, or the HF parquet as JSON): "id", "video_path" (under the
  release's `videos/`), "question", "candidates" (or "option0".."option4", "N/A" padding),
  "correct_choice" (an index), "question_category", "duration" (seconds), "duration_group"
  (15/60/600/3600, what lmms-eval reports by; kept as the named duration). The test file has no
  "correct_choice" and is refused.
- LVBench native (`video_info.meta.jsonl`): one record per video, "key" (the video is `<key>.mp4`),
  "type", "video_info" and a "qa" list of {uid, question (options appended as "(A) text" lines),
  answer (a letter), question_type (a list of abilities), time_reference}.
- LVBench flat (`lmms-lab/LVBench` as JSON): one record per question with those qa fields and
  "video_path" (and, in some exports, the options apart in "options"), or with "candidates" already
  lettered ["(A) text", ...], "answer" one of them (or its letter or text) and "video"; told from MLVU
  by the lettered candidates or the list question_type.

Anything malformed raises `FormatError` naming the file and the record.

The prompt is Video-XL's multiple-choice form: the question, the options as
"(A) text" lines, then an instruction to answer with the option's letter.
`parse_choice` reads the letter back out of free text (or, failing that, an
option's text), so a model that does not follow the instruction exactly is
still scored on what it said, and one that says nothing usable is counted as
unparsed (and wrong) rather than guessed.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import re
import string
import time
from typing import Callable, Optional, Sequence, Union

import numpy as np

from vxl_jax.data import video
from vxl_jax.data.records import JsonLineError, json_lines

LETTERS = string.ascii_uppercase
INSTRUCTION = "Answer with the option's letter from the given choices directly."
VIDEO_EXTENSIONS = (".mp4", ".mkv", ".avi", ".webm", ".mov")

# The response text, or an object with `.text` and `.details` (an `infer.Answer`: its details, e.g. the
# chunks Video-X2L re-loaded, are kept in the record).
AnswerFn = Callable[[np.ndarray, str], object]


def response_of(answer) -> tuple[str, dict]:
    """(text, details) of an answer_fn result."""
    if isinstance(answer, str):
        return answer, {}
    return answer.text, dict(getattr(answer, "details", {}) or {})


class FormatError(ValueError):
    """An annotation file or record that is not one of the layouts read here."""


@dataclasses.dataclass(frozen=True)
class Question:
    id: str
    video: str                          # path relative to the video root
    question: str
    options: tuple[str, ...]            # option texts, without "A." / "(A)" prefixes
    answer_index: int
    task_type: str
    duration: Optional[Union[float, str]] = None   # seconds (MLVU, LVBench) or a group's name (Video-MME
    #                                                short/medium/long, LongVideoBench "15".."3600")
    source: str = ""                    # the annotation file it came from
    # Which benchmark's lmms-eval prompt and answer extraction apply (`lmms_tasks`): "generic", "mlvu",
    # "videomme", "longvideobench" or "lvbench".
    benchmark: str = "generic"
    # The annotation's question verbatim where lmms-eval prompts with it and it is not `question` (MLVU dev
    # and LVBench append the options to it); None: `question` is the annotation's text.
    raw_question: Optional[str] = None
    # The annotation's own option list verbatim, where its prompt needs it (Video-MME's "A. text"; LVBench's
    # separate "options"); empty: none.
    raw_options: tuple[str, ...] = ()
    # Every ability a question tests (LVBench tags several); scored per category as well as per task_type.
    categories: tuple[str, ...] = ()

    def __post_init__(self):
        if not 2 <= len(self.options) <= len(LETTERS):
            raise ValueError(f"question {self.id}: needs 2 to {len(LETTERS)} options, got {len(self.options)}")
        if not 0 <= self.answer_index < len(self.options):
            raise ValueError(f"question {self.id}: answer index {self.answer_index} is not one of the "
                             f"{len(self.options)} options")
        if self.raw_options and len(self.raw_options) != len(self.options):
            raise ValueError(f"question {self.id}: {len(self.raw_options)} raw options for "
                             f"{len(self.options)} options")

    @property
    def answer_letter(self) -> str:
        return LETTERS[self.answer_index]


# ---------------------------------------------------------------- loading

ANNOTATION_EXTENSIONS = (".json", ".jsonl")


def load(path: str) -> list[Question]:
    """Questions of one annotation file, or of every `*.json` / `*.jsonl` in a folder (sorted by name)."""
    if os.path.isdir(path):
        files = sorted(f for ext in ANNOTATION_EXTENSIONS for f in glob.glob(os.path.join(path, "*" + ext)))
        if not files:
            raise FileNotFoundError(f"no *.json (or *.jsonl) annotation files in {path}")
        return [q for f in files for q in load_file(f)]
    return load_file(path)


def _read_records(path: str) -> object:
    """A JSON document, or the list of a JSON Lines file's records (LVBench ships `video_info.meta.jsonl`)."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.lower().endswith(".jsonl"):
        return _json_lines(text, path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        try:   # a .json file holding one record a line
            return _json_lines(text, path)
        except FormatError:
            raise FormatError(f"{path}: not valid JSON ({e})") from None


def _json_lines(text: str, path: str) -> list:
    try:
        return json_lines(text)
    except JsonLineError as e:
        raise FormatError(f"{path}: line {e.line}: not valid JSON ({e.error})") from None


def load_file(path: str) -> list[Question]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"annotation file {path} does not exist")
    data = _read_records(path)
    if not isinstance(data, list):
        raise FormatError(f"{path}: expected a JSON list of records, got a {type(data).__name__}")
    if not data:
        raise FormatError(f"{path}: the list of records is empty")
    layout = detect_layout(data[0], path)
    reader = {"mlvu": _mlvu, "videomme": _videomme, "videomme-nested": _videomme_nested,
              "longvideobench": _longvideobench, "lvbench": _lvbench, "lvbench-nested": _lvbench_nested}[layout]
    questions = []
    for i, record in enumerate(data):
        where = f"{path}: record {i}"
        if not isinstance(record, dict):
            raise FormatError(f"{where}: expected an object, got {type(record).__name__}")
        try:
            questions.extend(reader(record, i, path))
        except FormatError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{where}: {e}") from None
    ids = [q.id for q in questions]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise FormatError(f"{path}: question id {dup!r} appears more than once")
    return questions


def detect_layout(record: object, path: str = "<data>") -> str:
    """'mlvu', 'videomme', 'videomme-nested', 'longvideobench', 'lvbench' or 'lvbench-nested', from the keys
    of a file's first record."""
    if not isinstance(record, dict):
        raise FormatError(f"{path}: record 0: expected an object, got {type(record).__name__}")
    if "questions" in record:
        return "videomme-nested"
    if "qa" in record:
        return "lvbench-nested"
    # LongVideoBench's test file has no correct_choice but, unlike MLVU's, a "video_path".
    if "correct_choice" in record or "option0" in record or ("candidates" in record and "video_path" in record):
        return "longvideobench"
    if "candidates" in record:
        # LVBench's layout with candidates: already lettered "(A) ...", question_type a list; MLVU's are bare texts.
        cands = record["candidates"]
        lettered = isinstance(cands, list) and bool(cands) and "video_name" not in record and all(
            isinstance(c, str) and (m := _OPTION_LINE.match(c.strip())) and m[1] == LETTERS[k]
            for k, c in enumerate(cands))
        return "lvbench" if lettered or isinstance(record.get("question_type"), list) else "mlvu"
    # Before "options": an LVBench export may carry its options apart, but its question_type is a list.
    if "uid" in record or isinstance(record.get("question_type"), list):
        return "lvbench"
    if "options" in record:
        return "videomme"
    raise FormatError(f"{path}: record 0 is neither MLVU (needs 'candidates'), Video-MME (needs 'options' or "
                      f"'questions'), LongVideoBench (needs 'correct_choice') nor LVBench (needs 'qa' or 'uid'); "
                      f"its keys are {sorted(record)}")


def _field(record: dict, key: str, kind: type, where: str):
    if key not in record:
        raise FormatError(f"{where}: missing {key!r} (keys: {sorted(record)})")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise FormatError(f"{where}: {key!r} should be {kind}, got {value!r}")
    return value


def _text_list(record: dict, key: str, where: str) -> list[str]:
    items = _field(record, key, list, where)
    if not all(isinstance(t, str) for t in items):
        raise FormatError(f"{where}: {key!r} should be a list of strings, got {items!r}")
    return items


def _mlvu(record: dict, i: int, path: str) -> list[Question]:
    where = f"{path}: record {i}"
    candidates = _text_list(record, "candidates", where)
    if "answer" not in record:
        raise FormatError(f"{where}: missing 'answer' (MLVU's test set keeps its answers private; "
                          "use the dev set)")
    answer = _field(record, "answer", str, where)
    stem = os.path.splitext(os.path.basename(path))[0]
    if "video_name" in record:   # lmms-eval's MLVU dev: the answer is a letter, the options are in the question
        text = _field(record, "question", str, where)
        task = str(record.get("task_type", record.get("question_type", stem)))
        qid = f"{task}/{record['question_id']}" if "question_id" in record else f"{stem}-{i}"
        return [Question(id=qid, video=_field(record, "video_name", str, where), question=_question_stem(text),
                         options=tuple(candidates), answer_index=_answer_index(answer, len(candidates), where),
                         task_type=task, duration=_duration(record.get("duration"), where), source=path,
                         benchmark="mlvu", raw_question=text)]
    hits = [k for k, c in enumerate(candidates) if c.strip() == answer.strip()]
    if len(hits) != 1:
        why = "is not one of" if not hits else "appears more than once among"
        raise FormatError(f"{where}: the answer {answer!r} {why} the candidates {candidates}")
    return [Question(id=str(record.get("question_id", f"{stem}-{i}")), video=_field(record, "video", str, where),
                     question=_field(record, "question", str, where), options=tuple(candidates),
                     answer_index=hits[0], task_type=str(record.get("question_type", stem)),
                     duration=_duration(record.get("duration"), where), source=path, benchmark="mlvu")]


def _duration(value, where: str) -> Optional[Union[float, str]]:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    raise FormatError(f"{where}: 'duration' should be seconds or a name, got {value!r}")


_OPTION_PREFIX = re.compile(r"^\s*\(?([A-Z])\s*[.):]\s*")
_OPTION_LINE = re.compile(r"^\(([A-Z])\)\s?(.*)$")


def _strip_letters(options: list[str], where: str) -> tuple[str, ...]:
    """"A. text" -> "text"; the letters, when present, must run A, B, C, ... in order."""
    out = []
    for k, option in enumerate(options):
        m = _OPTION_PREFIX.match(option)
        if m and m[1] != LETTERS[k]:
            raise FormatError(f"{where}: option {k} is lettered {m[1]!r}, expected {LETTERS[k]!r}: {options}")
        out.append(option[m.end():].strip() if m else option.strip())
    return tuple(out)


def _embedded_options(text: str) -> tuple[str, list[str]]:
    """("stem", ["x", "y"]) of "stem\\n(A) x\\n(B) y": the trailing run of "(A) ..." lines, lettered in order."""
    lines = text.rstrip("\n").split("\n")
    k = len(lines)
    while k > 0 and _OPTION_LINE.match(lines[k - 1].strip()):
        k -= 1
    found = [_OPTION_LINE.match(line.strip()) for line in lines[k:]]
    # Keep only a run lettered A, B, C, ... from its start (a stray "(C) ..." line above it is question text).
    while found and [m[1] for m in found] != list(LETTERS[:len(found)]):
        found, k = found[1:], k + 1
    return "\n".join(lines[:k]), [m[2].strip() for m in found]


def _question_stem(text: str) -> str:
    return _embedded_options(text)[0]


def _answer_index(answer: str, n: int, where: str) -> int:
    letter = answer.strip().strip("()[]. ").upper()
    if len(letter) != 1 or letter not in LETTERS[:n]:
        raise FormatError(f"{where}: 'answer' should be one of the letters {LETTERS[:n]}, got {answer!r}")
    return LETTERS.index(letter)


def _video_file(record: dict, where: str) -> str:
    name = record.get("videoID", record.get("video_id"))
    if not isinstance(name, str) or not name:
        raise FormatError(f"{where}: needs 'videoID' or 'video_id' naming the video (keys: {sorted(record)})")
    return name if name.lower().endswith(VIDEO_EXTENSIONS) else name + ".mp4"


def _mme_question(q: dict, video_fields: dict, where: str, path: str, fallback_id: str) -> Question:
    raw = _text_list(q, "options", where)
    options = _strip_letters(raw, where)
    return Question(id=str(q.get("question_id", fallback_id)), video=_video_file(video_fields, where),
                    question=_field(q, "question", str, where), options=options,
                    answer_index=_answer_index(_field(q, "answer", str, where), len(options), where),
                    task_type=str(q.get("task_type", video_fields.get("task_type", "all"))),
                    duration=_duration(video_fields.get("duration"), where), source=path, benchmark="videomme",
                    raw_options=tuple(raw))


def _videomme(record: dict, i: int, path: str) -> list[Question]:
    return [_mme_question(record, record, f"{path}: record {i}", path, f"{i}")]


def _videomme_nested(record: dict, i: int, path: str) -> list[Question]:
    where = f"{path}: record {i}"
    questions = _field(record, "questions", list, where)
    out = []
    for j, q in enumerate(questions):
        qwhere = f"{where}, question {j}"
        if not isinstance(q, dict):
            raise FormatError(f"{qwhere}: expected an object, got {type(q).__name__}")
        out.append(_mme_question(q, record, qwhere, path, f"{record.get('video_id', i)}-{j}"))
    return out


LVB_NO_OPTION = "N/A"   # LongVideoBench's parquet pads option0..option4 with it


def _lvb_options(record: dict, where: str) -> list[str]:
    if "candidates" in record:
        return _text_list(record, "candidates", where)
    # lmms-eval prompts with every option0..option4 that is not "N/A", lettered in that order.
    options = []
    for k in range(5):
        value = record.get(f"option{k}", LVB_NO_OPTION)
        if not isinstance(value, str):
            raise FormatError(f"{where}: 'option{k}' should be a string, got {value!r}")
        if value != LVB_NO_OPTION:
            options.append(value)
    return options


def _longvideobench(record: dict, i: int, path: str) -> list[Question]:
    where = f"{path}: record {i}"
    options = _lvb_options(record, where)
    if "correct_choice" not in record:
        raise FormatError(f"{where}: missing 'correct_choice' (LongVideoBench's test set keeps its answers "
                          "private; use the validation set)")
    answer = _field(record, "correct_choice", int, where)
    if not 0 <= answer < len(options):
        raise FormatError(f"{where}: 'correct_choice' {answer} is not one of the {len(options)} options")
    video_name = record.get("video_path")
    if not isinstance(video_name, str) or not video_name:
        video_name = _video_file(record, where)
    # lmms-eval reports by the duration group (15, 60, 600, 3600), so it is the named duration here.
    group = record.get("duration_group")
    if isinstance(group, float) and group.is_integer():
        group = int(group)
    duration = str(group) if isinstance(group, (int, str)) and not isinstance(group, bool) else \
        _duration(record.get("duration"), where)
    return [Question(id=str(record.get("id", f"{i}")), video=video_name,
                     question=_field(record, "question", str, where), options=tuple(options), answer_index=answer,
                     task_type=str(record.get("question_category", "all")), duration=duration, source=path,
                     benchmark="longvideobench")]


def _lvbench_question(qa: dict, video_name: str, duration: Optional[float], where: str, path: str,
                      fallback_id: str) -> Question:
    text = _field(qa, "question", str, where)
    if "options" in qa:          # options apart: lmms-eval appends them to the question as "(A) text" lines
        raw = _text_list(qa, "options", where)
        stem, options = text, [o.strip() for o in raw]
    elif "candidates" in qa:     # lettered candidates "(A) text": the same lines, the letters already on
        cands = _text_list(qa, "candidates", where)
        options = list(_strip_letters(cands, where))
        stem, embedded = _embedded_options(text)
        raw = [] if embedded == options else options    # a question that embeds them already is kept as it is
        stem = stem if embedded == options else text
        answer = _field(qa, "answer", str, where).strip()
        if answer in (c.strip() for c in cands) or answer in options:   # "answer" is one of the candidates
            index = [c.strip() for c in cands].index(answer) if answer in (c.strip() for c in cands) \
                else options.index(answer)
            qa = {**qa, "answer": LETTERS[index]}
    else:
        raw = []
        stem, options = _embedded_options(text)
    kinds = qa.get("question_type", [])
    kinds = [kinds] if isinstance(kinds, str) else kinds
    if not isinstance(kinds, list) or not all(isinstance(k, str) for k in kinds):
        raise FormatError(f"{where}: 'question_type' should be a list of strings, got {kinds!r}")
    if len(options) < 2:
        raise FormatError(f"{where}: the question has no '(A) ...' option lines and no 'options': {text!r}")
    return Question(id=str(qa.get("uid", fallback_id)), video=video_name, question=stem, options=tuple(options),
                    answer_index=_answer_index(_field(qa, "answer", str, where), len(options), where),
                    task_type=", ".join(kinds) or "all", duration=duration, source=path, benchmark="lvbench",
                    raw_question=text, raw_options=tuple(raw), categories=tuple(kinds))


def _lvbench_seconds(record: dict) -> Optional[float]:
    info = record.get("video_info")
    if not isinstance(info, dict):
        return None
    for key, scale in (("duration", 1.0), ("duration_minutes", 60.0)):
        value = info.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value) * scale
    return None


def _lvbench(record: dict, i: int, path: str) -> list[Question]:
    where = f"{path}: record {i}"
    name = record.get("video_path", record.get("video", record.get("key")))
    if not isinstance(name, str) or not name:
        raise FormatError(f"{where}: needs 'video_path', 'video' or 'key' naming the video (keys: {sorted(record)})")
    if "video_path" not in record and not name.lower().endswith(VIDEO_EXTENSIONS):
        name += ".mp4"
    return [_lvbench_question(record, name, _lvbench_seconds(record), where, path, f"{i}")]


def _lvbench_nested(record: dict, i: int, path: str) -> list[Question]:
    where = f"{path}: record {i}"
    key = _field(record, "key", str, where)
    name = key if key.lower().endswith(VIDEO_EXTENSIONS) else key + ".mp4"
    seconds = _lvbench_seconds(record)
    out = []
    for j, qa in enumerate(_field(record, "qa", list, where)):
        qwhere = f"{where}, question {j}"
        if not isinstance(qa, dict):
            raise FormatError(f"{qwhere}: expected an object, got {type(qa).__name__}")
        out.append(_lvbench_question(qa, name, seconds, qwhere, path, f"{key}-{j}"))
    return out


# ---------------------------------------------------------------- prompt and parsing

def prompt(question: str, options: Sequence[str]) -> str:
    """Video-XL's multiple-choice prompt: question, "(A) text" lines, answer-with-a-letter instruction."""
    lines = [f"Question: {question.strip()}", "Options:"]
    lines += [f"({LETTERS[k]}) {text}" for k, text in enumerate(options)]
    return "\n".join(lines + [INSTRUCTION])


# After an answer word: "Answer: B", "The answer is (B) cat", "Best option:(B", "correct choice is b)".
_AFTER_KEYWORD = re.compile(r"\b(?:answer|option|choice)\b(?:\s+(?:is|would be|should be|will be|=))?\s*[:\-]?\s*"
                            r"([\"'(\[]?)\s*([A-Za-z])(?![A-Za-z0-9]|['’][a-z])(\s*[)\]\"'])?", re.IGNORECASE)
_WHOLE = re.compile(r"[(\[]?\s*([A-Za-z])\s*[)\]]?\s*[.:,;!]?")
_LEADING = re.compile(r"([(\[])?\s*([A-Za-z])\s*([)\]]|[.:,](?!\w)|$)")
_BRACKETED = re.compile(r"[(\[]\s*([A-Za-z])\s*[)\]]")
_STANDALONE = re.compile(r"(?<![A-Za-z0-9])([A-Z])(?![A-Za-z0-9]|['’][a-z]|\.[A-Za-z])")
_CLAUSE_END = re.compile(r"\s*(?:[.,;:!?]|$)")


def parse_choice(response: str, options: Sequence[str]) -> Optional[int]:
    """The option a free-text response picks, or None if it names none (or several).

    In order: the whole response is a letter ("B", "(b)", "B."); a letter after
    "answer"/"option"/"choice" ("Answer: B", "The answer is B) cat"); a leading
    lettered option ("B. cat", "(B) cat") unless other bracketed letters follow; exactly one bracketed letter
    anywhere; exactly one standalone capital letter ("I think B."; a capital
    "A"/"I" before a lower-case word is read as the article/pronoun); else
    exactly one option's text (the longest when one option's text contains
    another's). Lower-case letters count only where they cannot be a word:
    alone, bracketed, or at the end of a clause after an answer word. Letters
    past the last option are ignored.
    """
    n = len(options)
    if not 1 <= n <= len(LETTERS):
        raise ValueError(f"parse_choice needs 1 to {len(LETTERS)} options, got {n}")
    text = response.strip()
    if not text:
        return None

    def index(letter: str) -> Optional[int]:
        k = LETTERS.find(letter.upper())
        return k if 0 <= k < n else None

    m = _WHOLE.fullmatch(text)
    if m and index(m[1]) is not None:
        return index(m[1])
    for m in _AFTER_KEYWORD.finditer(text):
        letter, bracketed = m[2], bool(m[1] or m[3])
        if (letter.isupper() or bracketed or _CLAUSE_END.match(text, m.end())) and index(letter) is not None:
            return index(letter)
    m = _LEADING.match(text)
    if m and index(m[2]) is not None and (m[2].isupper() or m[1] or m[3] in (")", "]")):
        others = {index(b[1]) for b in _BRACKETED.finditer(text)} - {index(m[2]), None}
        return None if others else index(m[2])   # "(A) red (B) blue": an echo of the options, not a pick
    for pattern in (_BRACKETED, _STANDALONE):
        found = set()
        for m in pattern.finditer(text):
            if pattern is _STANDALONE and _is_word(m[1], text[m.end():]):
                continue
            if index(m[1]) is not None:
                found.add(index(m[1]))
        if len(found) == 1:
            return found.pop()
        if found:
            return None  # several letters: ambiguous, and the text would not settle it
    return _by_text(text, options)


def _is_word(letter: str, after: str) -> bool:
    """A capital "A" or "I" before a lower-case word is the article or the pronoun ("A cat", "I think"),
    except before a word that joins or states letters ("A and B", "A is right")."""
    if letter not in "AI":
        return False
    m = re.match(r"\s+([a-z]+)", after)
    return bool(m) and not (letter == "A" and m[1] in _LETTER_WORDS)


_LETTER_WORDS = {"and", "or", "nor", "but", "vs", "versus", "is", "was", "seems", "looks", "appears", "because",
                 "since", "then", "would", "should", "could", "might", "must", "will", "fits", "matches"}


def _normalise(text: str) -> str:
    return " ".join(text.lower().split()).strip(" .,;:!?\"'")


def _by_text(response: str, options: Sequence[str]) -> Optional[int]:
    said = _normalise(response)
    hits = {}
    for k, option in enumerate(options):
        o = _normalise(option)
        if o and re.search(r"(?<!\w)" + re.escape(o) + r"(?!\w)", said):
            hits[k] = o
    # "dark red" also contains "red": keep only the hits not inside another hit.
    kept = [k for k, o in hits.items() if not any(o != p and o in p for p in hits.values())]
    return kept[0] if len(kept) == 1 else None


# ---------------------------------------------------------------- scoring

def _tally(pairs: list[tuple[int, Optional[int]]]) -> dict:
    correct = sum(1 for truth, got in pairs if got == truth)
    return {"accuracy": correct / len(pairs) if pairs else None, "correct": correct, "total": len(pairs),
            "unparsed": sum(1 for _, got in pairs if got is None)}


def score(questions: Sequence[Question], predictions: Sequence[Optional[int]]) -> dict:
    """Accuracy overall, per task type, (for named durations, as Video-MME's) per duration and (for questions
    with categories, as LVBench's) per category.

    `predictions[i]` is the option index chosen for `questions[i]`, None when the
    response named none (counted wrong, and in "unparsed").
    """
    if len(questions) != len(predictions):
        raise ValueError(f"{len(questions)} questions but {len(predictions)} predictions")
    pairs = [(q.answer_index, p) for q, p in zip(questions, predictions)]
    summary = _tally(pairs)
    summary["by_task_type"] = {t: _tally([pr for q, pr in zip(questions, pairs) if q.task_type == t])
                               for t in sorted({q.task_type for q in questions})}
    named = sorted({q.duration for q in questions if isinstance(q.duration, str)})
    if named:
        summary["by_duration"] = {d: _tally([pr for q, pr in zip(questions, pairs) if q.duration == d])
                                  for d in named}
    # LVBench tags a question with several abilities and reports each over every question tagged with it.
    categories = sorted({c for q in questions for c in q.categories})
    if categories:
        summary["by_category"] = {c: _tally([pr for q, pr in zip(questions, pairs) if c in q.categories])
                                  for c in categories}
    return summary


# ---------------------------------------------------------------- running

@dataclasses.dataclass(frozen=True)
class Record:
    """One answered question, as written to results.json."""
    id: str
    task_type: str
    video: str
    question: str
    options: tuple[str, ...]
    answer_index: int
    answer: str                  # the right option's letter
    response: str
    choice: Optional[int]        # parsed option index, None if unparsed
    choice_letter: Optional[str]
    correct: bool
    frames: int
    seconds: float               # answer_fn time (the video decode excluded)
    details: dict = dataclasses.field(default_factory=dict)   # the answerer's (windows, X2L selection, sizes)


@dataclasses.dataclass(frozen=True)
class Results:
    records: tuple[Record, ...]
    summary: dict

    def to_json(self) -> dict:
        return {"summary": self.summary, "records": [dataclasses.asdict(r) for r in self.records]}


def resolve_video(question: Question, video_root: str) -> str:
    """ROOT/video, else ROOT/<annotation file stem>/video (MLVU keeps one video folder per task file)."""
    direct = os.path.join(video_root, question.video)
    if os.path.exists(direct) or not question.source:
        return direct
    stem = os.path.splitext(os.path.basename(question.source))[0]
    nested = os.path.join(video_root, stem, question.video)
    return nested if os.path.exists(nested) else direct


def missing_videos(questions: Sequence[Question], video_root: str) -> list[str]:
    """Paths that do not exist, checked before a long run starts rather than hours into it."""
    return sorted({p for p in (resolve_video(q, video_root) for q in questions) if not os.path.isfile(p)})


def _silent(message: str) -> None:
    del message


@dataclasses.dataclass(frozen=True)
class Asker:
    """How a run asks a model: `encode(list of frames) -> handles`, then `answer([(handle, prompt), ...]) ->
    answers` (texts, or objects with `.text` and `.details`). Encoding once per video and asking all its
    questions on the handle is what makes Video-MME's three questions per video cost one prefill."""

    encode: Callable[[Sequence[np.ndarray]], Sequence[object]]
    answer: Callable[[Sequence[tuple[object, str]]], Sequence[object]]

    @classmethod
    def of(cls, answer_fn: AnswerFn) -> "Asker":
        """A plain `answer_fn(frames, prompt)`: every question from scratch."""
        return cls(lambda frames: list(frames), lambda pairs: [answer_fn(f, p) for f, p in pairs])


def run(questions: Sequence[Question], model: Union[AnswerFn, Asker], video_root: str,
        sampling: video.Sampling = video.uniform(32), progress: Callable[[str], None] = _silent, *,
        batch_videos: int = 1) -> Results:
    """Asks every question about its video's sampled frames; one progress line per question.

    Prompt and answer extraction per benchmark are lmms-eval's (`lmms_tasks`; Video-XL's prompt and the
    lenient `parse_choice` for other annotation files). Each video is read and encoded once, and all its questions are asked on that encoding (Video-MME has
    three per video), `batch_videos` videos per encode and their questions in one answer call. A record's
    `seconds` is its share of its batch's encode plus its share of the answer call. A video that cannot be
    read raises `VideoError`.
    """
    from vxl_jax.eval import lmms_tasks   # per benchmark: lmms-eval's prompt and answer extraction

    if batch_videos < 1:
        raise ValueError(f"batch_videos must be >= 1, got {batch_videos}")
    asker = model if isinstance(model, Asker) else Asker.of(model)
    by_video: dict[str, list[int]] = {}
    for i, q in enumerate(questions):
        by_video.setdefault(resolve_video(q, video_root), []).append(i)
    paths = list(by_video)
    records: list[Optional[Record]] = [None] * len(questions)
    done = right = 0
    for start in range(0, len(paths), batch_videos):
        batch = paths[start:start + batch_videos]
        frames = [video.read(path, sampling).frames for path in batch]
        t = time.perf_counter()
        handles = asker.encode(frames)
        encode_s = (time.perf_counter() - t) / len(batch)
        asked = [(b, i) for b, path in enumerate(batch) for i in by_video[path]]
        t = time.perf_counter()
        answers = asker.answer([(handles[b], lmms_tasks.prompt_for(questions[i])) for b, i in asked])
        answer_s = (time.perf_counter() - t) / len(asked)
        for (b, i), answer in zip(asked, answers):
            q = questions[i]
            response, details = response_of(answer)
            seconds = encode_s / len(by_video[batch[b]]) + answer_s
            choice = lmms_tasks.choice_for(q, response)
            correct = choice == q.answer_index
            right += correct
            done += 1
            records[i] = Record(q.id, q.task_type, q.video, q.question, q.options, q.answer_index, q.answer_letter,
                                response, choice, None if choice is None else LETTERS[choice], correct,
                                len(frames[b]), seconds, details)
            got = "unparsed" if choice is None else LETTERS[choice]
            progress(f"[{done}/{len(questions)}] {q.id} ({q.task_type}): {got} (truth {q.answer_letter}) "
                     f"{'right' if correct else 'wrong'}; {right}/{done} right so far; "
                     f"response {response.strip()[:60]!r}")
        progress(f"videos {start + 1}-{start + len(batch)} of {len(paths)}: encoded in {encode_s * len(batch):.2f} s, "
                 f"{len(asked)} questions answered in {answer_s * len(asked):.2f} s")
    return Results(tuple(records), score(questions, [r.choice for r in records]))
