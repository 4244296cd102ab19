"""`vxl tiny-model`: write a tiny seeded random Video-XL checkpoint in the HF format."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("tiny-model", help="write a tiny seeded random Video-XL checkpoint (HF format)",
                       description="Write a tiny seeded random Video-XL checkpoint in the HF format, with the "
                                   "structure of the golden fixtures (Qwen2 hidden 64, 2 layers; CLIP hidden 32, "
                                   "2 layers, 336 px). Same seed, same bytes.")
    p.add_argument("out_dir", help="output dir")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--config", default="tiny",
                   help="config name in configs/ or path to a vxl_config JSON (default: tiny)")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    from vxl_jax.config import VideoXLConfig
    from vxl_jax.tiny import write_tiny_checkpoint
    cfg = write_tiny_checkpoint(args.out_dir, seed=args.seed, cfg=VideoXLConfig.load(args.config))
    print(f"wrote a random Video-XL checkpoint ({cfg.llm.num_layers}-layer Qwen2, hidden {cfg.llm.hidden_size}; "
          f"{cfg.vision.num_layers}-layer CLIP, hidden {cfg.vision.hidden_size}; seed {args.seed}) to {args.out_dir}")
    return 0
