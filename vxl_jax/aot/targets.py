"""Accelerator targets as data: what XLA needs to compile for a device that is not here.

GPU targets are XLA's `GpuTargetConfigProto` in text form, rendered from the device facts below
(published device specifications: SM count, shared memory, bandwidth, memory size, compute
capability); TPU targets are libtpu topology names. Neither needs the device: the compilers run on
this host (`pip install -e ".[aot]"`: the CUDA plugin with ptxas and cuDNN, and libtpu).

    topo = targets.topology("h100", devices=8)       # jax.experimental.topologies TopologyDescription
    targets.TARGETS["h100"].memory_bytes             # one device's memory

Run with `JAX_PLATFORMS=cpu` so that no device is initialised; GPU compiles need
`targets.GPU_XLA_FLAGS` in XLA_FLAGS before jax starts (no device to autotune on).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional

GIB = 2 ** 30
# Without a device XLA cannot autotune: Triton GEMM tiling fails ("Couldn't find output tile sizes"), so
# matmuls go to cuBLAS with its heuristics and autotuning is off.
GPU_XLA_FLAGS = ("--xla_gpu_enable_triton_gemm=false", "--xla_gpu_autotune_level=0")
CUDNN_VERSION = (9, 8, 0)      # the cuDNN the target is assumed to run (the pinned jax[cuda12] needs >= 9.8)


def with_flags(xla_flags: str, flags) -> str:
    """An XLA_FLAGS value with `flags` added after it (each once)."""
    have = xla_flags.split()
    return " ".join(have + [f for f in flags if f not in have])


@dataclasses.dataclass(frozen=True)
class GpuFacts:
    """An NVIDIA GPU as XLA's GPU compiler models it (device_description.proto field names)."""
    name: str
    compute_capability: tuple[int, int]
    core_count: int                   # SMs
    fpus_per_core: int
    shared_memory_per_core: int
    shared_memory_per_block_optin: int
    memory_bandwidth: int             # bytes/s
    l2_cache_size: int
    clock_rate_ghz: float
    device_memory_size: int           # bytes

    def target_config(self) -> str:
        """The text-format GpuTargetConfigProto for `get_topology_desc(platform="cuda", target_config=...)`."""
        major, minor = self.compute_capability
        info = dict(threads_per_block_limit=1024, threads_per_warp=32, shared_memory_per_block=49152,
                    shared_memory_per_core=self.shared_memory_per_core, threads_per_core_limit=2048,
                    core_count=self.core_count, fpus_per_core=self.fpus_per_core,
                    block_dim_limit_x=2 ** 31 - 1, block_dim_limit_y=65535, block_dim_limit_z=65535,
                    memory_bandwidth=self.memory_bandwidth, l2_cache_size=self.l2_cache_size,
                    clock_rate_ghz=self.clock_rate_ghz, device_memory_size=self.device_memory_size,
                    shared_memory_per_block_optin=self.shared_memory_per_block_optin,
                    registers_per_core_limit=65536, registers_per_block_limit=65536)
        lines = ["gpu_device_info {"] + [f"  {k}: {v}" for k, v in info.items()]
        lines += [f"  cuda_compute_capability {{ major: {major} minor: {minor} }}", "}",
                  'platform_name: "CUDA"',
                  "dnn_version_info {{ major: {} minor: {} patch: {} }}".format(*CUDNN_VERSION),
                  f'device_description_str: "{self.name}"']
        return "\n".join(lines) + "\n"


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: str                     # "gpu" | "tpu"
    device_kind: str
    memory_bytes: int                 # one device's memory
    peak_bf16_flops: float            # dense bf16 matmul peak of one device, FLOP/s
    gpu: Optional[GpuFacts] = None
    tpu_generation: Optional[str] = None     # libtpu topology prefix ("v5p", "v5e", "v6e")
    tpu_dims: int = 0                        # 3 (v5p: AxBxC) or 2 (v5e / v6e: AxB)


_H100 = GpuFacts("NVIDIA H100 80GB HBM3", (9, 0), 132, 128, 233472, 232448, 3_352_320_000_000, 50 * 2 ** 20, 1.98,
                 84_942_979_072)
_H200 = dataclasses.replace(_H100, name="NVIDIA H200 141GB HBM3e", memory_bandwidth=4_800_000_000_000,
                            device_memory_size=151_397_597_184)
_A100 = GpuFacts("NVIDIA A100-SXM4-80GB", (8, 0), 108, 64, 167936, 166912, 2_039_040_000_000, 40 * 2 ** 20, 1.41,
                 85_100_068_864)

TARGETS: dict[str, Target] = {
    "h100": Target("h100", "gpu", _H100.name, _H100.device_memory_size, 989.4e12, gpu=_H100),
    "h200": Target("h200", "gpu", _H200.name, _H200.device_memory_size, 989.4e12, gpu=_H200),
    "a100-80g": Target("a100-80g", "gpu", _A100.name, _A100.device_memory_size, 312e12, gpu=_A100),
    # TPU memory: the HBM libtpu's compiler counts as available (its out-of-memory message names it).
    "tpu-v5p": Target("tpu-v5p", "tpu", "TPU v5", int(95.74 * GIB), 459e12, tpu_generation="v5p", tpu_dims=3),
    "tpu-v5e": Target("tpu-v5e", "tpu", "TPU v5 lite", int(15.75 * GIB), 197e12, tpu_generation="v5e", tpu_dims=2),
    "tpu-v6e": Target("tpu-v6e", "tpu", "TPU v6 lite", int(31.25 * GIB), 918e12, tpu_generation="v6e", tpu_dims=2),
}
# Smallest TPU slices libtpu describes (one host: 2x2 chips); a run on fewer chips uses the first of them.
_TPU_SHAPES = {3: {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4"},
               2: {4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8"}}


def get(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise ValueError(f"unknown target {name!r}; expected one of {', '.join(TARGETS)}") from None


def topology(name: str, devices: int = 1):
    """(topology description, the `devices` devices of it a program runs on) for a target."""
    from jax.experimental import topologies

    # Compiling uses no TPU: several processes may hold libtpu at once (else it takes a machine-wide lock file).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    t = get(name)
    if devices < 1:
        raise ValueError(f"devices must be >= 1, got {devices}")
    if t.platform == "gpu":
        desc = topologies.get_topology_desc(platform="cuda", target_config=t.gpu.target_config(),
                                            topology=f"1x1x{devices}")
        return desc, list(desc.devices)
    shapes = _TPU_SHAPES[t.tpu_dims]
    slice_chips = next((n for n in sorted(shapes) if n >= devices), None)
    if slice_chips is None:
        raise ValueError(f"{name}: at most {max(shapes)} chips are described here, asked for {devices}")
    desc = topologies.get_topology_desc(platform="tpu", topology_name=f"{t.tpu_generation}:{shapes[slice_chips]}")
    return desc, list(desc.devices)[:devices]
