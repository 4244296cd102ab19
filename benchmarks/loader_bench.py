"""Training-loader throughput: records per second through read + sample + crop to 336 + tokenize + batch.

Generates H.264 videos (PyAV) and an annotation file of RECORDS records that
point at them, then times one pass of the loader with 0 and N worker
processes. The first batch (tokenizer load, worker start-up) is timed apart.

    python benchmarks/loader_bench.py --records 200 --frames 32 --workers 0 2 --size 640x360
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

import numpy as np


def make_dataset(root: str, records: int, videos: int, width: int, height: int, seconds: int, fps: int) -> str:
    from vxl_jax.data import video
    from vxl_jax.tiny import write_tiny_checkpoint

    rng = np.random.default_rng(0)
    os.makedirs(os.path.join(root, "media"), exist_ok=True)
    for k in range(videos):
        n = seconds * fps
        base = rng.integers(0, 255, (height // 8, width // 8, 3), np.uint8).repeat(8, 0).repeat(8, 1)
        frames = np.stack([np.roll(base, 4 * f, axis=1) for f in range(n)])
        video.write_test_video(os.path.join(root, "media", f"v{k}.mp4"), frames, fps=fps)
    with open(os.path.join(root, "train.jsonl"), "w") as f:
        for i in range(records):
            conv = [{"from": "human", "value": f"<image>\nWhat happens in clip {i}?"},
                    {"from": "gpt", "value": f"The pattern slides to the right {i % 7} times."}]
            f.write(json.dumps({"id": i, "video": f"v{i % videos}.mp4", "conversations": conv}) + "\n")
    write_tiny_checkpoint(os.path.join(root, "ckpt"))
    return root


def run(cfg) -> tuple[float, float, int]:
    from vxl_jax.data import loader

    t0 = time.perf_counter()
    it = iter(loader.build_dataset(cfg))
    next(it)
    t1 = time.perf_counter()
    batches = 1
    for _ in it:
        batches += 1
    t2 = time.perf_counter()
    seen = it.metrics()["data/records_seen"]
    if hasattr(it, "close"):
        it.close()
    del it
    return t1 - t0, (seen - cfg.batch_size) / (t2 - t1), batches


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=200)
    p.add_argument("--videos", type=int, default=8, help="distinct video files the records point at")
    p.add_argument("--size", default="640x360", help="video frame size WxH (default 640x360)")
    p.add_argument("--seconds", type=int, default=20, help="video length (default 20 s)")
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--frames", type=int, default=32, help="frames sampled per record (default 32)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = p.parse_args()

    from vxl_jax.data import curriculum, loader

    width, height = (int(x) for x in args.size.split("x"))
    with tempfile.TemporaryDirectory() as root:
        make_dataset(root, args.records, args.videos, width, height, args.seconds, args.fps)
        base = loader.LoaderConfig(
            annotations=os.path.join(root, "train.jsonl"), tokenizer=os.path.join(root, "ckpt"),
            media_root=os.path.join(root, "media"), frames=args.frames, batch_size=args.batch_size, num_epochs=1,
            frame_buckets=(10, 20, 40, 80), curriculum=curriculum.paper(100), shard_index=0, shard_count=1)
        print(f"| workers | first batch (s) | records/s after it | batches | ({args.records} records, "
              f"{args.frames} frames of {args.size} -> 336x336, batch {args.batch_size}, {os.cpu_count()} CPUs) |")
        print("|---|---|---|---|---|")
        for w in args.workers:
            first, rate, batches = run(dataclasses.replace(base, num_workers=w))
            print(f"| {w} | {first:.2f} | {rate:.1f} | {batches} | |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
