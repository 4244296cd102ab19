"""`vxl fixture-check`: run a golden case of the original implementation and compare every array."""

from __future__ import annotations

import argparse
import pathlib
import sys


def add_parser(sub) -> None:
    p = sub.add_parser(
        "fixture-check", help="compare against a golden case of the original PyTorch Video-XL",
        description="Load an HF Video-XL checkpoint (appending resize_rows.npz rows when present), rebuild the "
                    "pixels of a golden case (inputs.npz, meta.json, expected.npz; format: "
                    "fixtures/videoxl_tiny/FORMAT.md), run frame features -> compressed prefill -> greedy "
                    "decode with the case's ratio and frame count, and print one row per expected array with "
                    "the max abs difference and pass/fail. Exits 1 if any array fails. Runs in float32 with "
                    "matmul precision 'highest'.")
    p.add_argument("case_dir", type=pathlib.Path, help="case folder (e.g. fixtures/videoxl_tiny/r4_25f)")
    p.add_argument("--checkpoint", required=True, type=pathlib.Path,
                   help="HF checkpoint folder of the case (e.g. fixtures/videoxl_tiny/ckpt_A)")
    p.add_argument("--stream-frames", action="store_true",
                   help="compute the visual tokens window by window inside the prefill scan from uint8 frames "
                        "(the long-video path) instead of from precomputed features")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    for path, what in ((args.case_dir, "case"), (args.checkpoint, "checkpoint")):
        if not path.is_dir():
            raise FileNotFoundError(f"{what} folder {path} does not exist")
    for name in ("inputs.npz", "expected.npz", "meta.json"):
        if not (args.case_dir / name).is_file():
            raise FileNotFoundError(f"{args.case_dir} has no {name}; is it a golden case folder?")
    import jax
    jax.config.update("jax_default_matmul_precision", "highest")
    from vxl_jax import golden
    rows, _ = golden.run_case(args.case_dir, args.checkpoint, stream_frames=args.stream_frames)
    print(golden.format_table(rows))
    failed = [r.name for r in rows if not r.ok]
    compared = sum(1 for r in rows if not r.note.startswith("no counterpart"))
    if failed:
        print(f"FAIL: {len(failed)} of {compared} arrays: {', '.join(failed)}", file=sys.stderr)
        return 1
    print(f"pass: {compared} arrays within tolerance ({args.case_dir.name})")
    return 0
