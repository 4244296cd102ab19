"""`vxl aot`: compile a program for a GPU or TPU target on this host (no device) and report its memory."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

_CHILD = "VXL_AOT_CHILD"


def add_parser(sub) -> None:
    from vxl_jax.aot import COMPUTE_DTYPES, JOBS, targets
    p = sub.add_parser(
        "aot", help="compile for a GPU / TPU target without a device: per-device memory, fits, FLOPs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Compile a program for an accelerator on this CPU-only host (XLA's GPU compiler from a "
                    "target description, libtpu for a TPU topology) and report what the compiler says: per-device "
                    "argument / output / alias / temp / total bytes against the device's memory, whether it fits, "
                    "the attention backend the program uses, the compile time, the analytic FLOPs and a time "
                    "estimate at an assumed MFU. Nothing runs; no device is needed. Needs the `aot` extra "
                    "(pip install -e \".[aot]\", about 6 GB: the CUDA plugin's NVIDIA wheels and libtpu).",
        epilog="jobs:\n"
               "  prefill  the compressed prefill `vxl infer` runs: 14-token prefix, F uint8 frames streamed\n"
               "           window by window, 16-token suffix, one ratio, room for 16 new tokens\n"
               "  decode   16 greedy tokens after the memory that prefill leaves at F frames\n"
               "  train    one AdamW step, every parameter trainable, float32 state (14 + 32 text tokens,\n"
               "           16 labelled), remat as --set step.* says (StepSettings)\n"
               "total = arguments + outputs + temporaries - aliased (donated) bytes, per device.\n\n"
               "examples:\n"
               "  vxl aot --target h100 --job prefill --config videoxl_7b --frames 2048 10000\n"
               "  vxl aot --target h100 --devices 8 --job train --config videoxl_7b --frames 128 --rows 8\n"
               "  vxl aot --target tpu-v5p --devices 4 --job train --config videoxl_7b --frames 128 "
               "--set step.remat_layer=dots_no_batch --json plan.json")
    p.add_argument("--target", required=True, choices=list(targets.TARGETS), help="the device to compile for")
    p.add_argument("--devices", type=int, default=1, help="devices the program spans (default 1)")
    p.add_argument("--mesh", default=None, metavar="DATA,FSDP,TENSOR",
                   help="mesh axis sizes (default: train 1,N,1 (ZeRO-3 over fsdp); prefill/decode N,1,1)")
    p.add_argument("--job", required=True, nargs="+", choices=JOBS, help="one or more; each at every --frames")
    p.add_argument("--config", required=True, help="model config name in configs/ or a path (e.g. videoxl_7b)")
    p.add_argument("--frames", type=int, nargs="+", required=True, help="frames per row; one program per value")
    p.add_argument("--ratio", type=int, default=16, help="compression ratio of every window (default 16)")
    p.add_argument("--rows", type=int, default=None, help="rows (videos) in the batch (default: one per device)")
    p.add_argument("--dtype", default="bfloat16", choices=COMPUTE_DTYPES,
                   help="compute dtype (default bfloat16; the train state is float32 either way)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="step.KEY=VALUE",
                   help="train step settings (train.step.StepSettings), e.g. step.remat_layer=dots_no_batch, "
                        "step.remat_window=full, step.loss_chunk=8192; repeatable")
    p.add_argument("--mfu", type=float, default=0.4, help="MFU assumed for the time estimate (default 0.4)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the reports as JSON (a list)")
    p.set_defaults(run=_run)


def _env() -> dict:
    from vxl_jax.aot import targets
    env = dict(os.environ, JAX_PLATFORMS="cpu", **{_CHILD: "1"})
    env["XLA_FLAGS"] = targets.with_flags(env.get("XLA_FLAGS", ""), targets.GPU_XLA_FLAGS)
    return env


def _run(args: argparse.Namespace) -> int:
    # The compilers need a process that initialises no device and has XLA's GPU flags before jax starts, and
    # compile times are the compiler's own (no persistent cache): the work runs in a child made for it.
    if os.environ.get(_CHILD) != "1":
        child = [sys.executable, "-m", "vxl_jax.cli.aot", *_reconstruct(args)]
        return subprocess.call(child, env=_env())
    return _work(args)


def _reconstruct(args: argparse.Namespace) -> list[str]:
    out = ["--target", args.target, "--devices", str(args.devices), "--job", *args.job, "--config", args.config,
           "--frames", *map(str, args.frames), "--ratio", str(args.ratio), "--dtype", args.dtype,
           "--mfu", str(args.mfu)]
    for flag, value in (("--mesh", args.mesh), ("--rows", args.rows), ("--json", args.json)):
        if value is not None:
            out += [flag, str(value)]
    for item in args.overrides:
        out += ["--set", item]
    return out


def _step_settings(overrides: list[str]) -> dict:
    """`--set step.KEY=VALUE` items (values as JSON, as `vxl train --set`) -> StepSettings fields."""
    import dataclasses

    from vxl_jax.train.config import apply_overrides
    from vxl_jax.train.step import StepSettings
    sections = apply_overrides({"step": {}}, overrides)
    fields = {f.name for f in dataclasses.fields(StepSettings)}
    unknown = sorted(set(sections) - {"step"}) + sorted(set(sections["step"]) - fields)
    if unknown:
        raise ValueError(f"--set: unknown keys {unknown}; expected step.KEY with KEY one of {', '.join(sorted(fields))}")
    return sections["step"]


def _g(n: float) -> str:
    from vxl_jax.aot.targets import GIB
    return f"{n / GIB:.2f}"


def line(r: dict) -> str:
    b = r["per_device_bytes"]
    return (f"{r['job']} {r['config']} {r['frames']} frames r{r['ratio']} x{r['rows']} on {r['devices']}x {r['target']} "
            f"[{r['dtype']}]: args {_g(b['argument'])} | out {_g(b['output'])} | alias {_g(b['alias'])} | "
            f"temp {_g(b['temp'])} | total {_g(b['total'])} GiB of {_g(r['device_memory_bytes'])}: "
            f"{'fits' if r['fits'] else 'DOES NOT FIT'} | attention {r['attention_backend']} "
            f"(CLIP {r['clip_attention_backend']}) | {r['flops'] / 1e12:.1f} TFLOP, ~{r['estimate']['seconds']:.2f} s "
            f"at {r['estimate']['mfu']:.0%} MFU (estimate) | compile {r['compile_s']:.1f} s")


def _work(args: argparse.Namespace) -> int:
    from vxl_jax.aot import plan

    mesh = None
    if args.mesh is not None:
        try:
            mesh = tuple(int(x) for x in args.mesh.split(","))
        except ValueError:
            mesh = ()
        if len(mesh) != 3:
            raise ValueError(f"--mesh {args.mesh!r}: expected three sizes DATA,FSDP,TENSOR")
    settings = _step_settings(args.overrides)
    reports = []
    points = [(job, frames) for job in args.job for frames in args.frames]
    for job, frames in points:
        print(f"compiling {job} {args.config} at {frames} frames for {args.devices}x {args.target} ...",
              file=sys.stderr, flush=True)
        row = plan.compile_point(args.target, job, args.config, frames=frames, ratio=args.ratio,
                                 rows=args.rows, devices=args.devices, mesh=mesh, dtype=args.dtype,
                                 step_settings=(settings or None) if job == "train" else None, mfu=args.mfu)
        print(line(row), flush=True)
        reports.append(row)
        if args.json:          # after every point: a long sweep keeps what it has
            with open(args.json + ".tmp", "w") as f:
                json.dump(reports, f, indent=1)
            os.replace(args.json + ".tmp", args.json)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="vxl aot")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    args = parser.parse_args(["aot", *(sys.argv[1:] if argv is None else argv)])
    try:
        return _work(args)
    except (ValueError, FileNotFoundError, AssertionError) as e:      # AssertionError: a CPU custom call
        print(f"vxl aot: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
