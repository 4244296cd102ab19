"""Host side of a training step: a loader batch -> the compressed sequence's plan and its targets.

The loader (`data/loader.py`) yields aligned, unshifted `input_ids` / `labels`
with one `<image>` (-200) per video row, uint8 frames and a ratio per window.
Here each row is split at its placeholder into prefix and suffix text, its
windows are planned with the batch's ratios, and the labels are shifted into
next-token targets of the rows that produce logits:

    prefix position i  -> labels[i + 1]          (the last one: the <image> slot, never a target)
    visual positions   -> not computed; the last visual token's target, labels of the first
                          suffix token, must be unlabelled (preprocess_qwen always makes it so)
    suffix position j  -> labels of suffix token j + 1 (the last one: none)

so the loss is the original's rotated-label loss over the whole sequence
(TRAIN_FORMAT.md 4b) without running logits over the video. A text-only row
(no placeholder) is all suffix. Padded sizes come from the loader's buckets
(text bucket for the suffix, frame bucket for the windows) and the compiled
ratio set is the curriculum's, so one compilation serves a bucket.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import flax
import jax
import numpy as np

from vxl_jax import parallel
from vxl_jax.compress import packing
from vxl_jax.compress.packing import PlanArrays, PrefillSpec
from vxl_jax.compress.plan import make_plan
from vxl_jax.config import VideoXLConfig
from vxl_jax.data.prompts import IGNORE_INDEX
from vxl_jax.model.videoxl import IMAGE_TOKEN_INDEX

PREFIX_MULTIPLE = 32  # the prefix (system turn up to <image>) is padded to a multiple of this


@flax.struct.dataclass
class TrainInputs:
    plan: PlanArrays
    visual: np.ndarray            # [B, F, C, H, W] uint8 frames (F: whole windows), or features [B, W*window, D]
    prefix_targets: np.ndarray    # [B, P] int32, IGNORE_INDEX where no loss
    suffix_targets: np.ndarray    # [B, S] int32


@dataclasses.dataclass(frozen=True)
class Prepared:
    inputs: TrainInputs
    spec: PrefillSpec
    tokens: int                   # real text + visual tokens of the batch (for tokens/s)
    targets: int                  # labelled tokens


def _row(ids: np.ndarray, labels: np.ndarray, row: int):
    where = np.flatnonzero(ids == IMAGE_TOKEN_INDEX)
    shifted = np.append(labels[1:], IGNORE_INDEX).astype(np.int32)
    shifted[shifted < 0] = IGNORE_INDEX
    if len(where) == 0:
        return ids[:0], ids, shifted[:0], shifted
    if len(where) > 1:
        raise ValueError(f"row {row}: {len(where)} <image> placeholders; a training row holds one video")
    i = int(where[0])
    if i + 1 < len(labels) and labels[i + 1] >= 0:
        raise ValueError(f"row {row}: the token right after <image> carries a label; its logit would come "
                         "from the last visual token, which training does not compute (label it -100)")
    prefix_targets = shifted[:i].copy()
    if i:
        prefix_targets[-1] = IGNORE_INDEX            # the <image> slot
    return ids[:i], ids[i + 1:], prefix_targets, shifted[i + 1:]


def prepare(batch: dict, cfg: VideoXLConfig, ratios: Sequence[int], *,
            prefix_size: Optional[int] = None) -> Prepared:
    """Plans a loader batch (see `data.loader.collate`) for `train.loss`; `ratios` is the compiled set."""
    input_ids, labels = np.asarray(batch["input_ids"]), np.asarray(batch["labels"])
    text_mask = np.asarray(batch["text_mask"], bool)
    frames, num_frames = np.asarray(batch["frames"]), np.asarray(batch["num_frames"])
    window, per_frame = cfg.vst.window, cfg.tokens_per_frame
    if window % per_frame:
        raise ValueError(f"a window of {window} tokens is not whole frames of {per_frame} tokens")
    frames_per_window = window // per_frame
    n_win = np.asarray(batch["ratios"]).shape[1]
    if frames.shape[1] != n_win * frames_per_window:
        raise ValueError(f"batch has {frames.shape[1]} frame slots for {n_win} windows of {frames_per_window} "
                         f"frames; the loader's window and tokens_per_frame must match the model's")
    plans, prefixes, suffixes, p_targets, s_targets = [], [], [], [], []
    for b in range(input_ids.shape[0]):
        n = int(text_mask[b].sum())
        prefix, suffix, pt, st = _row(input_ids[b, :n], labels[b, :n], b)
        has_video = bool((input_ids[b, :n] == IMAGE_TOKEN_INDEX).any())
        visual = int(num_frames[b]) * per_frame if has_video else 0
        count = -(-visual // window)
        plans.append(make_plan(len(prefix), visual, len(suffix), [int(r) for r in batch["ratios"][b, :count]],
                               window=window))
        prefixes.append(prefix)
        suffixes.append(suffix)
        p_targets.append(pt)
        s_targets.append(st)
    longest = max(len(p) for p in prefixes)
    p_size = prefix_size or max(PREFIX_MULTIPLE, -(-longest // PREFIX_MULTIPLE) * PREFIX_MULTIPLE)
    arrays, spec = packing.pack(plans, prefixes, suffixes, ratios=tuple(sorted(set(ratios))),
                                prefix_size=p_size, suffix_size=input_ids.shape[1], windows=n_win)
    prefix_targets = np.full((len(plans), p_size), IGNORE_INDEX, np.int32)
    suffix_targets = np.full((len(plans), input_ids.shape[1]), IGNORE_INDEX, np.int32)
    for b, (pt, st) in enumerate(zip(p_targets, s_targets)):
        prefix_targets[b, :len(pt)] = pt
        suffix_targets[b, :len(st)] = st
    tokens = int(text_mask.sum()) + int(num_frames.sum()) * per_frame
    targets = int((prefix_targets >= 0).sum() + (suffix_targets >= 0).sum())
    return Prepared(TrainInputs(arrays, frames, prefix_targets, suffix_targets), spec, tokens, targets)


def to_global(inputs: TrainInputs, mesh, *, abstract: bool = False) -> TrainInputs:
    """This process's rows on the mesh: rows over (data, fsdp); the per-window branch [W] replicated.
    `abstract`: the same as `jax.ShapeDtypeStruct`s with those shardings (to compile for a mesh without devices).

    With several processes the branch is agreed on: each window runs the smallest index any process
    chose, i.e. the smallest ratio (branches are sorted by ratio; no-op last), which holds every row's
    VSTs (instance-random rows differ across processes as they do within one, `packing.pack`).
    """
    branch = inputs.plan.branch
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        branch = np.asarray(multihost_utils.process_allgather(np.asarray(branch))).min(axis=0).astype(branch.dtype)
    rows = parallel.host_to_global(inputs.replace(plan=inputs.plan.replace(branch=None)), mesh, abstract=abstract)
    branch = parallel.host_to_global(branch, mesh, replicated=True, abstract=abstract)
    return rows.replace(plan=rows.plan.replace(branch=branch))
