"""Relevance oracles: how much each chunk of a video matters to a question, and top-k selection.

An oracle is any callable `oracle(query: Query) -> np.ndarray [chunks]` of
scores (higher: more relevant); `select` turns scores into the chunks that get
their L-KV entries. Built in:

- `attention(embed_tokens)`: the LLM's own view. The question is its mean
  token embedding q; each frame's feature f_j is its mean visual token after
  the projector (what the LLM reads). Frame relevance is the attention weight
  softmax_j(q . f_j / sqrt(D)); a chunk scores the mean of its frames.
- `clip(model)`: CLIP-style retrieval, cosine similarity between the
  question's text embedding and each frame's image embedding
  (`conversion.clip_model.ClipModel`), averaged per chunk.
- baselines from the paper: `uniform(k)` (k chunks at equal intervals),
  `last()` (the last chunks), `random()` (from the query's PRNG key).

All are deterministic functions of their inputs (random: of the key).
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Query:
    """What an oracle may look at for one question about one video."""

    question: str                              # the question text
    question_ids: np.ndarray                   # its LLM token ids (no chat template)
    chunk_frames: tuple[tuple[int, int], ...]  # per chunk: (first frame, frames)
    frame_features: np.ndarray                 # [F, D] each frame's mean visual token (after the projector)
    frames: Optional[np.ndarray] = None        # uint8 [F, H, W, 3] or [F, 3, H, W], when kept
    key: Optional[jax.Array] = None

    @property
    def num_chunks(self) -> int:
        return len(self.chunk_frames)


Oracle = Callable[[Query], np.ndarray]


def per_chunk(frame_scores: np.ndarray, chunk_frames: Sequence[tuple[int, int]]) -> np.ndarray:
    """Mean of the frame scores inside each chunk."""
    return np.asarray([float(np.mean(frame_scores[a:a + n])) for a, n in chunk_frames], np.float64)


def attention(embed_tokens: np.ndarray) -> Oracle:
    """The LLM attention oracle; `embed_tokens` [V, D] is the LLM's input embedding table."""
    table = np.asarray(embed_tokens, np.float32)

    def oracle(query: Query) -> np.ndarray:
        ids = np.asarray(query.question_ids).reshape(-1)
        if ids.size == 0:
            raise ValueError("the attention oracle needs the question's token ids")
        q = table[ids].astype(np.float64).mean(axis=0)
        f = np.asarray(query.frame_features, np.float64)
        logits = f @ q / np.sqrt(f.shape[-1])
        weights = np.exp(logits - logits.max())
        return per_chunk(weights / weights.sum(), query.chunk_frames)

    return oracle


def clip(model, *, reduce: str = "mean") -> Oracle:
    """The CLIP retrieval oracle: model.embed_text([question]) vs model.embed_frames(frames), cosine."""
    if reduce not in ("mean", "max"):
        raise ValueError(f"reduce is 'mean' or 'max', got {reduce!r}")

    def oracle(query: Query) -> np.ndarray:
        if query.frames is None:
            raise ValueError("the CLIP oracle needs the video's frames (keep them in the query)")
        frames = np.asarray(query.frames)
        if frames.ndim == 4 and frames.shape[1] == 3 and frames.shape[-1] != 3:
            frames = frames.transpose(0, 2, 3, 1)                 # [F, 3, H, W] -> [F, H, W, 3]
        text = np.asarray(model.embed_text([query.question]), np.float64)[0]
        image = np.asarray(model.embed_frames(frames), np.float64)
        cos = image @ text / (np.linalg.norm(image, axis=1) * np.linalg.norm(text) + 1e-12)
        if reduce == "mean":
            return per_chunk(cos, query.chunk_frames)
        return np.asarray([float(np.max(cos[a:a + n])) for a, n in query.chunk_frames], np.float64)

    return oracle


def uniform(k: int) -> Oracle:
    """Scores 1 for k chunks at equal intervals over the video (first and last included when k > 1), else 0."""
    def oracle(query: Query) -> np.ndarray:
        n = query.num_chunks
        scores = np.zeros(n)
        if n and k > 0:
            scores[np.unique(np.round(np.linspace(0, n - 1, min(k, n))).astype(int))] = 1.0
        return scores

    return oracle


def last() -> Oracle:
    """Later chunks score higher: top-k is the last k chunks."""
    return lambda query: np.arange(query.num_chunks, dtype=np.float64)


def random() -> Oracle:
    """Uniform random scores from the query's key (an explicit key: reproducible)."""
    def oracle(query: Query) -> np.ndarray:
        if query.key is None:
            raise ValueError("the random oracle needs an explicit PRNG key")
        return np.asarray(jax.random.uniform(query.key, (query.num_chunks,)), np.float64)

    return oracle


def select(scores: Sequence[float], k: int, *, force_first: bool = False, force_last: bool = False) -> np.ndarray:
    """bool [chunks]: the k best-scoring chunks (ties: the earlier), plus the first/last chunk when forced."""
    scores = np.asarray(scores, np.float64)
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if np.isnan(scores).any():
        raise ValueError("relevance scores contain NaN")
    n = len(scores)
    chosen = np.zeros(n, bool)
    if n == 0:
        return chosen
    forced = [i for i, f in ((0, force_first), (n - 1, force_last)) if f]
    chosen[forced] = True
    order = [i for i in np.lexsort((np.arange(n), -scores)) if not chosen[i]]
    chosen[order[:k]] = True
    return chosen
