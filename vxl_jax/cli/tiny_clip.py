"""`vxl tiny-clip`: write a tiny seeded random CLIPModel checkpoint (HF format, with a tokenizer)."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    p = sub.add_parser("tiny-clip", help="write a tiny seeded random CLIPModel checkpoint (HF format)",
                       description="Write a tiny seeded random HF CLIPModel checkpoint (text hidden 32, 2 layers; "
                                   "vision hidden 32, 2 layers, 224 px, patch 32; projection 16) with a tiny BPE "
                                   "tokenizer beside it, for the CLIP relevance oracle's offline tests and demos. "
                                   "Same seed, same bytes.")
    p.add_argument("out_dir", help="output dir")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.set_defaults(run=_run)


def _run(args: argparse.Namespace) -> int:
    from vxl_jax.conversion.clip_model import write_tiny_clip
    cfg = write_tiny_clip(args.out_dir, seed=args.seed)
    print(f"wrote a random CLIPModel checkpoint (text {cfg.text.num_layers} layers, hidden {cfg.text.hidden_size}; "
          f"vision {cfg.vision.num_layers} layers, hidden {cfg.vision.hidden_size}, {cfg.vision.image_size} px; "
          f"projection {cfg.projection_dim}; seed {args.seed}) to {args.out_dir}")
    return 0
