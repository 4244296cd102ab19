"""Golden cases of the original implementation: run one through our pipeline and compare every array.

A case directory holds `inputs.npz`, `expected.npz` and `meta.json` in the
format of `fixtures/videoxl_tiny/FORMAT.md`: a compressed case ("beacon",
`meta.json` has `beacon_ratio`) or an uncompressed one (`expected.npz` has
`keys`). The run is the library's own path: frame features -> `pipeline.prepare`
-> compiled prefill -> compiled greedy decode.
"""

from __future__ import annotations

import dataclasses
import json
import re
import pathlib
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

from vxl_jax.compress import schedules
from vxl_jax.compress.memory import pre_rope_keys
from vxl_jax.config import VideoXLConfig
from vxl_jax.conversion.checkpoint import generation_eos_ids, read_hf
from vxl_jax.model import projector, qwen2, videoxl
from vxl_jax import pipeline

# FORMAT.md section 7: float32 port tolerances.
FEATURE_TOL = 1e-5
LOGIT_KV_TOL = 1e-4
FEATURE_ARRAYS = {"image_features", "clip_select_layer_patch_first2", "projector_out_prepool_first2"}


@dataclasses.dataclass(frozen=True)
class Row:
    name: str
    shape: tuple
    max_diff: Optional[float]   # None for integer arrays (exact comparison)
    tolerance: Optional[float]
    ok: bool
    note: str = ""


def load_checkpoint(ckpt_dir) -> tuple[dict, VideoXLConfig, dict]:
    """The HF checkpoint as JAX params; rows of `resize_rows.npz` are appended when present.

    Returns (params, cfg, ids) where ids has the placeholder and VST ids the
    original used with this vocabulary (FORMAT.md 2.3).
    """
    ckpt_dir = pathlib.Path(ckpt_dir)
    params, cfg, _ = read_hf(str(ckpt_dir))
    params = jax.tree.map(jnp.asarray, params)
    vocab = cfg.llm.vocab_size
    rows = ckpt_dir / "resize_rows.npz"
    if rows.is_file():
        extra = np.load(rows)
        params["llm"] = qwen2.extend_vocab(params["llm"], extra["embed_tokens_row"], extra["lm_head_row"])
        vocab += extra["embed_tokens_row"].shape[0]
    return params, cfg, {"placeholder": vocab - 1, "vst": vocab}


def _eos_ids(ckpt_dir: pathlib.Path, meta: dict) -> tuple[int, ...]:
    if "eos_token_id" not in meta:
        return generation_eos_ids(str(ckpt_dir))
    eos = meta["eos_token_id"]
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _ratio(meta: dict) -> int:
    r = meta["beacon_ratio"]
    if isinstance(r, list):
        if len(r) != 1:
            raise ValueError(f"beacon_ratio {r}: a golden case needs one fixed ratio (the original's "
                             "multi-ratio draw is not reproducible)")
        r = r[0]
    return int(r)


def run_case(case_dir, ckpt_dir, *, stream_frames: bool = False,
             loaded: Optional[tuple] = None) -> tuple[list[Row], dict]:
    """Runs a case and compares; returns (rows, our arrays by expected name)."""
    case_dir, ckpt_dir = pathlib.Path(case_dir), pathlib.Path(ckpt_dir)
    params, cfg, ids = loaded or load_checkpoint(ckpt_dir)
    inputs = dict(np.load(case_dir / "inputs.npz"))
    expected = dict(np.load(case_dir / "expected.npz"))
    meta = json.loads((case_dir / "meta.json").read_text())
    ids = {"placeholder": meta.get("placeholder_token_id", ids["placeholder"]),
           "vst": meta.get("beacon_token_id", ids["vst"])}

    pixel_u8 = inputs["pixel_u8"]
    pixels = (pixel_u8.astype(np.float32) - 128.0) / 64.0           # FORMAT.md section 3
    prompt = inputs["input_ids"].reshape(-1)
    prefix, suffix = videoxl.split_prompt(prompt)
    ours: dict = {}

    clip_out = videoxl.clip_features(params, cfg, pixels[:2])
    ours["clip_select_layer_patch_first2"] = clip_out
    ours["projector_out_prepool_first2"] = projector.project(params["projector"], clip_out)
    feats = videoxl.frame_features(params, cfg, pixels)
    ours["image_features"] = feats

    compressed = "beacon_ratio" in meta
    schedule = schedules.fixed(_ratio(meta)) if compressed else schedules.uncompressed()
    max_new = int(expected["generated_ids"].shape[-1]) if "generated_ids" in expected else 1
    visual = pixel_u8 if stream_frames else np.asarray(feats)
    prepared = pipeline.prepare(cfg, [prompt], [visual], schedule, max_new_tokens=max_new)
    norm = (np.full(3, 128.0), np.full(3, 64.0)) if stream_frames else None
    result, gen = pipeline.run(params, cfg, prepared, max_new_tokens=max_new, pixel_norm=norm,
                               eos_ids=_eos_ids(ckpt_dir, meta), return_logits=True)
    plan = prepared.plans[0]
    n_suffix = len(suffix)
    suffix_logits = qwen2.logits(params["llm"], cfg.llm, result.suffix_hidden[0, :n_suffix])
    ours["last_logits"] = result.last_logits
    k, v = result.memory.row(0)                                       # [L, S, K, H], keys rotated
    k = pre_rope_keys(k, cfg.llm.rope_theta)                          # the original caches keys before RoPE
    to_fixture = lambda x: x.transpose(0, 2, 1, 3)                    # -> [L, K, S, H]
    kept_total = int(result.memory.length[0]) - len(prefix) - n_suffix

    if not compressed:
        ours["all_logits_suffix"] = suffix_logits
        ours["keys"], ours["values"] = to_fixture(k), to_fixture(v)
    else:
        n_gen = int(gen.num_tokens[0])
        ours["last_window_logits"] = suffix_logits
        ours["generated_ids"] = np.asarray(gen.tokens[:, :n_gen])
        ours["step_logits"] = gen.step_logits[0, :n_gen]
        expanded, _ = videoxl.expand_placeholder(prompt, plan.num_visual, ids["placeholder"])
        ours["generated_sequence"] = np.concatenate([expanded, ours["generated_ids"][0]])[None]
        p, m = len(prefix), kept_total
        for part, sl in (("sink", slice(0, p)), ("beacon", slice(p, p + m)), ("raw", slice(p + m, p + m + n_suffix))):
            ours[f"{part}_keys"], ours[f"{part}_values"] = to_fixture(k[:, sl]), to_fixture(v[:, sl])
        # Per-step ids and positions: the fed tokens come from the plan the prefill ran; the memory sizes
        # each step started from come from the compiled run itself.
        before = np.asarray(result.memory_before[:len(plan.windows), 0])
        after_windows = int(result.memory.length[0]) - n_suffix
        ours["all_beacon_sizes"] = np.array([0, *np.diff(np.append(before, after_windows)), 0])
        steps = [(prefix, 0)]
        for w, mem in zip(plan.windows, before):
            steps.append((np.where(w.interleaved() == -1, ids["vst"], ids["placeholder"]), int(mem)))
        steps.append((suffix, after_windows))
        for s, (fed, mem) in enumerate(steps):
            ours[f"step{s}_input_ids"] = fed
            ours[f"step{s}_position_ids"] = np.arange(mem + len(fed))
            ours[f"step{s}_beacon_indices"] = (fed == ids["vst"]).astype(np.int64)

    return compare(expected, ours), ours


def compare(expected: dict, ours: dict) -> list[Row]:
    rows = []
    for name in sorted(expected, key=_order):
        want = np.asarray(expected[name])
        if name not in ours:
            rows.append(Row(name, want.shape, None, None, True, "no counterpart: not compared"))
            continue
        got = np.asarray(ours[name])
        if got.shape != want.shape:
            rows.append(Row(name, want.shape, None, None, False, f"shape {got.shape} != expected {want.shape}"))
        elif np.issubdtype(want.dtype, np.integer):
            bad = int(np.sum(got != want))
            rows.append(Row(name, want.shape, None, None, bad == 0, "exact" if bad == 0 else f"{bad} differ"))
        else:
            tol = FEATURE_TOL if name in FEATURE_ARRAYS else LOGIT_KV_TOL
            diff = float(np.abs(got.astype(np.float64) - want).max()) if want.size else 0.0
            rows.append(Row(name, want.shape, diff, tol, bool(diff <= tol)))
    return rows


def _order(name: str):
    step = re.fullmatch(r"step(\d+)_(.*)", name)
    return (1, int(step[1]), step[2]) if step else (0, 0, name)


def format_table(rows: list[Row]) -> str:
    lines = [f"{'array':34s} {'shape':18s} {'max |diff|':>11s} {'tol':>7s}  result"]
    for r in rows:
        diff = "-" if r.max_diff is None else f"{r.max_diff:.2e}"
        tol = "exact" if r.tolerance is None else f"{r.tolerance:.0e}"
        status = "pass" if r.ok else "FAIL"
        if r.note.startswith("no counterpart"):
            status = "skip"
        lines.append(f"{r.name:34s} {str(r.shape):18s} {diff:>11s} {tol:>7s}  {status}"
                     + (f"  ({r.note})" if r.note and r.note != "exact" else ""))
    return "\n".join(lines)
