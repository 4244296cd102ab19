"""Sharding as data: the device mesh, one rules table, and multi-host start-up.

The model names the axes of its parameters and activations logically
("embed", "heads", "mlp", "batch", ...); `RULES` maps each logical axis to mesh
axes of a `(data, fsdp, tensor)` mesh:

  * data + fsdp split the batch (data parallelism over both);
  * fsdp also splits every weight's "embed" axis, so parameters and the
    optimizer state (same shapes) are sharded ZeRO-3 style and gathered per use;
  * tensor splits attention heads, the MLP width and the vocabulary.

A parameter dimension that the mesh axis does not divide stays replicated
(`param_specs` says which). Activations are constrained at block boundaries
with `constrain`, a no-op outside a mesh (`jax.set_mesh`), so the model code
runs unchanged on one device. Multi-host runs start with `initialize`:
`jax.distributed` from SLURM's variables or an explicit coordinator.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

log = logging.getLogger(__name__)

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# The one rules table: logical axis -> mesh axes (None: replicated).
RULES: dict[str, object] = {
    "batch": BATCH_AXES,
    "embed": "fsdp",
    "vocab": "tensor",
    "heads": "tensor",
    "kv_heads": "tensor",
    "mlp": "tensor",
    "layers": None,
    "head_dim": None,
    "norm": None,
    "seq": None,
    "act_embed": None,      # activations keep their width whole: weights are gathered instead
    "patch": None,
    "positions": None,
    "channels": None,
}

# Parameter path (regex on "/"-joined names) -> logical axes, first match wins.
PARAM_AXES: tuple[tuple[str, tuple[Optional[str], ...]], ...] = (
    (r"^llm/embed_tokens$", ("vocab", "embed")),
    (r"^llm/lm_head$", ("embed", "vocab")),
    (r"^llm/vst_embed$", (None, "embed")),
    (r"^llm/norm/scale$", ("norm",)),
    (r"^llm/layers/(vst_)?q_proj/kernel$", ("layers", "embed", "heads", "head_dim")),
    (r"^llm/layers/(vst_)?q_proj/bias$", ("layers", "heads", "head_dim")),
    (r"^llm/layers/(vst_)?[kv]_proj/kernel$", ("layers", "embed", "kv_heads", "head_dim")),
    (r"^llm/layers/(vst_)?[kv]_proj/bias$", ("layers", "kv_heads", "head_dim")),
    (r"^llm/layers/o_proj/kernel$", ("layers", "heads", "head_dim", "embed")),
    (r"^llm/layers/mlp/(gate|up)_proj/kernel$", ("layers", "embed", "mlp")),
    (r"^llm/layers/mlp/down_proj/kernel$", ("layers", "mlp", "embed")),
    (r"^llm/layers/\w+_norm/scale$", ("layers", "norm")),
    (r"^projector/fc\d/kernel$", (None, "embed")),
    (r"^projector/fc\d/bias$", (None,)),
    (r"^vision/layers/[qkv]_proj/kernel$", ("layers", "embed", "heads", "head_dim")),
    (r"^vision/layers/[qkv]_proj/bias$", ("layers", "heads", "head_dim")),
    (r"^vision/layers/out_proj/kernel$", ("layers", "heads", "head_dim", "embed")),
    (r"^vision/layers/fc1/kernel$", ("layers", "embed", "mlp")),
    (r"^vision/layers/fc1/bias$", ("layers", "mlp")),
    (r"^vision/layers/fc2/kernel$", ("layers", "mlp", "embed")),
    (r"^vision/layers/(fc2|out_proj)/bias$", ("layers", "norm")),
    (r"^vision/layers/layer_norm\d/(scale|bias)$", ("layers", "norm")),
    (r"^vision/patch_embed$", ("patch", "patch", "channels", "embed")),
    (r"^vision/pos_embed$", ("positions", "embed")),
    (r"^vision/(class_embed|(pre|post)_norm/(scale|bias))$", ("norm",)),
)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Mesh axis sizes; one of them may be -1: all remaining devices."""

    data: int = -1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        sizes = [self.data, self.fsdp, self.tensor]
        if sizes.count(-1) > 1 or any(not isinstance(s, int) or s == 0 or s < -1 for s in sizes):
            raise ValueError(f"mesh sizes must be positive integers with at most one -1, got {self}")

    def shape(self, num_devices: int) -> tuple[int, int, int]:
        sizes = [self.data, self.fsdp, self.tensor]
        known = int(np.prod([s for s in sizes if s != -1]))
        if -1 in sizes:
            if num_devices % known:
                raise ValueError(f"{num_devices} devices do not split into a mesh {self}")
            sizes[sizes.index(-1)] = num_devices // known
        if int(np.prod(sizes)) != num_devices:
            raise ValueError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {int(np.prod(sizes))} devices, "
                             f"there are {num_devices}")
        return tuple(sizes)


def make_mesh(cfg: MeshConfig = MeshConfig(), devices: Optional[Sequence] = None) -> Mesh:
    devices = list(devices) if devices is not None else jax.devices()
    shape = cfg.shape(len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def param_name(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def _rule(name: str) -> Optional[tuple[str, tuple[Optional[str], ...]]]:
    return next(((p, axes) for p, axes in PARAM_AXES if name and re.search(p, name)), None)


def logical_axes(name: str, ndim: int) -> tuple[Optional[str], ...]:
    rule = _rule(name)
    if rule is None:
        raise ValueError(f"no sharding rule for parameter {name}; add one to parallel.PARAM_AXES")
    pattern, axes = rule
    if len(axes) != ndim:
        raise ValueError(f"{name}: rule {pattern} names {len(axes)} axes, the parameter has {ndim}")
    return axes


def spec_for(axes: Sequence[Optional[str]], shape: Sequence[int], mesh_shape: dict) -> P:
    """PartitionSpec of logical `axes` under RULES; a mesh axis that does not divide the dim is dropped."""
    out, used = [], set()
    for axis, dim in zip(axes, shape):
        mesh_axes = RULES.get(axis) if axis is not None else None
        if mesh_axes is None:
            out.append(None)
            continue
        names = (mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes)
        names = tuple(n for n in names if n not in used and mesh_shape.get(n, 1) > 1)
        size = int(np.prod([mesh_shape[n] for n in names])) if names else 1
        if not names or dim % size:
            out.append(None)
            continue
        used.update(names)
        out.append(names[0] if len(names) == 1 else names)
    return P(*out)


def param_specs(params, mesh: Mesh):
    """PartitionSpec per parameter (same tree) from PARAM_AXES and RULES."""
    shape = dict(mesh.shape)
    return jax.tree_util.tree_map_with_path(
        lambda path, x: spec_for(logical_axes(param_name(path), x.ndim), x.shape, shape), params)


def param_shardings(params, mesh: Mesh):
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params, mesh))


def tree_shardings(tree, mesh: Mesh):
    """NamedSharding per leaf of any tree that holds params (a train state: params, Adam moments, ...).

    A leaf is recognised by the dict keys that end its path ("llm/layers/q_proj/kernel" inside
    `opt_state...mu`): one that names a parameter gets that parameter's spec; anything else
    (step counters, PRNG keys) is replicated.
    """
    shape = dict(mesh.shape)

    def one(path, x):
        keys = []
        for k in reversed(path):
            if not isinstance(k, jax.tree_util.DictKey):
                break
            keys.append(str(k.key))
        rule = _rule("/".join(reversed(keys)))
        if rule is None or len(rule[1]) != len(x.shape):
            return NamedSharding(mesh, P())
        return NamedSharding(mesh, spec_for(rule[1], x.shape, shape))

    return jax.tree_util.tree_map_with_path(one, tree)


def constrain(x: jax.Array, axes: Sequence[Optional[str]]) -> jax.Array:
    """Sharding constraint by logical axes inside the current mesh (`jax.set_mesh`); no-op outside one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    return jax.lax.with_sharding_constraint(x, spec_for(axes, x.shape, dict(mesh.shape)))


def host_to_global(tree, mesh: Mesh, *, replicated: bool = False, abstract: bool = False):
    """Process-local numpy arrays (this host's rows) -> global jax Arrays sharded on `mesh`.

    Each process passes its own rows; the global batch is their concatenation
    in process order (one process: the array itself), its leading axis split
    over (data, fsdp). `replicated`: every process passes the same whole array.
    `abstract`: their `jax.ShapeDtypeStruct` twins with the same shardings, nothing
    placed (to lower a program for a mesh with no devices, a compile-only topology).
    """
    procs = jax.process_count()

    def one(x):
        x = np.asarray(x)
        if replicated or x.ndim == 0:
            spec = P()
        else:
            rows = x.shape[0] * procs
            spec = spec_for(("batch",) + (None,) * (x.ndim - 1), (rows, *x.shape[1:]), dict(mesh.shape))
            if procs > 1 and spec[0] is None and mesh.shape["data"] * mesh.shape["fsdp"] > 1:
                raise ValueError(f"{rows} global rows do not split over data x fsdp = "
                                 f"{mesh.shape['data'] * mesh.shape['fsdp']} ways")
        sharding = NamedSharding(mesh, spec)
        if abstract:
            return jax.ShapeDtypeStruct((x.shape[0] * procs, *x.shape[1:]) if x.ndim and not replicated else x.shape,
                                        x.dtype, sharding=sharding)
        if procs == 1:
            return jax.device_put(x, sharding)
        return jax.make_array_from_process_local_data(sharding, x)
    return jax.tree.map(one, tree)


# ------------------------------------------------------------------ multi-host

def initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> bool:
    """Starts `jax.distributed` when the run spans processes; returns whether it did.

    An explicit coordinator ("host:port") needs num_processes and process_id
    (or VXL_NUM_PROCESSES / VXL_PROCESS_ID). Under SLURM with more than one
    task, jax detects everything from SLURM's variables. Otherwise: one
    process, nothing to do.
    """
    coordinator = coordinator or os.environ.get("VXL_COORDINATOR")
    if coordinator:
        num_processes = num_processes if num_processes is not None else _env_int("VXL_NUM_PROCESSES")
        process_id = process_id if process_id is not None else _env_int("VXL_PROCESS_ID")
        if num_processes is None or process_id is None:
            raise ValueError("an explicit coordinator needs num_processes and process_id "
                             "(--num-processes/--process-id or VXL_NUM_PROCESSES/VXL_PROCESS_ID)")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    elif int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ:
        jax.distributed.initialize()
    else:
        return False
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def _env_int(name: str) -> Optional[int]:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else None
