"""Compression-ratio curricula for training: which ratio each visual window gets.

A curriculum is a stage table `[(until_step, ratio set), ...]` (the last
stage's `until_step` is None: it runs forever) and a mode:

- `fixed`: every window gets the stage's single ratio;
- `step-random`: each window draws its own ratio from the stage's set;
- `instance-random`: one draw per record, used by all its windows.

Every draw is a pure function of (seed, training step, window index) for
step-random and of (seed, training step, record index) for instance-random,
computed with numpy's Philox generator keyed by those integers: the same run
sees the same ratios after a restart, on any number of hosts. Step-random
draws do not depend on the record, so all rows of a global batch share the
ratio of each window index. Instance-random rows differ; one compiled
prefill still runs the whole batch: each window runs the branch of its
smallest ratio and every row places its own VSTs (`compress/packing.py`),
equal to running the rows one by one.

The paper's schedule, {2, 4} then {2, 4, 8, 12, 16}, is `paper(stage1_steps)`,
or as a config file `load("curriculum_paper")` (`configs/curriculum_paper.json`).
"""

from __future__ import annotations

import dataclasses
from typing import Literal, Optional, Sequence

import numpy as np

Mode = Literal["fixed", "step-random", "instance-random"]
_MODE_KEY = {"fixed": 0, "step-random": 1, "instance-random": 2}


@dataclasses.dataclass(frozen=True)
class Curriculum:
    stages: tuple[tuple[Optional[int], tuple[int, ...]], ...]   # ((until_step or None, ratios), ...)
    mode: Mode = "step-random"
    seed: int = 0

    def __post_init__(self):
        if self.mode not in _MODE_KEY:
            raise ValueError(f"curriculum mode is one of {sorted(_MODE_KEY)}, got {self.mode!r}")
        stages = tuple((None if u is None else int(u), tuple(int(r) for r in rs)) for u, rs in self.stages)
        object.__setattr__(self, "stages", stages)
        if not stages:
            raise ValueError("a curriculum needs at least one stage")
        last = -1
        for i, (until, ratios) in enumerate(stages):
            if not ratios or any(r < 1 for r in ratios):
                raise ValueError(f"stage {i}: ratios must be a non-empty set of integers >= 1, got {ratios}")
            if self.mode == "fixed" and len(ratios) != 1:
                raise ValueError(f"stage {i}: mode 'fixed' takes one ratio per stage, got {ratios}")
            if until is None and i != len(stages) - 1:
                raise ValueError(f"stage {i}: only the last stage may run forever (until_step None)")
            if until is not None and until <= last:
                raise ValueError(f"stage {i}: until_step values must increase, got {until} after {last}")
            last = until if until is not None else last
        if stages[-1][0] is not None:
            raise ValueError("the last stage must run forever (until_step None)")

    @property
    def all_ratios(self) -> tuple[int, ...]:
        """Every ratio any stage can draw: the branches a training prefill must compile."""
        return tuple(sorted({r for _, rs in self.stages for r in rs}))

    def stage(self, step: int) -> int:
        for i, (until, _) in enumerate(self.stages):
            if until is None or step < until:
                return i
        raise AssertionError("unreachable: the last stage runs forever")

    def ratios(self, step: int, record_index: int, num_windows: int) -> np.ndarray:
        """int32 [num_windows]: the ratio of each window of record `record_index` at `step`."""
        choices = np.asarray(self.stages[self.stage(step)][1], np.int32)
        if self.mode == "fixed" or num_windows == 0:
            return np.full((num_windows,), choices[0], np.int32)
        if self.mode == "instance-random":
            return np.full((num_windows,), choices[self._draw(step, record_index, len(choices))], np.int32)
        return np.asarray([choices[self._draw(step, w, len(choices))] for w in range(num_windows)], np.int32)

    def _draw(self, step: int, index: int, n: int) -> int:
        key = [self.seed, _MODE_KEY[self.mode], step, index]
        return int(np.random.Generator(np.random.Philox(key=_key128(key))).integers(n))


def _key128(values: Sequence[int]) -> np.ndarray:
    # Philox takes a 128-bit key: pack four non-negative ints into two 64-bit words.
    v = [int(x) & 0xFFFFFFFF for x in values]
    return np.asarray([(v[0] << 32) | v[1], (v[2] << 32) | v[3]], np.uint64)


def fixed(ratio: int) -> Curriculum:
    return Curriculum(((None, (ratio,)),), mode="fixed")


def paper(stage1_steps: int, *, seed: int = 0, mode: Mode = "step-random") -> Curriculum:
    """The paper's curriculum: ratios {2, 4} for `stage1_steps`, then {2, 4, 8, 12, 16}."""
    return Curriculum(((stage1_steps, (2, 4)), (None, (2, 4, 8, 12, 16))), mode=mode, seed=seed)


def load(name_or_path: str) -> Curriculum:
    """A curriculum JSON by name in `configs/` (e.g. "curriculum_paper") or by path."""
    import json
    import os
    path = name_or_path
    if not os.path.isfile(path):
        path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", f"{name_or_path}.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no curriculum {name_or_path!r} (neither a file nor configs/{name_or_path}.json)")
    with open(path) as f:
        return from_dict(json.load(f))


def from_dict(d: dict) -> Curriculum:
    """From a config mapping: {"stages": [[until_step|null, [ratios]], ...], "mode": ..., "seed": ...}."""
    return Curriculum(tuple((u, tuple(rs)) for u, rs in d["stages"]), mode=d.get("mode", "step-random"),
                      seed=int(d.get("seed", 0)))
