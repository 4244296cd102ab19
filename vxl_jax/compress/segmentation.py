"""Scene-change segmentation for the dynamic schedule (Video-XL, "dynamic compression").

Neighbouring frames' features give similarities s_i = cos(f_i, f_(i+1)),
i = 0..F-2 (s_i sits between frame i and frame i+1). The depth score of a
gap is how far its similarity dips below the highest similarity on each side:

    d_i = max(s_0..s_(i-1)) + max(s_(i+1)..s_(F-2)) - 2 s_i

(an empty side counts as s_i itself, so the first and last gaps only see one
side). Gaps whose depth is a local peak and exceeds `threshold` are cut
candidates; the deepest are taken first as long as every interval keeps at
least `min_frames`; intervals longer than `max_frames` are then split evenly
(the window holds at most that many frames).

All numpy, on the host: the result is a list of interval lengths in frames.
"""

from __future__ import annotations

import numpy as np


def neighbour_similarity(features: np.ndarray) -> np.ndarray:
    """[F, D] per-frame features -> [F - 1] cosine similarity of each frame with the next."""
    f = np.asarray(features, np.float64)
    if f.ndim != 2:
        raise ValueError(f"frame features are [frames, dim], got shape {f.shape}")
    f = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    return np.sum(f[:-1] * f[1:], axis=1)


def depth_scores(similarity: np.ndarray) -> np.ndarray:
    """[n] similarities -> [n] depth scores (module docstring)."""
    s = np.asarray(similarity, np.float64)
    if s.size == 0:
        return s
    left = np.maximum.accumulate(np.concatenate([[-np.inf], s[:-1]]))          # max(s_0..s_(i-1))
    right = np.maximum.accumulate(np.concatenate([s[1:], [-np.inf]])[::-1])[::-1]  # max(s_(i+1)..)
    left = np.where(np.isfinite(left), left, s)
    right = np.where(np.isfinite(right), right, s)
    return left + right - 2.0 * s


def _peaks(depth: np.ndarray) -> np.ndarray:
    """Indices that are local maxima (>= both neighbours; ends compare with their one neighbour)."""
    padded = np.concatenate([[-np.inf], depth, [-np.inf]])
    return np.flatnonzero((depth >= padded[:-2]) & (depth >= padded[2:]))


def split_evenly(length: int, max_frames: int) -> list[int]:
    """An interval of `length` frames as ceil(length / max_frames) near-equal parts (longer ones first)."""
    parts = -(-length // max_frames)
    base, extra = divmod(length, parts)
    return [base + 1] * extra + [base] * (parts - extra)


def segment(features: np.ndarray, *, threshold: float, min_frames: int = 1, max_frames: int) -> list[int]:
    """Interval lengths in frames (they add up to F) of a video's per-frame features [F, D]."""
    num = len(features)
    if num == 0:
        return []
    if not 1 <= min_frames <= max_frames:
        raise ValueError(f"need 1 <= min_frames <= max_frames, got {min_frames} and {max_frames}")
    depth = depth_scores(neighbour_similarity(features))
    candidates = [i for i in _peaks(depth) if depth[i] > threshold]
    cuts: list[int] = []                       # a cut at gap i: a new interval starts at frame i + 1
    for i in sorted(candidates, key=lambda i: (-depth[i], i)):
        edges = sorted(cuts + [i + 1])
        bounds = [0, *edges, num]
        if min(b - a for a, b in zip(bounds[:-1], bounds[1:])) >= min_frames:
            cuts = edges
    bounds = [0, *cuts, num]
    out: list[int] = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        out += split_evenly(b - a, max_frames)
    return out
