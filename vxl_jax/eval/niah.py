"""Video needle-in-a-haystack (V-NIAH): can the model find one frame in a long video?

As in the Video-XL / Video-X2L papers' figures: a haystack of L frames gets a
needle frame inserted at depth d (at position round(d * L), rounded half up, so
d = 0 puts it first and d = 1 last), the model is asked a multiple-choice
question only the needle answers, and accuracy is drawn as a heat map over
haystack length (x) and needle depth (y).

- Haystack: `synthetic_video(L, size, seed)` (a square drifting over a
  gradient), or L frames sampled uniformly from a given video file.
- Needle: a grey frame with one large shape (circle / triangle / diamond) in a
  palette colour; question "What color is the <shape> that appears in the
  video?" with `num_options` colours. The haystack's own square is never a
  needle shape, so the question has one answer.
- Trials: trial t uses the same needle in every cell (seeded by (seed, t)), so
  the cells of a trial differ only in L and d, which is what the map compares.
- Responses are read with `mcqa.parse_choice`; an unparsed one counts wrong.

Everything is a function of the spec: same spec, same videos, same questions.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Optional, Sequence

import numpy as np

from vxl_jax.data import video
from vxl_jax.data.synthetic import PALETTE, synthetic_video
from vxl_jax.eval import mcqa

NEEDLE_SHAPES = ("circle", "triangle", "diamond")
BACKGROUND = (128, 128, 128)   # not a palette colour, so the background is never an answer
DEFAULT_LENGTHS = (10, 20, 40)
DEFAULT_DEPTHS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclasses.dataclass(frozen=True)
class NiahSpec:
    lengths: tuple[int, ...] = DEFAULT_LENGTHS      # haystack frames
    depths: tuple[float, ...] = DEFAULT_DEPTHS      # needle position as a fraction of the haystack
    trials: int = 1                                 # needles per cell
    seed: int = 0
    size: int = 336                                 # side of the synthetic haystack's frames
    num_options: int = 4
    needle_frames: int = 1                          # consecutive copies of the needle
    haystack: Optional[str] = None                  # a video file to sample haystacks from

    def __post_init__(self):
        object.__setattr__(self, "lengths", tuple(int(n) for n in self.lengths))
        object.__setattr__(self, "depths", tuple(float(d) for d in self.depths))
        if not self.lengths or min(self.lengths) < 1 or len(set(self.lengths)) != len(self.lengths):
            raise ValueError(f"haystack lengths must be distinct integers >= 1, got {self.lengths}")
        if not self.depths or not all(0.0 <= d <= 1.0 for d in self.depths) or \
                len(set(self.depths)) != len(self.depths):
            raise ValueError(f"depths must be distinct fractions in [0, 1], got {self.depths}")
        if self.trials < 1:
            raise ValueError(f"trials must be >= 1, got {self.trials}")
        if self.size < 32:
            raise ValueError(f"size must be >= 32 pixels, got {self.size}")
        if not 2 <= self.num_options <= len(PALETTE):
            raise ValueError(f"num_options must be 2..{len(PALETTE)} (the palette's colours), got {self.num_options}")
        if self.needle_frames < 1:
            raise ValueError(f"needle_frames must be >= 1, got {self.needle_frames}")


@dataclasses.dataclass(frozen=True)
class Needle:
    colour: str
    shape: str
    options: tuple[str, ...]    # colour names, the right one among them
    answer_index: int

    @property
    def question(self) -> str:
        return f"What color is the {self.shape} that appears in the video?"


def make_needle(seed: int, trial: int, num_options: int = 4) -> Needle:
    """The needle of a trial: colour, shape, distractor colours and option order drawn from (seed, trial)."""
    rng = np.random.default_rng((seed, trial))
    colours = list(PALETTE)
    picked = [colours[k] for k in rng.choice(len(colours), num_options, replace=False)]  # picked[0]: the answer
    shape = NEEDLE_SHAPES[int(rng.integers(len(NEEDLE_SHAPES)))]
    options = [picked[k] for k in rng.permutation(num_options)]
    return Needle(colour=picked[0], shape=shape, options=tuple(options), answer_index=options.index(picked[0]))


def needle_image(needle: Needle, height: int, width: int) -> np.ndarray:
    """uint8 [H, W, 3]: the grey background with the shape filling most of the frame's middle."""
    y, x = np.mgrid[0:height, 0:width]
    cy, cx, r = height / 2, width / 2, 0.4 * min(height, width)
    if needle.shape == "circle":
        mask = (y - cy) ** 2 + (x - cx) ** 2 <= r * r
    elif needle.shape == "diamond":
        mask = np.abs(y - cy) + np.abs(x - cx) <= r
    elif needle.shape == "triangle":   # apex up, base at the bottom
        mask = (y <= cy + r) & (np.abs(x - cx) <= (y - (cy - r)) / 2)
    else:
        raise ValueError(f"unknown needle shape {needle.shape!r}; known: {NEEDLE_SHAPES}")
    img = np.empty((height, width, 3), np.uint8)
    img[...] = BACKGROUND
    img[mask] = PALETTE[needle.colour]
    return img


def needle_position(length: int, depth: float) -> int:
    """round(depth * length), half up: the needle's frame index in the haystack-plus-needle video."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"the depth is a fraction in [0, 1], got {depth}")
    return int(math.floor(depth * length + 0.5))


def insert_needle(haystack: np.ndarray, needle_frames: np.ndarray, depth: float) -> tuple[np.ndarray, int]:
    """(haystack with the needle frames inserted at `needle_position`, that position)."""
    position = needle_position(len(haystack), depth)
    if needle_frames.shape[1:] != haystack.shape[1:]:
        raise ValueError(f"needle frames {needle_frames.shape[1:]} do not match the haystack's {haystack.shape[1:]}")
    return np.concatenate([haystack[:position], needle_frames, haystack[position:]]), position


def haystack_frames(spec: NiahSpec, length: int) -> np.ndarray:
    """uint8 [length, H, W, 3]: generated, or sampled uniformly from `spec.haystack`."""
    if spec.haystack is None:
        return synthetic_video(length, spec.size, spec.seed)
    return video.read(spec.haystack, video.uniform(length)).frames


@dataclasses.dataclass(frozen=True)
class Cell:
    length: int
    depth: float
    trial: int


def grid(spec: NiahSpec) -> list[Cell]:
    """Every (length, depth, trial), by length first (one compiled program per length runs together)."""
    return [Cell(n, d, t) for n in spec.lengths for d in spec.depths for t in range(spec.trials)]


def cell_video(spec: NiahSpec, cell: Cell, haystack: Optional[np.ndarray] = None) -> tuple[np.ndarray, int, Needle]:
    """(frames, needle position, needle) of a cell; pass its haystack to reuse one across depths."""
    if haystack is None:
        haystack = haystack_frames(spec, cell.length)
    needle = make_needle(spec.seed, cell.trial, spec.num_options)
    image = needle_image(needle, haystack.shape[1], haystack.shape[2])
    frames, position = insert_needle(haystack, np.repeat(image[None], spec.needle_frames, axis=0), cell.depth)
    return frames, position, needle


@dataclasses.dataclass(frozen=True)
class CellRecord:
    length: int
    depth: float
    trial: int
    position: int               # the needle's first frame index
    frames: int                 # haystack + needle frames
    colour: str
    shape: str
    question: str
    options: tuple[str, ...]
    answer_index: int
    answer: str
    response: str
    choice: Optional[int]
    choice_letter: Optional[str]
    correct: bool
    seconds: float
    details: dict = dataclasses.field(default_factory=dict)   # the answerer's (windows, X2L selection, sizes)


@dataclasses.dataclass(frozen=True)
class NiahResults:
    spec: NiahSpec
    records: tuple[CellRecord, ...]
    table: tuple[tuple[float, ...], ...]     # accuracy, rows: spec.lengths, columns: spec.depths

    @property
    def summary(self) -> dict:
        n = len(self.records)
        right = sum(r.correct for r in self.records)
        return {"accuracy": right / n if n else None, "correct": right, "total": n,
                "unparsed": sum(r.choice is None for r in self.records)}

    def to_json(self) -> dict:
        return {"spec": dataclasses.asdict(self.spec), "summary": self.summary,
                "table": {"rows": "haystack length (frames)", "columns": "needle depth",
                          "lengths": list(self.spec.lengths), "depths": list(self.spec.depths),
                          "accuracy": [list(row) for row in self.table]},
                "records": [dataclasses.asdict(r) for r in self.records]}


def accuracy_table(records: Sequence[CellRecord], spec: NiahSpec) -> tuple[tuple[float, ...], ...]:
    """Mean correctness per (length, depth) over trials; NaN for a cell without records."""
    rows = []
    for n in spec.lengths:
        row = []
        for d in spec.depths:
            hits = [r.correct for r in records if r.length == n and r.depth == d]
            row.append(float(np.mean(hits)) if hits else float("nan"))
        rows.append(tuple(row))
    return tuple(rows)


def _silent(message: str) -> None:
    del message


def run(answer_fn: mcqa.AnswerFn, spec: NiahSpec = NiahSpec(),
        progress: Callable[[str], None] = _silent) -> NiahResults:
    """Asks each cell's question about its video; one progress line per cell."""
    cells, records = grid(spec), []
    haystacks: dict[int, np.ndarray] = {}
    for i, cell in enumerate(cells):
        if cell.length not in haystacks:
            haystacks = {cell.length: haystack_frames(spec, cell.length)}  # cells come by length: keep one
        frames, position, needle = cell_video(spec, cell, haystacks[cell.length])
        t = time.perf_counter()
        response, details = mcqa.response_of(answer_fn(frames, mcqa.prompt(needle.question, needle.options)))
        seconds = time.perf_counter() - t
        choice = mcqa.parse_choice(response, needle.options)
        correct = choice == needle.answer_index
        records.append(CellRecord(cell.length, cell.depth, cell.trial, position, len(frames), needle.colour,
                                  needle.shape, needle.question, needle.options, needle.answer_index,
                                  mcqa.LETTERS[needle.answer_index], response, choice,
                                  None if choice is None else mcqa.LETTERS[choice], correct, seconds, details))
        got = "unparsed" if choice is None else mcqa.LETTERS[choice]
        progress(f"[{i + 1}/{len(cells)}] length {cell.length}, depth {cell.depth:g} (frame {position}), "
                 f"trial {cell.trial}: {got} (truth {mcqa.LETTERS[needle.answer_index]} = {needle.colour}) "
                 f"{'right' if correct else 'wrong'} in {seconds:.2f} s; response {response.strip()[:60]!r}")
    return NiahResults(spec, tuple(records), accuracy_table(records, spec))


def format_table(table: Sequence[Sequence[float]], lengths: Sequence[int], depths: Sequence[float]) -> str:
    """The accuracy table as text: a row per haystack length, a column per depth (in %)."""
    head = "frames \\ depth " + " ".join(f"{100 * d:>6.0f}%" for d in depths)
    lines = [head] + [f"{n:>14d} " + " ".join(f"{a:>7.2f}" for a in row) for n, row in zip(lengths, table)]
    return "\n".join(lines)


def heatmap(table: Sequence[Sequence[float]], lengths: Sequence[int], depths: Sequence[float], path: str,
            title: str = "Video needle in a haystack") -> str:
    """Writes the papers' figure as a PNG: x haystack frames, y needle depth %, red (0) to green (1)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no pyplot: no global backend state
    from matplotlib.figure import Figure

    acc = np.asarray(table, np.float64).T      # rows: depths, columns: lengths
    fig = Figure(figsize=(max(4.0, 0.9 * len(lengths) + 2.5), max(3.0, 0.5 * len(depths) + 1.8)), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    im = ax.imshow(acc, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:g}" for d in depths])
    ax.set_xlabel("haystack length (frames)")
    ax.set_ylabel("needle depth (%)")
    ax.set_title(title)
    for i in range(acc.shape[0]):
        for j in range(acc.shape[1]):
            value = acc[i, j]
            dark = not np.isnan(value) and (value < 0.2 or value > 0.85)   # the ends of RdYlGn are dark
            ax.text(j, i, "-" if np.isnan(value) else f"{value:.2f}", ha="center", va="center", fontsize=8,
                    color="white" if dark else "black")
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path)
    return path
