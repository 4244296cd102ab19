"""Host side of a batched prefill: plans -> padded arrays plus the static shape spec.

Everything that changes the compiled program is in `PrefillSpec` (hashable, a
jit static argument) and in the padded array shapes; both come from size
buckets, so videos and prompts of different lengths inside one bucket reuse one
compilation. Everything else (where VSTs go, how many each row keeps, the
real lengths) is data in `PlanArrays`.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import flax
import numpy as np

from vxl_jax.compress.plan import Plan, PlanError, check_ratios


def _round_up(n: int, multiple: int) -> int:
    return max(multiple, -(-n // multiple) * multiple)


@dataclasses.dataclass(frozen=True)
class Buckets:
    """How array sizes are rounded so that lengths within a bucket share one compilation.

    Text is padded to a multiple of `text_multiple`; the window count to the next
    power of two up to `windows_pow2_up_to`, then to a multiple of it.
    """

    text_multiple: int = 32
    windows_pow2_up_to: int = 16

    def text(self, n: int) -> int:
        return _round_up(n, self.text_multiple)

    def windows(self, n: int) -> int:
        if n <= 1:
            return 1
        if n <= self.windows_pow2_up_to:
            return 1 << (n - 1).bit_length()
        return _round_up(n, self.windows_pow2_up_to)


@dataclasses.dataclass(frozen=True)
class PrefillSpec:
    """Static description of one compiled prefill.

    ratios: the branch set; each window runs the branch of its ratio (None = keep
    the raw tokens). window: raw tokens per window. buffer_size: memory slots per
    row, enough for the worst case of this bucket plus `max_new_tokens`.
    """

    ratios: tuple[Optional[int], ...]
    window: int
    buffer_size: int

    def max_vst(self, ratio: Optional[int]) -> int:
        """VSTs a window can hold at this ratio: ceil(window / r) (the carry never adds one more)."""
        return 0 if ratio is None else -(-self.window // ratio)

    def fed_length(self, ratio: Optional[int]) -> int:
        """Static length of the branch: the window's raw tokens plus its VST slots."""
        return self.window + self.max_vst(ratio)

    def max_kept(self, ratio: Optional[int]) -> int:
        return self.window if ratio is None else self.max_vst(ratio)

    @property
    def max_write(self) -> int:
        """Rows a window step writes after the memory (its kept entries, zero-padded to the widest branch)."""
        return max([1] + [self.max_kept(r) for r in self.ratios])

    @property
    def slot_width(self) -> int:
        return max([1] + [self.max_vst(r) for r in self.ratios])

    @property
    def noop_branch(self) -> int:
        return len(self.ratios)


@flax.struct.dataclass
class PlanArrays:
    """The batch's plan as arrays (numpy on the host, jax inside the prefill)."""

    prefix_ids: np.ndarray   # [B, P] int32, right-padded
    prefix_len: np.ndarray   # [B]
    suffix_ids: np.ndarray   # [B, S] int32, right-padded
    suffix_len: np.ndarray   # [B]
    branch: np.ndarray       # [W] index into spec.ratios; spec.noop_branch for a window no row has
    kept: np.ndarray         # [B, W] entries the window leaves in memory
    vst_slots: np.ndarray    # [B, W, spec.slot_width] index of each VST among the fed tokens
    visual_start: np.ndarray  # [B, W] the window's first raw token in the row's visual input

    @property
    def num_windows(self) -> int:
        return int(self.branch.shape[0])


def _sort_ratios(ratios) -> tuple[Optional[int], ...]:
    return tuple(sorted({r for r in ratios if r is not None})) + ((None,) if None in ratios else ())


def _fixed_or(fixed: Optional[int], bucketed: int, needed: int, what: str) -> int:
    if fixed is None:
        return bucketed
    if fixed < needed:
        raise PlanError(f"padded size {fixed} holds fewer than the {needed} {what} of the batch")
    return fixed


def pack(plans: Sequence[Plan], prefixes: Sequence[Sequence[int]], suffixes: Sequence[Sequence[int]], *,
         ratios: Optional[Sequence[Optional[int]]] = None, buckets: Buckets = Buckets(),
         max_new_tokens: int = 0, prefix_size: Optional[int] = None, suffix_size: Optional[int] = None,
         windows: Optional[int] = None, require_suffix: bool = True) -> tuple[PlanArrays, PrefillSpec]:
    """Pads a batch of plans (one per row) into arrays and the spec of the program to run them.

    `ratios` is the branch set compiled in; default: the ratios the plans use.
    Pass a wider set (e.g. every ratio of a random schedule) to keep one
    compilation across schedules. Rows may give a window index different
    ratios (instance-random training): that window runs the branch of the
    smallest one, whose VST slots hold every row's VSTs; a row with a larger
    ratio computes the same values with unused slots (masked) and more raw
    tokens after its last VST (causally invisible to it). Only an uncompressed
    window (None) must be uncompressed in every row that has it.
    `prefix_size` / `suffix_size` / `windows` fix the padded sizes instead of
    the buckets' choice (the training loader has already bucketed its batch).
    `require_suffix=False` allows plans without text after the video (Video-X2L
    encodes the video once and appends each question later).
    """
    if not plans:
        raise PlanError("empty batch")
    if not (len(plans) == len(prefixes) == len(suffixes)):
        raise PlanError(f"{len(plans)} plans, {len(prefixes)} prefixes, {len(suffixes)} suffixes")
    for b, (plan, pre, suf) in enumerate(zip(plans, prefixes, suffixes)):
        if len(pre) != plan.prefix or len(suf) != plan.suffix:
            raise PlanError(f"row {b}: plan says prefix {plan.prefix} / suffix {plan.suffix}, "
                            f"ids have {len(pre)} / {len(suf)}")
        if plan.suffix < 1 and require_suffix:
            raise PlanError(f"row {b}: no text after the video; the prompt must end with at least one "
                            "token after <image> (the chat template's assistant turn)")
    sizes = {p.window for p in plans}
    if len(sizes) != 1:
        raise PlanError(f"rows use different window sizes {sorted(sizes)}")
    window_size = sizes.pop()
    count = max(len(p.windows) for p in plans)
    per_window = []
    for w in range(count):
        used = {p.windows[w].ratio for p in plans if w < len(p.windows)}
        if None in used and len(used) > 1:
            raise PlanError(f"window {w} has ratios {sorted(used, key=str)} across the batch; an uncompressed "
                            "window (ratio None) cannot share a window index with compressed ones")
        # Rows may differ: the window runs the branch of the smallest ratio (the most VST slots) and each row
        # places its own VSTs (slots and counts are data), which is what that row alone computes.
        per_window.append(None if None in used else min(used))
    branch_set = _sort_ratios(check_ratios(ratios) if ratios is not None else per_window)
    missing = sorted({r for r in per_window if r not in branch_set}, key=str)
    if missing:
        raise PlanError(f"the plans use ratios {missing} that are not in the compiled set {list(branch_set)}")

    n_win = _fixed_or(windows, buckets.windows(count), count, "windows")
    p_len = _fixed_or(prefix_size, buckets.text(max(p.prefix for p in plans)), max(p.prefix for p in plans),
                      "prefix tokens")
    s_len = _fixed_or(suffix_size, buckets.text(max(p.suffix for p in plans)), max(p.suffix for p in plans),
                      "suffix tokens")
    spec0 = PrefillSpec(branch_set, window_size, 0)
    worst_kept = max([0] + [spec0.max_kept(r) for r in branch_set])
    # A window's own tokens never enter the buffer: window w writes its kept entries (padded to the widest
    # branch, also for padding windows) at most at p_len + w * worst_kept; the text and decoding follow.
    buffer = p_len + n_win * worst_kept + s_len + max_new_tokens
    spec = PrefillSpec(branch_set, window_size, buffer)

    batch = len(plans)
    arrays = PlanArrays(
        prefix_ids=np.zeros((batch, p_len), np.int32), prefix_len=np.zeros(batch, np.int32),
        suffix_ids=np.zeros((batch, s_len), np.int32), suffix_len=np.zeros(batch, np.int32),
        branch=np.full(n_win, spec.noop_branch, np.int32),
        kept=np.zeros((batch, n_win), np.int32),
        vst_slots=np.zeros((batch, n_win, spec.slot_width), np.int32),
        visual_start=np.zeros((batch, n_win), np.int32))
    for w, r in enumerate(per_window):
        arrays.branch[w] = branch_set.index(r)
    for b, (plan, pre, suf) in enumerate(zip(plans, prefixes, suffixes)):
        arrays.prefix_ids[b, :plan.prefix] = pre
        arrays.prefix_len[b] = plan.prefix
        arrays.suffix_ids[b, :plan.suffix] = suf
        arrays.suffix_len[b] = plan.suffix
        for w, win in enumerate(plan.windows):
            arrays.kept[b, w] = win.kept
            arrays.vst_slots[b, w, :win.num_vst] = win.vst_slots()
            arrays.visual_start[b, w] = win.start - plan.prefix
        # Windows past the row's video start at its end: never read (nothing kept), always in range.
        arrays.visual_start[b, len(plan.windows):] = plan.num_visual
    return arrays, spec

