"""Train-step benchmark: one optimizer step (forward + backward through the compression + AdamW) per frame count.

Random weights of a config, random uint8 frames, a 14-token prefix and a
32-token suffix with 16 labelled answer tokens, all parameters trainable
(stage 2), one row per device. After one warm-up step (which compiles), the
median over `--repeats` of the step time, the tokens per second (text +
visual tokens fed, VSTs not counted) and, with `--peak-tflops`, the model
FLOPs utilisation: 3x the forward's model FLOPs (CLIP + projector per frame,
the compressed prefill, the text logits: `vxl_jax.aot.flops`).
XLA's own cost analysis is not used: it counts a loop body once.

    python benchmarks/train_bench.py                                    # CPU: bench_small, 10/40 frames
    python benchmarks/train_bench.py --config videoxl_1_5b_shape --dtype bfloat16 --frames 64 128 \\
        --remat-layer dots_no_batch --remat-window full --peak-tflops 989   # one H100
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="bench_small", help="model config name or path (default bench_small)")
    p.add_argument("--frames", type=int, nargs="+", default=[10, 40])
    p.add_argument("--ratio", type=int, default=8)
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--remat-layer", default="none", help="per decoder layer (default none)")
    p.add_argument("--remat-window", default="full", help="per compression window (default full: StepSettings' default)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak (bf16 dense) for MFU")
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args()

    import jax
    from vxl_jax import hostmem, parallel
    from vxl_jax.aot import flops as flops_lib
    from vxl_jax.aot.programs import synthetic_batch
    from vxl_jax.compress.plan import make_plan
    from vxl_jax.config import VideoXLConfig
    from vxl_jax.model import videoxl
    from vxl_jax.train import batch as batch_lib, optim, step as step_lib

    cfg = VideoXLConfig.load(args.config)
    mesh = parallel.make_mesh(parallel.MeshConfig(data=1, fsdp=-1))
    rows_out = []
    with jax.set_mesh(mesh):
        init = lambda: videoxl.init_params(cfg, jax.random.key(0))
        params = jax.jit(init, out_shardings=parallel.param_shardings(jax.eval_shape(init), mesh))()
        ocfg = optim.OptimConfig(learning_rate=1e-5)
        tx = optim.build(ocfg, params, 100)
        settings = step_lib.StepSettings(dtype=args.dtype, remat_layer=args.remat_layer,
                                         remat_window=args.remat_window)
        step = step_lib.make_step(cfg, tx, optim.trainable_mask(ocfg, params), settings)
        make_state = lambda p: step_lib.init_state(p, tx)
        shardings = parallel.tree_shardings(jax.eval_shape(make_state, params), mesh)
        state = jax.jit(make_state, out_shardings=shardings)(params)
        del params
        jitted = step_lib.jit_step(step, shardings)
        for frames in args.frames:
            prepared = batch_lib.prepare(synthetic_batch(cfg, frames, jax.device_count(), args.ratio), cfg,
                                          (args.ratio,))
            inputs = batch_lib.to_global(prepared.inputs, mesh)
            t0 = time.perf_counter()
            compiled = jitted.lower(state, inputs, spec=prepared.spec).compile()
            compile_s = time.perf_counter() - t0
            hostmem.release_freed()          # as `vxl train` does after a compilation
            plans = [make_plan(14, frames * cfg.tokens_per_frame, 32,
                               [args.ratio] * -(-frames * cfg.tokens_per_frame // cfg.vst.window),
                               window=cfg.vst.window)] * jax.device_count()
            flops = flops_lib.train_step(cfg, plans, frames, 14 + 32)
            state, out = compiled(state, inputs)
            jax.block_until_ready(out)
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                state, out = compiled(state, inputs)
                jax.block_until_ready(out)
                times.append(time.perf_counter() - t0)
            med = statistics.median(times)
            row = {"config": args.config, "dtype": args.dtype, "frames": frames, "ratio": args.ratio,
                   "rows": jax.device_count(), "step_s": med, "tokens_per_s": prepared.tokens / med,
                   "compile_s": compile_s, "model_tflop": flops / 1e12,
                   "tflops": flops / med / 1e12, "loss": float(out["loss"]),
                   "device": jax.devices()[0].device_kind}
            if args.peak_tflops:
                row["mfu"] = flops / med / (args.peak_tflops * 1e12 * jax.device_count())
            stats = jax.devices()[0].memory_stats() or {}
            if "peak_bytes_in_use" in stats:
                row["peak_device_gib"] = stats["peak_bytes_in_use"] / 2**30
            rows_out.append(row)
            print(json.dumps(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows_out, f, indent=2)


if __name__ == "__main__":
    main()
