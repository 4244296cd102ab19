"""A tiny synthetic video question-answering dataset, for training a tiny model on CPU.

Two layouts. "two_colours" (the default): each video shows a solid background
of colour A for its first half of frames and colour B (!= A) for the second
half, with one filled shape (a square or a circle, of a colour C that is
neither A nor B) near the centre, jittered a little per frame. Each video
gives up to three records, one per question:

    "What color is the first frame?"  -> A        "What color is the last frame?" -> B
    "What shape is in the video?"     -> "square" or "circle"

"colour_then_grey" (what `vxl demo` trains on): the first half of the frames
is colour A filling the whole frame, the second half a grey background with
the shape in a colour C != A; its questions are "first" (-> A) and "shape"
(the last frame is grey: no "last" question).

Why these questions: no answer can be guessed from the question alone (every
answer is drawn at random per video), so a falling loss means the model reads
the video. The first-frame question is the point of the dataset: Video-XL
compresses each window of frames into a few summary tokens and drops the raw
visual tokens, so early frames reach the answer only through that compressed
memory. The last-frame question contrasts with it (recent frames), and the
shape question needs spatial detail rather than a mean colour. All words are
in the tiny tokenizer's corpus, so prompts and answers are a handful of ids.

What a tiny model learns in a few hundred CPU steps: the colour that fills the
first frames, on videos it never saw. Telling the first frame's colour from
the last one's (two full-frame colours, an order to read from positions) and
square from circle stay near chance at that budget, so the demo asks
`questions=("first",)` on the "colour_then_grey" layout, where the later
frames hold only a distractor: a small shape of another colour.

    train_jsonl = generate("data/synth", SyntheticSpec(num_records=96))

writes `videos/*.mp4`, `train.jsonl`, `eval.jsonl` (held-out records on other
videos), `tokenizer/` and, last, `spec.json`; paths in the records are
relative to the output folder, which is the loader's `media_root`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os

import numpy as np

from vxl_jax.data import tiny_tokenizer, video

# Far apart in RGB, so H.264's colour error never makes one look like another.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 25), "green": (25, 200, 25), "blue": (25, 25, 230),
    "yellow": (235, 235, 25), "white": (245, 245, 245), "black": (10, 10, 10),
}
GREY = (128, 128, 128)  # the "colour_then_grey" layout's later frames: no answer, far from every PALETTE colour
SHAPES = ("square", "circle")
QUESTIONS = {
    "first": "What color is the first frame?",
    "last": "What color is the last frame?",
    "shape": "What shape is in the video?",
}
LAYOUTS = ("two_colours", "colour_then_grey")
# Bumped when the generated content changes, so an old folder is not taken for a new one.
FORMAT_VERSION = 1
_SPLITS = {"train": 0, "eval": 1}


@dataclasses.dataclass(frozen=True)
class SyntheticSpec:
    num_records: int = 96        # training records
    num_eval: int = 8            # held-out records (eval.jsonl), different videos
    frames: int = 8              # frames per video
    size: int = 128              # square frame side in pixels (decord needs widths like 64/128/224; NOT 48)
    fps: int = 4
    seed: int = 0
    vocab_size: int = 512        # size of the tiny tokenizer written beside the data
    layout: str = "two_colours"  # or "colour_then_grey" (module docstring)
    questions: tuple[str, ...] = tuple(QUESTIONS)  # the kinds asked of each video, keys of QUESTIONS

    def __post_init__(self):
        if self.num_records < 1 or self.num_eval < 0:
            raise ValueError(f"num_records >= 1 and num_eval >= 0, got {self.num_records}, {self.num_eval}")
        if self.frames < 2:
            raise ValueError(f"a video needs >= 2 frames (one per background colour), got {self.frames}")
        # yuv420p needs even sides; below 32 px the shape and the corners the background shows in overlap.
        if self.size < 32 or self.size % 2:
            raise ValueError(f"size must be even and >= 32, got {self.size}")
        if self.fps < 1:
            raise ValueError(f"fps must be >= 1, got {self.fps}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout is one of {list(LAYOUTS)}, got {self.layout!r}")
        object.__setattr__(self, "questions", tuple(self.questions))  # a list from a JSON config
        allowed = [q for q in QUESTIONS if not (q == "last" and self.layout == "colour_then_grey")]
        if not self.questions or len(set(self.questions)) < len(self.questions) or set(self.questions) - set(allowed):
            raise ValueError(f"questions are distinct kinds of {allowed} for layout {self.layout!r}, "
                             f"got {list(self.questions)}")


_LATER_FIELDS = ("layout", "questions")


def generate(out_dir: str, spec: SyntheticSpec = SyntheticSpec(), *, progress: bool = False) -> str:
    """Writes out_dir/{videos/*.mp4, train.jsonl, eval.jsonl, tokenizer/, spec.json}; returns the train.jsonl path.

    Idempotent: if out_dir/spec.json exists and equals `spec`, returns at once without rewriting;
    if it exists with a different spec, raises ValueError naming both (nothing is silently overwritten).
    A folder without spec.json (an interrupted run) is written again from scratch.
    """
    train_path, spec_path = os.path.join(out_dir, "train.jsonl"), os.path.join(out_dir, "spec.json")
    wanted = {**dataclasses.asdict(spec), "format": FORMAT_VERSION}
    for name in _LATER_FIELDS:  # left out at their defaults: folders written before these fields still match
        if wanted[name] == getattr(SyntheticSpec, name):
            del wanted[name]
    wanted = json.loads(json.dumps(wanted))  # tuples as lists, as read back
    if os.path.exists(spec_path):
        with open(spec_path) as f:
            found = json.load(f)
        if found != wanted:
            raise ValueError(f"{out_dir} already holds a synthetic dataset made with {found}, not the requested "
                             f"{wanted}; use another folder or delete this one")
        return train_path

    from tqdm.auto import tqdm

    os.makedirs(os.path.join(out_dir, "videos"), exist_ok=True)
    plans = {split: _plan(spec, split, n) for split, n in (("train", spec.num_records), ("eval", spec.num_eval))}
    total = sum(len(p) for p in plans.values())
    width = max(3, len(str(total - 1)))
    bar = tqdm(total=total, desc=f"synthetic videos -> {out_dir}", unit="video", disable=not progress)
    number, checked = 0, False
    for split, plan in plans.items():
        rows = []
        for k, (content, questions) in enumerate(plan):
            rel = f"videos/{number:0{width}d}.mp4"
            path = video.write_test_video(os.path.join(out_dir, rel), _render(spec, content), spec.fps)
            if not checked:  # decord fails on some sizes (16, 24, 48, 72 px): say so now, not at training time
                _check_readable(path, spec)
                checked = True
            for q in questions:
                answer = _answer(content, q)
                rows.append({"id": f"{split}-{k:0{width}d}-{q}", "video": rel,
                             "conversations": [{"from": "human", "value": f"<image>\n{QUESTIONS[q]}"},
                                               {"from": "gpt", "value": answer}],
                             "answer": answer, "question_type": q})
            number += 1
            bar.update()
        _write_atomic(os.path.join(out_dir, f"{split}.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    bar.close()
    tiny_tokenizer.save(os.path.join(out_dir, "tokenizer"), spec.vocab_size)
    # Last, and atomically: its presence is what marks the folder as complete.
    _write_atomic(spec_path, json.dumps(wanted, indent=2) + "\n")
    return train_path


@dataclasses.dataclass(frozen=True)
class _Content:
    first: str                    # background colour of the first half
    last: str                     # background colour of the second half
    shape_colour: str
    shape: str
    jitter: tuple[tuple[int, int], ...]   # (dy, dx) of the shape per frame


def _plan(spec: SyntheticSpec, split: str, num_records: int) -> list[tuple[_Content, list[str]]]:
    """(content, question kinds) per video: every question of a video but maybe the last video's."""
    colours, names = list(PALETTE), list(spec.questions)
    plan, left = [], num_records
    for i in range(math.ceil(num_records / len(names))):
        # One generator per video, so a video does not change when the record counts do.
        rng = np.random.default_rng((spec.seed, _SPLITS[split], i))
        first, last, shape_colour = (colours[j] for j in rng.choice(len(colours), 3, replace=False))
        j = max(1, spec.size // 16)
        jitter = tuple(map(tuple, rng.integers(-j, j + 1, size=(spec.frames, 2)).tolist()))
        if spec.layout == "colour_then_grey":
            last = "grey"
        content = _Content(first, last, shape_colour, SHAPES[rng.integers(len(SHAPES))], jitter)
        questions = [names[q] for q in rng.permutation(len(names))[:min(left, len(names))]]
        plan.append((content, questions))
        left -= len(questions)
    return plan


def _render(spec: SyntheticSpec, c: _Content) -> np.ndarray:
    """uint8 [frames, size, size, 3]."""
    s = spec.size
    r = s // 6  # half-side / radius: with the jitter, the shape stays within the middle ~45%, clear of the corners
    y, x = np.mgrid[0:s, 0:s]
    out = np.empty((spec.frames, s, s, 3), np.uint8)
    for f, (dy, dx) in enumerate(c.jitter):
        first_half = f < spec.frames // 2
        out[f] = PALETTE[c.first] if first_half else GREY if c.last == "grey" else PALETTE[c.last]
        if first_half and c.last == "grey":
            continue  # colour_then_grey: the first frames are the colour alone
        cy, cx = s // 2 + dy, s // 2 + dx
        if c.shape == "square":
            mask = (np.abs(y - cy) <= r) & (np.abs(x - cx) <= r)
        else:
            mask = (y - cy) ** 2 + (x - cx) ** 2 <= r * r
        out[f][mask] = PALETTE[c.shape_colour]
    return out


def _answer(c: _Content, question: str) -> str:
    return {"first": c.first, "last": c.last, "shape": c.shape}[question]


def _check_readable(path: str, spec: SyntheticSpec) -> None:
    try:
        clip = video.read(path, video.uniform(spec.frames))
    except video.VideoError as e:
        raise ValueError(f"decord cannot read the generated {spec.size}x{spec.size} video ({e.reason}); "
                         "pick another size, e.g. 64, 128 or 224") from None
    if clip.total_frames != spec.frames:
        raise ValueError(f"{path} decodes to {clip.total_frames} frames, {spec.frames} were written")


def _write_atomic(path: str, text: str) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def synthetic_video(frames: int, size: int, seed: int) -> np.ndarray:
    """uint8 [F, size, size, 3]: a coloured square moving over a gradient, plus a little noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    video = np.empty((frames, size, size, 3), np.uint8)
    for f in range(frames):
        img = np.stack([x, y, 1 - x], axis=-1) * 160
        c = int((f + 1) * size / (frames + 1))
        img[max(0, c - 40):c + 40, max(0, c - 40):c + 40] = (240, 60, 30)
        video[f] = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    return video
