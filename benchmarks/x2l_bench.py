"""Video-X2L benchmark: cache size and time to first token of selective re-loading against all-L and all-H.

Random weights of a config (`bench_small` on CPU), random uint8 frames, a
14-token prefix and a 16-token question. The video is encoded once at both
levels (one scan, CLIP once). Then, per memory choice, after one warm-up run
(which compiles), the median over `--repeats` of the time to first token:
merge the selected entries (on device, or from host memory with `--offload`),
prefill the question on top, take the first token. Compared:

  all-L    every chunk at the low ratio  (= Video-XL at the low ratio)
  all-H    every chunk at the high ratio (= Video-XL at the high ratio)
  X2L k    the k chunks the attention oracle scores highest at the low ratio, the rest high

    python benchmarks/x2l_bench.py                         # bench_small, 40 and 80 frames, low 2 / high 32, k 1
    python benchmarks/x2l_bench.py --frames 80 --k 2 --offload
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

HERE = pathlib.Path(__file__).resolve().parent


def run(args, frames: int) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from vxl_jax.config import VideoXLConfig
    from vxl_jax.conversion.checkpoint import PIXEL_NORM_U8
    from vxl_jax.model import videoxl
    from vxl_jax.x2l import runner
    from vxl_jax.x2l.oracles import Query

    dtype = jnp.dtype(args.dtype)
    cfg = VideoXLConfig.load(args.config)
    params = jax.jit(videoxl.init_params, static_argnums=(0, 2))(cfg, jax.random.key(0), dtype)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (frames, 3, cfg.vision.image_size, cfg.vision.image_size), np.uint8)
    prefix, question = rng.integers(11, 1000, 14), rng.integers(11, 1000, 16)
    x2l = runner.X2LConfig(low=args.low, high=args.high, k=args.k, offload=args.offload)

    encode = lambda: runner.encode_video(params, cfg, [prefix], [pixels], x2l, pixel_norm=PIXEL_NORM_U8, dtype=dtype)
    encode()                                                                  # compiles
    t = time.perf_counter()
    enc = encode()
    if enc.device is not None:
        jax.block_until_ready(enc.device.low.cache.k)
    encode_s = time.perf_counter() - t

    chunks = enc.num_chunks[0]
    oracle = runner.build_oracle(x2l, params)
    _, chosen = runner.choose(x2l, oracle, Query("", question, enc.chunk_frames[0], enc.frame_features[0]))
    choices = {"all-L": [True] * chunks, "all-H": [False] * chunks, f"X2L k={args.k}": list(chosen)}
    llm = cfg.llm
    per_entry = llm.num_layers * 2 * llm.num_kv_heads * llm.head_dim * dtype.itemsize
    rows = {}
    for name, selected in choices.items():
        ttft = []
        for rep in range(args.repeats + 1):                                   # rep 0 compiles
            out = runner.answer(params, cfg, enc, [selected], [question], max_new_tokens=1, dtype=dtype)
            if rep:
                ttft.append(out.ttft_s)
        entries = enc.entries(0, selected)
        rows[name] = dict(entries=entries, kv_mib=entries * per_entry / 2**20, ttft_s=statistics.median(ttft))
    low = rows["all-L"]["entries"]
    for r in rows.values():
        r["reduction_vs_all_L"] = 1.0 - r["entries"] / low
    return dict(frames=frames, chunks=chunks, low=args.low, high=args.high, k=args.k, offload=args.offload,
                config=args.config, dtype=args.dtype, encode_s=encode_s, selected=np.flatnonzero(chosen).tolist(),
                device=str(jax.devices()[0].device_kind), rows=rows)


def table(results: list[dict]) -> str:
    lines = ["| frames | memory | KV entries/layer | KV MiB | reduction vs all-L | TTFT ms |", "|---|---|---|---|---|---|"]
    for res in results:
        for name, r in res["rows"].items():
            lines.append(f"| {res['frames']} | {name} | {r['entries']} | {r['kv_mib']:.2f} | "
                         f"{100 * r['reduction_vs_all_L']:.1f}% | {1000 * r['ttft_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="bench_small")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--frames", type=int, nargs="+", default=[40, 80])
    p.add_argument("--low", type=int, default=2)
    p.add_argument("--high", type=int, default=32)
    p.add_argument("--k", type=int, default=1)
    p.add_argument("--offload", action="store_true", help="keep both levels in host memory (merge from host)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", default=str(HERE / "results"), help="folder for x2l_<config>.json / .md")
    args = p.parse_args()
    results = []
    for frames in args.frames:
        res = run(args, frames)
        print(f"{frames} frames, {res['chunks']} chunks, encode {res['encode_s']:.2f} s, "
              f"selected {res['selected']}", flush=True)
        results.append(res)
    text = table(results)
    print(text)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"x2l_{args.config}{'_offload' if args.offload else ''}"
    (out / f"{stem}.json").write_text(json.dumps(results, indent=1))
    (out / f"{stem}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
