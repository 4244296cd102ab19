"""The platform a program is built for: the mesh in context, else the process's devices.

Everything that differs by accelerator (the attention backend, CLIP's attention,
CLIP's frame chunking) asks here, while tracing, never `jax.default_backend()`:
a program compiled on this CPU host for an H100 or a TPU topology (`vxl aot`,
a compile-only mesh set with `jax.set_mesh`) must take the GPU's or the TPU's
choices, and a CPU custom call must never reach it.

    with jax.set_mesh(mesh):          # any mesh: real devices or a compile-only topology
        target.platform()             # "cpu" | "gpu" | "tpu", from the mesh's devices
        target.device_count()         # the mesh's size

Outside a mesh both describe the process (`jax.default_backend()`, `jax.device_count()`).
"""

from __future__ import annotations

import jax

PLATFORMS = ("cpu", "gpu", "tpu")
_ALIASES = {"cuda": "gpu", "rocm": "gpu", "gpu": "gpu", "cpu": "cpu", "tpu": "tpu"}


def normalise(name: str) -> str:
    """A JAX platform name ("cuda", "rocm", "gpu", "cpu", "tpu") as one of PLATFORMS."""
    try:
        return _ALIASES[name.lower()]
    except KeyError:
        raise ValueError(f"unknown platform {name!r}; expected one of {sorted(_ALIASES)}") from None


def _mesh():
    mesh = jax.sharding.get_abstract_mesh()
    return None if mesh.empty else mesh


def platform() -> str:
    """The platform of the devices the program being built runs on."""
    mesh = _mesh()
    return normalise(mesh.abstract_device.platform if mesh is not None else jax.default_backend())


def device_count() -> int:
    """How many devices the program being built spans."""
    mesh = _mesh()
    return mesh.size if mesh is not None else jax.device_count()
