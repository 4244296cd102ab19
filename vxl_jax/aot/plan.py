"""Compile one program for a target and report what XLA says about it: `vxl aot`'s engine.

    row = plan.compile_point("h100", "prefill", "videoxl_7b", frames=10000, ratio=16)
    row["per_device_bytes"]["total"], row["fits"], row["attention_backend"]

total = arguments + outputs + temporaries - the donated bytes aliased with outputs, per device, from
`compiled.memory_analysis()` of the target's own compiler. The time is an estimate: the analytic
FLOPs (`aot.flops`) over (devices x the device's bf16 peak x an assumed MFU).
"""

from __future__ import annotations

import os
import re
import time
from typing import Optional

import numpy as np

from vxl_jax.aot import programs, targets

CPU_KERNELS = ("vxl_flash_attention",)        # our CPU FFI targets: never allowed in a GPU or TPU program
FIELDS = ("argument", "output", "alias", "temp", "generated_code")
DEFAULT_MFU = 0.4


def check_environment(target: targets.Target) -> None:
    """The process must compile without devices: JAX on the CPU platform, and XLA's GPU flags in place."""
    import jax

    if jax.default_backend() != "cpu":
        raise RuntimeError(f"vxl aot compiles without devices: run it with JAX_PLATFORMS=cpu "
                           f"(this process's default backend is {jax.default_backend()!r})")
    if target.platform == "gpu":
        flags = os.environ.get("XLA_FLAGS", "")
        missing = [f for f in targets.GPU_XLA_FLAGS if f not in flags]
        if missing:
            raise RuntimeError(f"compiling for a GPU without one needs XLA_FLAGS to hold {' '.join(missing)} "
                               "before jax starts (`vxl aot` sets them itself)")


def _custom_calls(hlo_text: str) -> list[str]:
    return sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo_text)))


def _refusal(err: Exception) -> Optional[tuple[int, str]]:
    """(temporary bytes the compiler asked for, its message) when it refused for lack of device memory."""
    text = str(err)
    m = re.search(r"required for HLO temporaries \(([\d.]+)G\) exceeds available HBM", text)
    if "RESOURCE_EXHAUSTED" not in text or m is None:
        return None
    return int(float(m.group(1)) * targets.GIB), text[text.index("RESOURCE_EXHAUSTED"):].splitlines()[0]


def _shard_bytes(x) -> int:
    shape = x.sharding.shard_shape(x.shape) if getattr(x, "sharding", None) is not None else x.shape
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize


def _from_shapes(lowered, args, refused) -> dict:
    """Per-device bytes of a program the compiler refused: arguments and outputs from their shardings, the
    donated ones as aliased, the temporaries as the compiler said."""
    import jax

    leaves = lambda tree: [x for x in jax.tree.leaves(tree) if isinstance(x, jax.ShapeDtypeStruct)]
    argument = sum(_shard_bytes(x) for x in leaves(args))
    output = sum(_shard_bytes(x) for x in leaves(lowered.out_info))
    donated = sum(_shard_bytes(x) for i in lowered.donate_argnums if i < len(args) for x in leaves(args[i]))
    return dict(argument=argument, output=output, alias=min(donated, output), temp=refused[0], generated_code=0)


def compile_point(target_name: str, job: str, config: str, *, frames: int, ratio: int = 16, rows: Optional[int] = None,
                  devices: int = 1, mesh: Optional[tuple[int, int, int]] = None, dtype: str = "bfloat16",
                  step_settings: Optional[dict] = None, mfu: float = DEFAULT_MFU) -> dict:
    """Compiles one program for `devices` devices of a target; returns its report (see `vxl aot --help`)."""
    import jax

    from vxl_jax import parallel
    from vxl_jax.config import VideoXLConfig
    from vxl_jax.model import attention

    target = targets.get(target_name)
    check_environment(target)
    if job not in programs.BUILDERS:
        raise ValueError(f"unknown job {job!r}; expected one of {', '.join(programs.JOBS)}")
    cfg = VideoXLConfig.load(config)
    rows = devices if rows is None else rows
    if mesh is None:      # training shards the state (ZeRO-3 over fsdp); inference splits rows over data
        mesh = (1, devices, 1) if job == "train" else (devices, 1, 1)
    _, devs = targets.topology(target_name, devices)
    device_mesh = parallel.make_mesh(parallel.MeshConfig(*mesh), devices=devs)
    shape = dict(frames=frames, ratio=ratio, rows=rows, dtype=dtype)
    if job == "train":
        shape["settings"] = step_settings
    elif step_settings:
        raise ValueError("step settings apply to --job train only")
    with jax.set_mesh(device_mesh):
        program = programs.BUILDERS[job](cfg, device_mesh, **shape)
        compute = programs.DTYPES[program.facts.get("step_settings", {}).get("dtype", dtype)]
        llm_backend = attention.resolve(cfg.llm.attention, compute)
        clip_backend = attention.resolve("auto", compute)
        t0 = time.perf_counter()
        fn, args, kwargs = program.make()
        lowered = fn.lower(*args, **kwargs)
        refused = None
        try:
            compiled = lowered.compile()
        except Exception as err:  # noqa: BLE001 - the TPU compiler refuses a program that cannot fit
            refused = _refusal(err)
            if refused is None:
                raise
        compile_s = time.perf_counter() - t0
    if refused is None:
        stats = compiled.memory_analysis()
        per_device = {f: int(getattr(stats, f"{f}_size_in_bytes", 0) or 0) for f in FIELDS}
        calls = _custom_calls(compiled.as_text())
    else:
        per_device = _from_shapes(lowered, args, refused)
        calls = _custom_calls(lowered.as_text())
    per_device["total"] = per_device["argument"] + per_device["output"] + per_device["temp"] - per_device["alias"]
    cpu_calls = [c for c in calls if c.startswith(CPU_KERNELS)]
    if cpu_calls:
        raise AssertionError(f"a CPU custom call reached a {target.platform} program: {cpu_calls}")
    seconds = program.flops / (devices * target.peak_bf16_flops * mfu)
    return dict(
        target=target.name, platform=target.platform, device_kind=target.device_kind, devices=devices,
        mesh=dict(zip(parallel.MESH_AXES, mesh)), job=job, config=config, frames=frames, ratio=ratio, rows=rows,
        dtype=dtype, per_device_bytes=per_device, device_memory_bytes=target.memory_bytes,
        fits=refused is None and per_device["total"] <= target.memory_bytes, attention_backend=llm_backend,
        clip_attention_backend=clip_backend,
        attention_note=("the penultimate layer's VST-row subsets (q_pos) run on xla: cuDNN has no row-subset mask"
                        if llm_backend == "cudnn" and job != "decode" else None),
        custom_calls=calls, compile_s=round(compile_s, 2), flops=program.flops,
        compiler_refused=refused is not None,
        compiler_message=None if refused is None else refused[1],
        estimate=dict(mfu=mfu, peak_flops_per_device=target.peak_bf16_flops, seconds=seconds,
                      note="an estimate: analytic FLOPs at an assumed MFU, not a measurement"),
        **program.facts)
