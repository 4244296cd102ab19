"""Compression schedules: plain functions from a window count to per-window ratios.

A schedule is any callable `schedule(num_windows) -> list[int | None]` (None:
leave that window uncompressed). The plan (`plan.make_plan`) turns it into VST
positions; nothing about a schedule is compiled in except the set of ratios
it can produce.

    >>> from vxl_jax.compress import schedules
    >>> schedules.fixed(8)(3)
    [8, 8, 8]
    >>> schedules.per_window([2, 4, 16])(2)
    [2, 4]
    >>> import jax
    >>> s = schedules.step_random([2, 4, 8], jax.random.key(0))
    >>> s(4) == s(4) and s(4)[:2] == s(2)          # same key, same ratios; prefix-stable
    True
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import numpy as np

from vxl_jax.compress.plan import PlanError, check_ratios

Schedule = Callable[[int], list[Optional[int]]]


def fixed(ratio: int) -> Schedule:
    """The same ratio for every window (the inference default)."""
    (ratio,) = check_ratios([ratio])
    return lambda n: [ratio] * n


def uncompressed() -> Schedule:
    """No compression: every window keeps its raw tokens (the plain causal forward)."""
    return lambda n: [None] * n


def per_window(ratios: Sequence[Optional[int]]) -> Schedule:
    """Explicit ratios, one per window; a video with fewer windows uses the first ones."""
    ratios = check_ratios(ratios)

    def schedule(n: int) -> list[Optional[int]]:
        if n > len(ratios):
            raise PlanError(f"the schedule lists {len(ratios)} ratio(s) but the video has {n} window(s)")
        return ratios[:n]

    return schedule


def step_random(choices: Sequence[int], key: jax.Array) -> Schedule:
    """Each window draws its ratio uniformly from `choices` (the authors' training: {2, 4, 8}).

    Window w's draw depends only on (key, w): the same key always gives the same
    ratios, and a shorter video gets a prefix of a longer one's schedule (so rows
    of a batch agree per window index).
    """
    checked = check_ratios(choices)
    if not checked or None in checked:
        raise PlanError(f"step_random draws from integer ratios, got {list(choices)}")
    choices = np.asarray(checked, dtype=np.int64)

    def schedule(n: int) -> list[Optional[int]]:
        if n == 0:
            return []
        picks = jax.vmap(lambda w: jax.random.randint(jax.random.fold_in(key, w), (), 0, len(choices)))(
            np.arange(n))
        return [int(choices[i]) for i in np.asarray(picks)]

    return schedule
