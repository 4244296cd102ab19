"""`vxl demo`: the main job on the embedded default, end to end, with no outside files.

Builds a tiny seeded random Video-XL model, saves it as an HF checkpoint,
converts it to a vxl_jax checkpoint, generates a short synthetic video, and
runs one uncompressed forward over [prompt | frames | question], printing each
step. The weights are random, so the predicted tokens mean nothing; the path is
the real one.
"""

from __future__ import annotations

import argparse
import os
import shutil
import time

import numpy as np


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="run the end-to-end demo on a tiny random model and a generated video",
                       description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--out", default="demo_out", help="working dir (default demo_out/; its demo files are replaced)")
    p.add_argument("--frames", type=int, default=4, help="number of generated frames (default 4)")
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


def normalise(video: np.ndarray) -> np.ndarray:
    """uint8 [F, H, W, 3] already at the model's size -> CLIP-normalised float32 [F, 3, H, W]."""
    from vxl_jax.conversion.checkpoint import CLIP_MEAN, CLIP_STD
    x = video.astype(np.float32) / 255.0
    x = (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return x.transpose(0, 3, 1, 2)


def _run(args: argparse.Namespace) -> int:
    import jax
    import jax.numpy as jnp

    from vxl_jax.cli.util import peak_rss_mib
    from vxl_jax.conversion.checkpoint import hf_to_jax, load_jax
    from vxl_jax.model import qwen2, videoxl
    from vxl_jax.tiny import write_tiny_checkpoint

    start = time.perf_counter()
    hf_dir, jax_dir = os.path.join(args.out, "hf"), os.path.join(args.out, "jax")
    for d in (hf_dir, jax_dir):
        shutil.rmtree(d, ignore_errors=True)

    cfg = write_tiny_checkpoint(hf_dir, seed=args.seed)
    print(f"1. wrote a tiny random Video-XL checkpoint (HF format, seed {args.seed}) to {hf_dir}")
    stats = hf_to_jax(hf_dir, jax_dir, progress=False)
    print(f"2. converted it to a JAX checkpoint in {jax_dir}: {stats.summary()}")
    params, cfg = load_jax(jax_dir)
    params = jax.tree.map(jnp.asarray, params)

    size = cfg.vision.image_size
    video = synthetic_video(args.frames, size, args.seed)
    print(f"3. generated a {args.frames}-frame {size}x{size} video (a square moving over a gradient)")

    rng = np.random.default_rng(args.seed)
    vocab, eos = cfg.llm.vocab_size, cfg.llm.eos_token_id
    prefix = rng.integers(11, vocab - 32, 14)
    question = rng.integers(11, vocab - 32, 16)
    prompt = np.concatenate([prefix, [videoxl.IMAGE_TOKEN_INDEX], question])
    n_visual = args.frames * cfg.tokens_per_frame
    ids, mask = videoxl.expand_placeholder(prompt, n_visual)

    @jax.jit
    def run(params, pixels, ids, mask):
        feats = videoxl.frame_features(params, cfg, pixels)
        hidden, cache = videoxl.forward(params, cfg, ids, visual_mask=mask, features=feats.reshape(1, -1, feats.shape[-1]))
        return feats, qwen2.logits(params["llm"], cfg.llm, hidden[:, -1]), cache

    t0 = time.perf_counter()
    feats, last_logits, cache = jax.block_until_ready(run(params, normalise(video), ids[None], mask[None]))
    t1 = time.perf_counter()
    feats, last_logits, cache = jax.block_until_ready(run(params, normalise(video), ids[None], mask[None]))
    t2 = time.perf_counter()
    print(f"4. CLIP -> projector -> 2x2 pooling: {feats.shape[0]} frames x {feats.shape[1]} tokens x "
          f"{feats.shape[2]} (mean |x| {float(jnp.abs(feats).mean()):.3f})")
    print(f"5. uncompressed forward over {ids.shape[0]} tokens ({len(prefix)} prefix + {n_visual} visual + "
          f"{len(question)} question): KV cache {tuple(cache.k.shape)} per K and V; "
          f"compile+run {t1 - t0:.2f} s, run {t2 - t1:.3f} s")
    probs = jax.nn.softmax(last_logits[0])
    top = np.argsort(-np.asarray(probs))[:5]
    shown = ", ".join(f"{int(t)}{' (eos)' if t == eos else ''}: {float(probs[t]):.3f}" for t in top)
    print(f"6. next-token top-5 (id: prob) after the question: {shown}")
    print(f"done in {time.perf_counter() - start:.1f} s, peak RSS {peak_rss_mib():,.0f} MiB "
          f"(random weights: the tokens mean nothing, the path is the real one)")
    return 0
