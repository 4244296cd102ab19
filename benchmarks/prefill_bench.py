"""Prefill benchmark: frame features, compressed prefill, decoding and end to end, per frame count and ratio.

Random weights of a config (`bench_small` on CPU, `videoxl_7b` on a GPU), random
uint8 frames, a 14-token prefix and a 16-token suffix (the fixtures' layout).
Each (frames, ratio) point runs in its own subprocess so that its peak RSS is
its own. Per point, after one warm-up run (which compiles), the median over
`--repeats` of:

  features   uint8 frames -> visual tokens (CLIP, projector, 2x2 pooling)
  prefill    the compressed prefill from the visual tokens (ratio "none": uncompressed)
  decode     15 decode steps (16 tokens: the first comes from the prefill)
  e2e        uint8 frames -> 16 tokens (the three above, back to back)

plus peak RSS (host) or peak device memory (GPU), KV entries kept per layer and
their bytes over all layers, and the prefill's model FLOPs utilisation when
`--peak-tflops` is given.

    python benchmarks/prefill_bench.py                      # bench_small: 40/80 frames, ratios 2/4/8/16 + none
    python benchmarks/prefill_bench.py --curve              # + the 16..512 frame scaling curve at ratio 8
    python benchmarks/prefill_bench.py --config videoxl_7b --dtype bfloat16 --frames 128 512 2048 \\
        --ratios 16 4 --peak-tflops 989                     # on an H100
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
# The original implementation on this machine (2-core CPU, bench_small, ratio 8, medians; from the project brief).
ORIGINAL_CPU = {40: dict(features=3.45, prefill=2.06, e2e=5.19, rss_gb=1.5),
                80: dict(features=7.35, prefill=4.39, e2e=11.31, rss_gb=2.1)}


def run_point(args) -> dict:
    """One (frames, ratio) point, in this process."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from vxl_jax import generate as gen_lib
    from vxl_jax import pipeline
    from vxl_jax.aot import flops as flops_lib
    from vxl_jax.cli.util import peak_rss_mib
    from vxl_jax.compress import prefill as prefill_lib
    from vxl_jax.compress import schedules
    from vxl_jax.config import VideoXLConfig
    from vxl_jax.conversion.checkpoint import PIXEL_NORM_U8
    from vxl_jax.model import videoxl

    dtype = jnp.dtype(args.dtype)
    cfg = VideoXLConfig.load(args.config)
    params = jax.jit(videoxl.init_params, static_argnums=(0, 2))(cfg, jax.random.key(0), dtype)
    ratio = None if args.ratio == "none" else int(args.ratio)
    frames = args.frames
    rng = np.random.default_rng(0)
    pixels_u8 = rng.integers(0, 256, (frames, 3, cfg.vision.image_size, cfg.vision.image_size), np.uint8)
    prompt = np.concatenate([rng.integers(11, 1000, 14), [-200], rng.integers(11, 1000, 16)])
    mean, std = PIXEL_NORM_U8

    @jax.jit
    def features(u8):
        return videoxl.frame_features(params, cfg, videoxl.normalise_pixels(u8, mean, std, dtype), dtype=dtype,
                                      frame_chunk=args.frame_chunk or None)

    schedule = schedules.uncompressed() if ratio is None else schedules.fixed(ratio)
    tokens = frames * cfg.tokens_per_frame
    prepared = pipeline.prepare(cfg, [prompt], [np.zeros((tokens, cfg.llm.hidden_size), np.float32)], schedule,
                                max_new_tokens=16)
    arrays, spec = jax.device_put(prepared.arrays), prepared.spec
    padded = prepared.visual.shape[1]

    def prefill(feats):
        flat = feats.reshape(1, tokens, -1)
        flat = jnp.pad(flat, ((0, 0), (0, padded - tokens), (0, 0)))
        return prefill_lib.prefill_jit(params, cfg, arrays, flat, spec=spec, dtype=dtype)

    def decode(result):
        return gen_lib.generate_jit(params, cfg, result.memory, result.last_logits, jax.random.key(0),
                                    max_new_tokens=16, dtype=dtype)

    def timed(fn, *a):
        t = time.perf_counter()
        out = jax.block_until_ready(fn(*a))
        return time.perf_counter() - t, out

    u8 = jax.device_put(pixels_u8)
    times = {"features": [], "prefill": [], "decode": [], "e2e": []}
    for rep in range(args.repeats + 1):                       # rep 0 is the warm-up (compiles)
        tf, feats = timed(features, u8)
        tp, result = timed(prefill, feats)
        td, gen = timed(decode, result)
        te, _ = timed(lambda x: decode(prefill(features(x))), u8)
        if rep:
            for name, t in zip(times, (tf, tp, td, te)):
                times[name].append(t)
    plan = prepared.plans[0]
    llm = cfg.llm
    entries = plan.memory_after_prefill
    out = {name: statistics.median(ts) for name, ts in times.items()}
    out.update(frames=frames, ratio=args.ratio, config=args.config, dtype=args.dtype, repeats=args.repeats,
               kv_entries=entries, kv_bytes=entries * llm.num_layers * 2 * llm.num_kv_heads * llm.head_dim
               * dtype.itemsize, buffer_entries=spec.buffer_size, device=str(jax.devices()[0].device_kind),
               generated=int(gen.num_tokens[0]), peak_rss_mib=peak_rss_mib(), frame_chunk=args.frame_chunk)
    stats = jax.devices()[0].memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        out["peak_device_gib"] = stats["peak_bytes_in_use"] / 2**30
    flops = flops_lib.prefill(cfg, plan)
    out["prefill_tflops"] = flops / out["prefill"] / 1e12
    if args.peak_tflops:
        out["mfu"] = out["prefill_tflops"] / args.peak_tflops
    return out


def table(rows: list[dict]) -> str:
    head = ("| frames | ratio | features s | prefill s | 15 decode s | e2e s | peak RSS GiB | KV entries | KV MiB |"
            " prefill TFLOP/s |" + (" MFU |" if any("mfu" in r for r in rows) else "")
            + (" peak dev GiB |" if any("peak_device_gib" in r for r in rows) else ""))
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [r["frames"], r["ratio"], f"{r['features']:.3f}", f"{r['prefill']:.3f}", f"{r['decode']:.3f}",
                 f"{r['e2e']:.3f}", f"{r['peak_rss_mib'] / 1024:.2f}", r["kv_entries"],
                 f"{r['kv_bytes'] / 2**20:.1f}", f"{r['prefill_tflops']:.3f}"]
        if "mfu" in r:
            cells.append(f"{100 * r['mfu']:.1f}%")
        if "peak_device_gib" in r:
            cells.append(f"{r['peak_device_gib']:.1f}")
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def comparison(rows: list[dict]) -> str:
    lines = ["| frames | ratio 8 | features s | prefill s | e2e s | peak RSS GB |", "|---|---|---|---|---|---|"]
    for frames, orig in ORIGINAL_CPU.items():
        ours = next((r for r in rows if r["frames"] == frames and r["ratio"] == "8"), None)
        if ours is None:
            continue
        lines.append(f"| {frames} | original | {orig['features']:.2f} | {orig['prefill']:.2f} | {orig['e2e']:.2f} | "
                     f"{orig['rss_gb']:.1f} |")
        lines.append(f"| {frames} | vxl-jax | {ours['features']:.2f} | {ours['prefill']:.2f} | {ours['e2e']:.2f} | "
                     f"{ours['peak_rss_mib'] * 2**20 / 1e9:.1f} |")
        lines.append(f"| {frames} | speed-up | {orig['features'] / ours['features']:.1f}x | "
                     f"{orig['prefill'] / ours['prefill']:.1f}x | {orig['e2e'] / ours['e2e']:.1f}x | |")
    return "\n".join(lines)


def plot(rows: list[dict], path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    for ratio in sorted({r["ratio"] for r in rows}, key=lambda x: (x == "none", int(x) if x != "none" else 0)):
        pts = sorted((r for r in rows if r["ratio"] == ratio), key=lambda r: r["frames"])
        if len(pts) < 2:
            continue
        fr = [p["frames"] for p in pts]
        ax_t.plot(fr, [p["prefill"] for p in pts], marker="o", label=f"prefill, ratio {ratio}")
        ax_m.plot(fr, [p["kv_bytes"] / 2**20 for p in pts], marker="o", label=f"ratio {ratio}")
        if ratio == "8":
            ax_t.plot(fr, [p["features"] for p in pts], marker="s", ls="--", label="frame features")
            ax_t.plot(fr, [p["e2e"] for p in pts], marker="^", ls=":", label="end to end, ratio 8")
    for orig_frames, orig in ORIGINAL_CPU.items():
        if rows[0]["config"] == "bench_small":
            ax_t.scatter([orig_frames], [orig["e2e"]], marker="x", color="k",
                         label="original, end to end" if orig_frames == 40 else None)
    ax_t.set(xscale="log", yscale="log", xlabel="frames", ylabel="seconds (median)",
             title=f"{rows[0]['config']} on {rows[0]['device']}")
    ax_m.set(xscale="log", yscale="log", xlabel="frames", ylabel="KV memory after prefill, MiB",
             title="kept keys/values, all layers")
    ax_t.legend(fontsize=7)
    ax_m.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--config", default="bench_small", help="model config name or path (default bench_small)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--frames", type=int, nargs="+", default=[40, 80])
    p.add_argument("--ratios", nargs="+", default=["2", "4", "8", "16", "none"],
                   help="ratios to run; 'none' = uncompressed (default 2 4 8 16 none)")
    p.add_argument("--curve", action="store_true", help="also run 16..512 frames at ratio 8 (and uncompressed to 128)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per point after one warm-up (default 5)")
    p.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU (H100 bf16 dense: 989)")
    p.add_argument("--out", type=pathlib.Path, default=HERE / "results", help="output folder")
    p.add_argument("--frame-chunk", type=int, default=0,
                   help="frames per CLIP call in the features stage (default 0: the library's, 2 on CPU, all "
                        "frames at once elsewhere, which holds 21 MB of float32 attention scores per frame with "
                        "the 7B's CLIP: too much on 80 GB from about 2048 frames)")
    p.add_argument("--point", action="store_true", help=argparse.SUPPRESS)   # internal: run one point
    p.add_argument("--ratio", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.point:
        args.frames = args.frames[0]
        print("RESULT " + json.dumps(run_point(args)))
        return 0

    points = [(f, r) for f in args.frames for r in args.ratios]
    if args.curve:
        points += [(f, "8") for f in (16, 32, 64, 128, 256, 512)] + [(f, "none") for f in (16, 32, 64, 128)]
    points = sorted(set(points), key=lambda x: (x[0], x[1] == "none", int(x[1]) if x[1] != "none" else 0))
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, (frames, ratio) in enumerate(points, 1):
        cmd = [sys.executable, __file__, "--point", "--config", args.config, "--dtype", args.dtype,
               "--frames", str(frames), "--ratio", ratio, "--repeats", str(args.repeats),
               "--peak-tflops", str(args.peak_tflops), "--frame-chunk", str(args.frame_chunk)]
        print(f"[{i}/{len(points)}] {frames} frames, ratio {ratio} ...", end=" ", flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if proc.returncode or line is None:
            print(f"failed (exit {proc.returncode})\n{proc.stderr[-2000:]}")
            continue
        row = json.loads(line[len("RESULT "):])
        print(f"prefill {row['prefill']:.3f} s, e2e {row['e2e']:.3f} s, peak RSS {row['peak_rss_mib']:.0f} MiB")
        rows.append(row)
    if not rows:
        return 1
    stem = f"{args.config}_{args.dtype}"
    (args.out / f"{stem}.json").write_text(json.dumps(rows, indent=1))
    text = table(rows)
    if args.config == "bench_small":
        text += "\n\nAgainst the original (PyTorch, same machine, same config):\n\n" + comparison(rows)
    (args.out / f"{stem}.md").write_text(text + "\n")
    plot(rows, args.out / f"{stem}.png")
    print(text)
    print(f"wrote {args.out / stem}.{{json,md,png}}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
