"""`vxl demo`: the main job on the embedded default, end to end, with no outside files.

Builds a tiny seeded random Video-XL model with its tokenizer, saves it as an
HF checkpoint, converts it to a vxl_jax checkpoint, writes a short synthetic
H.264 video, and asks a question about it through the same path as `vxl
infer`: decord reading, CLIP preprocessing, chat template, compressed prefill
and decoding. The weights are random, so the answer means nothing; the path is
the real one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time

import numpy as np


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the end-to-end demo on a tiny random model and a generated video",
                       description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--out", default="demo_out", help="working dir (default demo_out/; its demo files are replaced)")
    p.add_argument("--frames", type=int, default=20, help="number of frames of the generated video (default 20)")
    p.add_argument("--ratio", type=int, default=4, help="compression ratio (default 4)")
    p.add_argument("--question", default="What moves across the video?", help="the question to ask")
    p.add_argument("--max-new-tokens", type=int, default=12, help="tokens to generate (default 12)")
    p.add_argument("--seed", type=int, default=0, help="seed of the model and the video (default 0)")
    p.set_defaults(run=_run)

def synthetic_video(frames: int, size: int, seed: int) -> np.ndarray:
    """uint8 [F, size, size, 3]: a coloured square moving over a gradient, plus a little noise."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    video = np.empty((frames, size, size, 3), np.uint8)
    for f in range(frames):
        img = np.stack([x, y, 1 - x], axis=-1) * 160
        c = int((f + 1) * size / (frames + 1))
        img[max(0, c - 40):c + 40, max(0, c - 40):c + 40] = (240, 60, 30)
        video[f] = np.clip(img + rng.normal(0, 8, img.shape), 0, 255).astype(np.uint8)
    return video


def _run(args: argparse.Namespace) -> int:
    from vxl_jax.cli.util import peak_rss_mib
    from vxl_jax.conversion.checkpoint import hf_to_jax
    from vxl_jax.data import video
    from vxl_jax.infer import Answerer
    from vxl_jax.tiny import write_tiny_checkpoint

    start = time.perf_counter()
    hf_dir, jax_dir = os.path.join(args.out, "hf"), os.path.join(args.out, "jax")
    video_path = os.path.join(args.out, "demo.mp4")
    for d in (hf_dir, jax_dir):
        shutil.rmtree(d, ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)

    write_tiny_checkpoint(hf_dir, seed=args.seed)
    print(f"1. wrote a tiny random Video-XL checkpoint with its tokenizer (HF format, seed {args.seed}) to {hf_dir}")
    stats = hf_to_jax(hf_dir, jax_dir, progress=False)
    print(f"2. converted it to a JAX checkpoint in {jax_dir}: {stats.summary()}")
    video.write_test_video(video_path, synthetic_video(args.frames, 224, args.seed), fps=8)
    print(f"3. wrote a {args.frames}-frame 224x224 H.264 video (a square moving over a gradient) to {video_path}")

    def progress(message: str) -> None:
        print(f"   {message}", flush=True)

    print(f"4. vxl infer --checkpoint {jax_dir} --video {video_path} --frames {args.frames} --ratio {args.ratio}")
    answerer = Answerer.load(jax_dir, progress=progress)
    answer = answerer.ask(video_path, args.question, sampling=video.uniform(args.frames), ratio=args.ratio,
                          max_new_tokens=args.max_new_tokens, progress=progress)
    print(f"5. Q: {args.question}")
    print(f"   A: {answer.text!r} (ids {answer.token_ids.tolist()})")
    print(f"done in {time.perf_counter() - start:.1f} s, peak RSS {peak_rss_mib():,.0f} MiB "
          f"(random weights: the answer means nothing, the path is the real one)")
    sys.stdout.flush()
    return 0
