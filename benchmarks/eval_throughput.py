"""Eval throughput: a generated Video-MME-layout set, each question from scratch vs encode once, ask many.

A random checkpoint of a config (HF layout + the tiny tokenizer), `--videos`
generated H.264 videos with three multiple-choice questions each (Video-MME's
flat JSON layout), and `vxl eval`'s loop (`mcqa.run`) over them in three modes:

  scratch    every question runs CLIP and the whole compressed prefill (before encode-once)
  encode     each video encoded once, its questions asked on the encoding (batch of 1 video)
  batched    `--batch` videos encoded in one prefill, all their questions in one answer call

Each mode first runs on two warm-up videos (compiles), then is timed over the
set: questions per minute and seconds per video. Writes `--out`/eval_throughput.{json,md}.

    python benchmarks/eval_throughput.py --config bench_small --frames 40 --out /tmp/eval_bench
"""

from __future__ import annotations

import argparse
import json
import os
import time


def make_set(root: str, videos: int, frames: int, size: int) -> str:
    from vxl_jax.data import video
    from vxl_jax.data.synthetic import synthetic_video

    os.makedirs(os.path.join(root, "data"), exist_ok=True)
    records = []
    for v in range(videos):
        vid = f"v{v:03d}"
        video.write_test_video(os.path.join(root, "data", f"{vid}.mp4"), synthetic_video(frames, size, seed=v))
        for q in range(3):
            records.append({"video_id": f"{v:03d}", "videoID": vid, "duration": "short", "domain": "synthetic",
                            "sub_category": "synthetic", "task_type": ("Counting", "Object", "Action")[q],
                            "question_id": f"{v:03d}-{q + 1}", "question": f"Question {q + 1} about video {v}?",
                            "options": ["A. red", "B. green", "C. blue", "D. yellow"], "answer": "ABCD"[(v + q) % 4]})
    path = os.path.join(root, "videomme.json")
    with open(path, "w") as f:
        json.dump(records, f)
    return path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="bench_small", help="model config name or path (default bench_small)")
    p.add_argument("--videos", type=int, default=20, help="videos in the set, 3 questions each (default 20)")
    p.add_argument("--frames", type=int, default=40, help="frames sampled per video (default 40)")
    p.add_argument("--ratio", type=int, default=8)
    p.add_argument("--batch", type=int, default=4, help="videos per encode in the batched mode (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--modes", nargs="+", default=["scratch", "encode", "batched"])
    p.add_argument("--out", required=True, help="output folder (the generated set goes to OUT/set)")
    args = p.parse_args()

    import jax.numpy as jnp

    from vxl_jax.config import VideoXLConfig
    from vxl_jax.data import video
    from vxl_jax.eval import mcqa
    from vxl_jax.generate import GREEDY
    from vxl_jax.infer import Answerer
    from vxl_jax.tiny import write_tiny_checkpoint

    os.makedirs(args.out, exist_ok=True)
    ckpt = os.path.join(args.out, "checkpoint")
    if not os.path.exists(os.path.join(ckpt, "config.json")):
        write_tiny_checkpoint(ckpt, seed=0, cfg=VideoXLConfig.load(args.config))
    data = make_set(os.path.join(args.out, "set"), args.videos + 2, args.frames + 7, 128)
    root = os.path.dirname(data) + "/data"
    questions = mcqa.load(data)
    warm, timed = questions[:6], questions[6:]
    answerer = Answerer.load(ckpt, dtype=jnp.float32)
    sampling = video.uniform(args.frames)
    enc_opts = dict(ratio=args.ratio, schedule=None, x2l=None, seed=0)
    ans_opts = dict(max_new_tokens=args.max_new_tokens, decoding=GREEDY, seed=0)
    models = {
        "scratch": (lambda f, t: answerer.ask_frames(f, t, **enc_opts, max_new_tokens=args.max_new_tokens), 1),
        "encode": (mcqa.Asker(lambda fs: answerer.encode_many(fs, **enc_opts),
                              lambda pairs: answerer.answer(pairs, **ans_opts)), 1),
        "batched": (mcqa.Asker(lambda fs: answerer.encode_many(fs, **enc_opts),
                               lambda pairs: answerer.answer(pairs, **ans_opts)), args.batch),
    }
    rows = {}
    for mode in args.modes:
        model, batch = models[mode]
        mcqa.run(warm, model, root, sampling, batch_videos=min(batch, 2))           # compiles
        if mode == "batched":                                                        # the full batch shape too
            mcqa.run(timed[:3 * batch], model, root, sampling, batch_videos=batch)
        t = time.perf_counter()
        results = mcqa.run(timed, model, root, sampling, batch_videos=batch)
        seconds = time.perf_counter() - t
        rows[mode] = {"seconds": seconds, "questions": len(timed), "videos": args.videos,
                      "questions_per_minute": 60 * len(timed) / seconds, "seconds_per_video": seconds / args.videos,
                      "batch_videos": batch, "accuracy": results.summary["accuracy"]}
        print(f"{mode}: {rows[mode]['questions_per_minute']:.1f} questions/min, "
              f"{rows[mode]['seconds_per_video']:.2f} s/video ({seconds:.1f} s)", flush=True)
    lines = [f"{args.config}, {args.videos} videos x 3 questions, {args.frames} frames, ratio {args.ratio}, "
             f"{args.max_new_tokens} new tokens", "", "| mode | videos per encode | questions/min | s per video |",
             "|---|---|---|---|"]
    lines += [f"| {m} | {r['batch_videos']} | {r['questions_per_minute']:.1f} | {r['seconds_per_video']:.2f} |"
              for m, r in rows.items()]
    with open(os.path.join(args.out, "eval_throughput.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(args.out, "eval_throughput.json"), "w") as f:
        json.dump({"config": vars(args), "modes": rows}, f, indent=1)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
