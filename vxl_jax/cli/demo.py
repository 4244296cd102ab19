"""`vxl demo`: the main job on the embedded default, end to end, with no outside files.

Generates a small synthetic video QA set ("What color is the first frame?"
about H.264 videos whose later frames are grey with a shape of another colour),
trains a tiny Video-XL from scratch on it on 8 simulated CPU devices with the
curriculum's random compression ratios (`vxl train --config tiny_synthetic`),
checks that the loss fell, exports the model to the HF Video-XL format,
converts that back to a vxl_jax checkpoint, and answers questions about
held-out videos with the `vxl infer` path (decord, CLIP preprocessing, chat
template, compressed prefill, decoding), against a chance of 1 in 6.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time

import numpy as np


QUESTION_NAMES = {"first": "a first-frame colour", "last": "a last-frame colour", "shape": "a shape"}


def add_parser(sub) -> None:
    p = sub.add_parser("demo", help="train a tiny model on a generated video QA set, export it, answer questions",
                       description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--out", default="demo_out", help="working dir (default demo_out/; its demo files are replaced)")
    p.add_argument("--steps", type=int, default=100, help="training steps (default 100)")
    p.add_argument("--devices", type=int, default=8, help="simulated CPU devices for training (default 8)")
    p.add_argument("--ratio", type=int, default=4, help="compression ratio when answering (default 4)")
    p.add_argument("--questions", type=int, default=16, help="held-out questions to answer (default 16)")
    p.set_defaults(run=_run)


def _train(workdir: str, steps: int, devices: int) -> None:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip())
    cmd = [sys.executable, "-m", "vxl_jax.cli.main", "train", "--config", "tiny_synthetic", "--workdir", workdir,
           "--set", f"max_steps={steps}", "--set", f"save_every={steps}"]
    # Every step goes to metrics.jsonl; a line per step would flood the terminal.
    cmd += ["--set", f"print_every={max(1, steps // 10)}"]
    subprocess.run(cmd, check=True, env=env)


def _run(args: argparse.Namespace) -> int:
    from vxl_jax.cli.util import peak_rss_mib
    from vxl_jax.conversion.checkpoint import hf_to_jax
    from vxl_jax.data import records, synthetic, video
    from vxl_jax.infer import Answerer
    from vxl_jax.train.metrics import read_jsonl

    start = time.perf_counter()
    train_dir, jax_dir = os.path.join(args.out, "train"), os.path.join(args.out, "jax")
    for d in (train_dir, jax_dir):
        shutil.rmtree(d, ignore_errors=True)
    os.makedirs(args.out, exist_ok=True)

    print(f"1. vxl train --config tiny_synthetic --workdir {train_dir} --set max_steps={args.steps} "
          f"({args.devices} simulated CPU devices)", flush=True)
    _train(train_dir, args.steps, args.devices)
    rows = read_jsonl(os.path.join(train_dir, "metrics.jsonl"))
    losses = np.array([r["loss"] for r in rows], np.float64)
    k = max(1, len(losses) // 4)
    first, last = float(losses[:k].mean()), float(losses[-k:].mean())
    every = max(1, len(rows) // 10)
    shown = rows[:1] + rows[every - 1::every]
    print("2. loss by step: " + ", ".join(f"{r['step']}: {r['loss']:.3f}" for r in shown), flush=True)
    print(f"   mean of the first {k} steps {first:.3f} -> last {k}: {last:.3f}")
    if not last < first:
        print("vxl demo: error: the loss did not fall", file=sys.stderr)
        return 1

    export = os.path.join(train_dir, "export_hf")
    stats = hf_to_jax(export, jax_dir, progress=False)
    print(f"3. exported to HF format ({export}) and converted back to JAX ({jax_dir}): {stats.summary()}")

    data_dir = os.path.join(train_dir, "data")
    held_out = records.load_annotations(os.path.join(data_dir, "eval.jsonl"))[:args.questions]
    videos = list(dict.fromkeys(r["video"] for r in held_out))
    answerer = Answerer.load(jax_dir)
    print(f"4. vxl infer on {len(videos)} held-out videos ({len(held_out)} questions; 8 frames, ratio {args.ratio}):")
    # Each video is encoded once (one batched compressed prefill), then all questions are answered in one batch.
    encoded = dict(zip(videos, answerer.encode_many([os.path.join(data_dir, v) for v in videos],
                                                    sampling=video.uniform(8), ratio=args.ratio)))
    questions = [r["conversations"][0]["value"].replace("<image>\n", "") for r in held_out]
    answers = answerer.answer([(encoded[r["video"]], q) for r, q in zip(held_out, questions)], max_new_tokens=6)
    right = 0
    for record, question, answer in zip(held_out, questions, answers):
        got = answer.text.strip()
        right += got == record["answer"]
        print(f"   {record['video']}: {question!r} -> {got!r} (truth {record['answer']!r})")
    # Chance: guessing uniformly among the possible answers of each question.
    options = {q: len(synthetic.SHAPES if q == "shape" else synthetic.PALETTE) for q in synthetic.QUESTIONS}
    kinds = dict.fromkeys(r["question_type"] for r in held_out)
    chance = sum(1 / options[r["question_type"]] for r in held_out)
    print(f"   {right}/{len(held_out)} right; guessing would get {chance:.1f} on average ("
          + ", ".join(f"1 in {options[q]} for {QUESTION_NAMES[q]}" for q in kinds) + ")")
    print(f"done in {time.perf_counter() - start:.1f} s, peak RSS of this process {peak_rss_mib():,.0f} MiB")
    sys.stdout.flush()
    return 0
