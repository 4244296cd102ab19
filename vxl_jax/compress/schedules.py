"""Compression schedules: plain functions from a video to its windows and their ratios.

A schedule is any callable

    schedule(video: VideoInfo, key: jax.Array | None) -> Segments

`VideoInfo` says how many visual tokens the video has, how many make a frame
and how many fit in a window; `video.frame_features()` gives per-frame
features [F, D] (computed on first use, so schedules that do not look at the
content cost nothing) and `video.question` an optional question embedding [D].
`Segments` holds the windows' lengths in raw visual tokens (each at most the
window, whole frames when the input is frames) and one ratio per window (None:
keep that window uncompressed). The host plan (`plan.make_plan`) turns them into
VST positions; windows of different lengths run in the same compiled scan, so
nothing about a schedule is compiled in except the set of ratios it uses.

    >>> from vxl_jax.compress import schedules
    >>> video = schedules.VideoInfo(num_tokens=3000, tokens_per_frame=144, window=1440)
    >>> schedules.fixed(8)(video, None)
    Segments(lengths=(1440, 1440, 120), ratios=(8, 8, 8))
    >>> schedules.per_window([2, 4, 16])(video, None).ratios
    (2, 4, 16)

Built in: `fixed`, `uncompressed`, `per_window`, `step_random`, `curriculum`,
`dynamic` (the paper's scene-change intervals), and `parse("name:k=v,...")`
for command lines.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import jax
import numpy as np

from vxl_jax.compress import segmentation
from vxl_jax.compress.plan import PlanError, check_lengths, check_ratios, fixed_lengths


@dataclasses.dataclass(frozen=True)
class Segments:
    lengths: tuple[int, ...]                 # raw visual tokens per window, in order
    ratios: tuple[Optional[int], ...]        # one per window; None keeps the window uncompressed

    def __post_init__(self):
        object.__setattr__(self, "lengths", tuple(int(n) for n in self.lengths))
        object.__setattr__(self, "ratios", tuple(check_ratios(self.ratios)))
        if len(self.lengths) != len(self.ratios):
            raise PlanError(f"{len(self.lengths)} window length(s) but {len(self.ratios)} ratio(s)")


@dataclasses.dataclass
class VideoInfo:
    """What a schedule may look at. Features are computed on the first `frame_features()` call."""

    num_tokens: int                          # visual tokens of the video
    tokens_per_frame: int
    window: int                              # most raw tokens in one window
    question: Optional[np.ndarray] = None    # [D] question embedding, when the caller has one
    features_fn: Optional[Callable[[], np.ndarray]] = dataclasses.field(default=None, repr=False)
    _features: Optional[np.ndarray] = dataclasses.field(default=None, repr=False)

    @property
    def num_frames(self) -> int:
        return self.num_tokens // self.tokens_per_frame

    @property
    def window_frames(self) -> int:
        return max(1, self.window // self.tokens_per_frame)

    def frame_features(self) -> np.ndarray:
        """[F, D] per-frame features (cached)."""
        if self._features is None:
            if self.features_fn is None:
                raise PlanError("this schedule looks at frame features, but none were given "
                                "(pipeline.prepare(..., frame_features=...))")
            self._features = np.asarray(self.features_fn())
        return self._features


Schedule = Callable[[VideoInfo, Optional[jax.Array]], Segments]


def _fixed_windows(video: VideoInfo, ratios: Sequence[Optional[int]]) -> Segments:
    return Segments(tuple(fixed_lengths(video.num_tokens, video.window)), tuple(ratios))


def _count(video: VideoInfo) -> int:
    return len(fixed_lengths(video.num_tokens, video.window))


def fixed(ratio: int) -> Schedule:
    """The same ratio for every window of `window` tokens (the inference default)."""
    (ratio,) = check_ratios([ratio])
    return lambda video, key=None: _fixed_windows(video, [ratio] * _count(video))


def uncompressed() -> Schedule:
    """No compression: every window keeps its raw tokens (the plain causal forward)."""
    return lambda video, key=None: _fixed_windows(video, [None] * _count(video))


def per_window(ratios: Sequence[Optional[int]]) -> Schedule:
    """Explicit ratios, one per window; a video with fewer windows uses the first ones."""
    ratios = check_ratios(ratios)

    def schedule(video: VideoInfo, key=None) -> Segments:
        n = _count(video)
        if n > len(ratios):
            raise PlanError(f"the schedule lists {len(ratios)} ratio(s) but the video has {n} window(s)")
        return _fixed_windows(video, ratios[:n])

    return schedule


def draw_ratios(choices: Sequence[int], key: jax.Array, n: int) -> list[int]:
    """Window w's ratio drawn uniformly from `choices` with `fold_in(key, w)`: prefix-stable in n."""
    checked = check_ratios(choices)
    if not checked or None in checked:
        raise PlanError(f"ratios are drawn from integer ratios, got {list(choices)}")
    if key is None:
        raise PlanError("a random schedule needs an explicit PRNG key (key=jax.random.key(seed))")
    if n == 0:
        return []
    picks = jax.vmap(lambda w: jax.random.randint(jax.random.fold_in(key, w), (), 0, len(checked)))(np.arange(n))
    return [int(checked[i]) for i in np.asarray(picks)]


def step_random(choices: Sequence[int]) -> Schedule:
    """Each window draws its ratio uniformly from `choices` (the authors' training: {2, 4, 8}).

    Window w's draw depends only on (key, w): the same key always gives the same
    ratios, and a shorter video gets a prefix of a longer one's (so rows of a
    batch agree per window index).
    """
    check_ratios(choices)
    return lambda video, key: _fixed_windows(video, draw_ratios(choices, key, _count(video)))


def curriculum(cur, step: int, record_index: int = 0) -> Schedule:
    """The ratios a training curriculum (`data.curriculum.Curriculum`) gives at `step`; its own seed, no key."""
    return lambda video, key=None: _fixed_windows(
        video, [int(r) for r in cur.ratios(step, record_index, _count(video))])


def dynamic(*, ratio: int = 8, threshold: float = 0.1, min_frames: int = 2,
            max_frames: Optional[int] = None) -> Schedule:
    """The paper's dynamic intervals: windows end at scene changes (`segmentation.segment`), each at `ratio`.

    Depth scores over the cosine similarities of neighbouring frames' features;
    boundaries at peaks above `threshold`, intervals of `min_frames` to
    `max_frames` frames (default and cap: a full window).
    """
    (ratio,) = check_ratios([ratio])

    def schedule(video: VideoInfo, key=None) -> Segments:
        if video.num_tokens % video.tokens_per_frame:
            raise PlanError(f"the dynamic schedule cuts whole frames: {video.num_tokens} visual tokens are not "
                            f"a multiple of {video.tokens_per_frame} per frame")
        cap = video.window_frames if max_frames is None else min(max_frames, video.window_frames)
        frames = segmentation.segment(video.frame_features(), threshold=threshold,
                                      min_frames=min(min_frames, cap), max_frames=cap)
        lengths = [n * video.tokens_per_frame for n in frames]
        return Segments(tuple(check_lengths(lengths, video.num_tokens, video.window)), (ratio,) * len(lengths))

    return schedule


def _ratio_value(text: str) -> Optional[int]:
    return None if text.lower() in ("none", "0") else int(text)


def _ratio_list(text: str) -> list[Optional[int]]:
    return [_ratio_value(t) for t in text.replace("/", " ").replace("+", " ").split()]


# name -> (factory, {option: converter}); options are passed as keyword arguments.
_NAMED = {
    "fixed": (fixed, {"ratio": int}),
    "uncompressed": (uncompressed, {}),
    "per-window": (per_window, {"ratios": _ratio_list}),
    "step-random": (step_random, {"choices": _ratio_list}),
    "dynamic": (dynamic, {"ratio": int, "threshold": float, "min_frames": int, "max_frames": int}),
    "curriculum": (None, {"name": str, "step": int}),
}


def names() -> list[str]:
    return sorted(_NAMED)


def parse(text: str) -> Schedule:
    """A schedule from `NAME[:k=v,...]`, e.g. `fixed:ratio=4`, `per-window:ratios=2/4/8`,
    `step-random:choices=2/4/8`, `dynamic:ratio=8,threshold=0.2,min_frames=2`,
    `curriculum:name=curriculum_paper,step=1000`, `uncompressed`."""
    name, _, rest = text.strip().partition(":")
    if name not in _NAMED:
        raise PlanError(f"unknown schedule {name!r}; one of {', '.join(names())}")
    factory, options = _NAMED[name]
    kwargs = {}
    for item in filter(None, (p.strip() for p in rest.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in options:
            raise PlanError(f"schedule {name!r} takes {', '.join(options) or 'no options'} (as k=v), got {item!r}")
        try:
            kwargs[key] = options[key](value.strip())
        except ValueError as e:
            raise PlanError(f"schedule {name!r}: bad value for {key}: {value!r} ({e})") from None
    if name == "curriculum":
        from vxl_jax.data import curriculum as curricula
        return curriculum(curricula.load(kwargs.get("name", "curriculum_paper")), kwargs.get("step", 0))
    if name in ("per-window", "step-random") and not kwargs:
        raise PlanError(f"schedule {name!r} needs its ratios, e.g. {name}:{next(iter(options))}=2/4/8")
    return factory(**kwargs)
