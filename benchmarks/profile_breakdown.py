"""Where the time of a compressed prefill goes: frame features, each window step, and inside a window step
the attention against the rest (projections, MLP, RoPE, writes), plus the text steps.

Each part is jitted on its own with the shapes the prefill uses (random weights of a config, ratio r,
a 14-token prefix, a 16-token suffix) and timed as the minimum of `--repeats` runs after a warm-up, so
the parts add up to about the whole. CPU by default; prints a markdown table.

    python benchmarks/profile_breakdown.py                       # bench_small, 40 frames, ratio 8
    python benchmarks/profile_breakdown.py --frames 80 --ratio 8
"""

from __future__ import annotations

import argparse
import time


def best(fn, *args, repeats: int) -> float:
    import jax
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="bench_small")
    p.add_argument("--frames", type=int, default=40)
    p.add_argument("--ratio", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    import jax
    import jax.numpy as jnp
    import numpy as np

    from vxl_jax import pipeline
    from vxl_jax.compress import prefill as prefill_lib, schedules
    from vxl_jax.config import VideoXLConfig
    from vxl_jax.conversion.checkpoint import PIXEL_NORM_U8
    from vxl_jax.model import attention, qwen2, videoxl

    cfg = VideoXLConfig.load(args.config)
    llm = cfg.llm
    params = videoxl.init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    size = cfg.vision.image_size
    frames = rng.integers(0, 256, (args.frames, 3, size, size), dtype=np.uint8)
    prompt = np.concatenate([rng.integers(0, llm.vocab_size, 14), [-200], rng.integers(0, llm.vocab_size, 16)])
    norm = tuple(jnp.asarray(x, jnp.float32) for x in PIXEL_NORM_U8)
    r = args.repeats
    rows = []

    features = jax.jit(lambda p, f: videoxl.frame_features(p, cfg, videoxl.normalise_pixels(f, *norm)))
    t_feat = best(features, params, jnp.asarray(frames), repeats=r)
    feats = features(params, jnp.asarray(frames))
    rows.append(("frame features (CLIP + projector + pooling)", t_feat))

    prepared = pipeline.prepare(cfg, [prompt], [np.asarray(feats)], schedules.fixed(args.ratio))
    run = jax.jit(lambda p, a, v: prefill_lib.prefill(p, cfg, a, v, spec=prepared.spec).last_logits)
    t_prefill = best(run, params, prepared.arrays, jnp.asarray(prepared.visual), repeats=r)

    plan, spec = prepared.plans[0], prepared.spec
    fed = spec.fed_length(args.ratio)
    n_vst = spec.max_vst(args.ratio)
    cache = qwen2.KVCache.zeros(llm, 1, spec.buffer_size)
    x = jax.random.normal(jax.random.key(1), (1, fed, llm.hidden_size))
    heads = (llm.num_heads, llm.num_kv_heads, llm.head_dim)
    q = jax.random.normal(jax.random.key(2), (1, fed, heads[0], heads[2]))
    kv = jax.random.normal(jax.random.key(3), (1, fed, heads[1], heads[2]))
    mem = jax.random.normal(jax.random.key(4), (1, spec.buffer_size, heads[1], heads[2]))
    window_total = attn_total = 0.0
    for w, win in enumerate(plan.windows):
        m = plan.prefix + sum(x.kept for x in plan.windows[:w])
        slots = jnp.asarray(win.vst_slots(), jnp.int32)[None]
        step = jax.jit(lambda p, x, c, m=m, slots=slots: qwen2.decode_layers(
            p, llm, x, c, qwen2.make_context(llm, jnp.array([m]), fed, vst_slots=slots), need_hidden=False)[1])
        t_window = best(step, params["llm"], x, cache, repeats=r)
        attend = jax.jit(lambda q, k, mk, m=m: attention.attend(q, k, k, mk, mk, jnp.array([m]), backend=llm.attention))
        t_attn = best(attend, q, kv, mem, repeats=r) * (llm.num_layers - 1)      # the last layer has none
        window_total += t_window
        attn_total += t_attn
        rows.append((f"window {w} ({fed} tokens, memory {m}): attention / rest", (t_attn, t_window - t_attn)))
    rows.append(("prefix + suffix text steps, writes, scan (prefill - windows)", t_prefill - window_total))
    rows.append(("compressed prefill, whole", t_prefill))

    print(f"{args.config}, {args.frames} frames, ratio {args.ratio}, {jax.devices()[0].device_kind}, "
          f"{n_vst} VSTs per window, attention backend {attention.resolve(llm.attention, jnp.float32)}")
    print("\n| part | seconds |\n|---|---|")
    for name, t in rows:
        cell = " / ".join(f"{x:.3f}" for x in t) if isinstance(t, tuple) else f"{t:.3f}"
        print(f"| {name} | {cell} |")
    print(f"\nwindows: {window_total:.3f} s, of which attention {attn_total:.3f} s "
          f"({100 * attn_total / window_total:.0f}%)")


if __name__ == "__main__":
    main()
