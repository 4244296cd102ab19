"""The host-side window plan of VST compression: where windows start, how many VSTs each gets, and where.

Given the prompt layout `[prefix P][visual n][suffix S]`, the visual span is cut
into windows of `window` raw tokens (1440 = 10 frames; the last one may be
shorter), or of the lengths a schedule chose (each at most `window`: the
dynamic schedule cuts at scene changes), and each window gets a ratio r. Inside a window, one
VST follows every r raw tokens. A window whose length is not a multiple of r
follows the original's rule: with a remainder c carried in from the previous
window (0 at the start) it gets floor((n + c) / r) VSTs, the first after r - c
raw tokens and then one after every r; (n + c) mod r is carried on. Raw tokens
after a window's last VST are dropped with the window.

A ratio of `None` leaves a window uncompressed: its raw tokens' keys/values are
all kept (and the carry restarts at 0), which is the plain causal forward. The
carry also restarts when the next window has another ratio (the original only
meets one ratio per video; a remainder of another ratio could exceed r), so a
window never holds more than ceil(window / r) VSTs.

Everything here is numpy on the host; the arrays feed one compiled prefill.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import numpy as np


class PlanError(ValueError):
    """A schedule that cannot be planned (bad ratio, wrong number of windows, ...)."""


@dataclasses.dataclass(frozen=True)
class Window:
    start: int          # index of the window's first raw token in the full (expanded) sequence
    raw: int            # raw visual tokens in the window
    ratio: Optional[int]  # None: uncompressed, every raw token is kept
    carry_in: int       # remainder carried in from the previous window
    vst_after: tuple[int, ...]  # for each VST, how many raw tokens of this window precede it

    @property
    def num_vst(self) -> int:
        return len(self.vst_after)

    @property
    def kept(self) -> int:
        """Keys/values per layer this window leaves in the memory."""
        return self.raw if self.ratio is None else self.num_vst

    def vst_slots(self) -> np.ndarray:
        """Index of each VST among the window's fed tokens."""
        return np.asarray(self.vst_after, np.int64) + np.arange(self.num_vst)

    @property
    def length(self) -> int:
        """Tokens fed to the LLM for this window: raw tokens plus VSTs."""
        return self.raw + self.num_vst

    def interleaved(self) -> np.ndarray:
        """Per fed token: index of its raw token inside the window, or -1 for a VST."""
        out = np.empty(self.length, np.int64)
        raw_at = np.arange(self.raw)
        is_vst = np.zeros(self.length, bool)
        is_vst[self.vst_slots()] = True
        out[~is_vst] = raw_at
        out[is_vst] = -1
        return out


@dataclasses.dataclass(frozen=True)
class Plan:
    prefix: int
    num_visual: int
    suffix: int
    windows: tuple[Window, ...]
    window: int = 1440   # raw tokens per full window

    @property
    def num_vst(self) -> int:
        return sum(w.num_vst for w in self.windows)

    @property
    def vst_per_window(self) -> list[int]:
        return [w.num_vst for w in self.windows]

    @property
    def kept_per_window(self) -> list[int]:
        return [w.kept for w in self.windows]

    @property
    def memory_after_prefill(self) -> int:
        """KV entries kept per layer after prefill: prefix + what the windows keep + suffix."""
        return self.prefix + sum(self.kept_per_window) + self.suffix


def num_windows(num_visual: int, window: int = 1440) -> int:
    return -(-num_visual // window)


def check_ratios(ratios: Sequence[Optional[int]]) -> list[Optional[int]]:
    """Ratios as ints (None kept); raises PlanError on anything below 1 or not an integer."""
    out, bad = [], []
    for r in ratios:
        if r is None:
            out.append(None)
        elif isinstance(r, (int, np.integer)) and not isinstance(r, bool) and r >= 1:
            out.append(int(r))
        else:
            bad.append(r)
    if bad:
        raise PlanError(f"compression ratios must be integers >= 1 (or None for no compression), got {bad}")
    return out


def fixed_lengths(num_visual: int, window: int = 1440) -> list[int]:
    """Raw tokens per window when the video is cut every `window` tokens (the last window takes the rest)."""
    return [min(window, num_visual - i * window) for i in range(num_windows(num_visual, window))]


def check_lengths(lengths: Sequence[int], num_visual: int, window: int) -> list[int]:
    """Window lengths as ints; raises PlanError unless each is in [1, window] and they add up to num_visual."""
    out = [int(n) for n in lengths]
    bad = [n for n in out if not 1 <= n <= window]
    if bad:
        raise PlanError(f"window lengths must be between 1 and the window size {window}, got {bad}")
    if sum(out) != num_visual:
        raise PlanError(f"window lengths add up to {sum(out)} visual tokens, the video has {num_visual}")
    return out


def make_plan(prefix: int, num_visual: int, suffix: int, ratios: Sequence[Optional[int]], *,
              window: int = 1440, lengths: Optional[Sequence[int]] = None) -> Plan:
    """Plans the windows of one sequence; `ratios` has one entry per window (None: uncompressed).

    `lengths`: raw tokens per window (default: cut every `window` tokens).
    """
    if window < 1:
        raise PlanError(f"window must be >= 1, got {window}")
    if min(prefix, num_visual, suffix) < 0:
        raise PlanError(f"negative segment length: prefix {prefix}, visual {num_visual}, suffix {suffix}")
    cut = "of" if lengths is None else "of up to"
    lengths = fixed_lengths(num_visual, window) if lengths is None else check_lengths(lengths, num_visual, window)
    ratios = check_ratios(ratios)
    if len(ratios) != len(lengths):
        raise PlanError(f"{num_visual} visual tokens make {len(lengths)} window(s) {cut} {window}, "
                        f"but the schedule gives {len(ratios)} ratio(s)")
    windows, carry, start = [], 0, prefix
    for i, (raw, r) in enumerate(zip(lengths, ratios)):
        vst_after = () if r is None else tuple(range(r - carry, raw + 1, r))
        windows.append(Window(start=start, raw=raw, ratio=r, carry_in=carry, vst_after=vst_after))
        carry = 0 if r is None else (raw + carry) % r
        start += raw
        if i + 1 < len(ratios) and ratios[i + 1] != r:
            carry = 0     # a remainder counts toward the same ratio only: the next window restarts (so carry < r)
    return Plan(prefix=prefix, num_visual=num_visual, suffix=suffix, windows=tuple(windows), window=window)
