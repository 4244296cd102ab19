"""Fused flash-attention forward and backward on the CPU: `cpu_attention.cc` as XLA FFI custom calls.

    from vxl_jax.kernels import cpu_attention
    if cpu_attention.available():
        out, lse = cpu_attention.forward(q, k, v, mem_k, mem_v, mem_len)        # jittable
        dq, dk, dv, d_mem_k, d_mem_v = cpu_attention.backward(
            q, k, v, mem_k, mem_v, mem_len, None, out, lse, d_out)              # jittable

computes what `vxl_jax.model.attention._forward` computes (float32 only): q [B, T, N, H] over the kept
memory (entries [0, mem_len[b]) of mem_k/mem_v [B, S, K, H], no mask inside, the rest is scratch and never
read) and the step's own keys k/v [B, U, K, H], query t seeing own keys j <= q_pos[b, t] (default
arange(T): causal). Returns out [B, T, N, H] and lse [B, K, G, T] (natural log-sum-exp of the scaled
scores; a row that sees no key gets out 0 and lse -1e30). `backward` is the flash-attention backward of
the same function (what `attention._flash_bwd` computes), recomputing the scores chunk by chunk.

The source is compiled once per machine with the system C++ compiler (`$CXX`, default g++) into
`$VXL_KERNEL_CACHE` (default ~/.cache/vxl-jax/kernels/), the file keyed by the source, the flags, the
compiler and the CPU, so that another machine rebuilds. `VXL_KERNEL_THREADS` sets the number of threads
the kernel uses (default: the hardware concurrency).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from typing import Optional

import jax
import jax.numpy as jnp

SOURCE = pathlib.Path(__file__).with_name("cpu_attention.cc")
TARGET = "vxl_flash_attention_forward_f32"          # the FFI target name
SYMBOL = "VxlFlashAttentionForwardF32"              # the handler's symbol in the library
TARGET_BACKWARD = "vxl_flash_attention_backward_f32"
SYMBOL_BACKWARD = "VxlFlashAttentionBackwardF32"
_FLAGS = ("-O3", "-march=native", "-shared", "-fPIC", "-std=c++17", "-pthread")

_lock = threading.Lock()
_state: dict = {"done": False, "lib": None, "reason": None}


def _compiler() -> Optional[str]:
    return shutil.which(os.environ.get("CXX", "g++"))


def cpu_signature() -> str:
    """The CPU's model and feature flags (what -march=native compiles for)."""
    try:
        text = pathlib.Path("/proc/cpuinfo").read_text()
        keep = [line for line in text.splitlines()
                if line.split(":")[0].strip() in ("model name", "flags", "Features", "CPU implementer", "CPU part")]
        return "\n".join(dict.fromkeys(keep))
    except OSError:
        return f"{platform.machine()} {platform.processor()}"


def _cache_dir() -> pathlib.Path:
    root = os.environ.get("VXL_KERNEL_CACHE")
    path = pathlib.Path(root) if root else pathlib.Path.home() / ".cache" / "vxl-jax" / "kernels"
    try:
        path.mkdir(parents=True, exist_ok=True)
        return path
    except OSError:
        fallback = pathlib.Path(tempfile.gettempdir()) / f"vxl-jax-kernels-{os.getuid() if hasattr(os, 'getuid') else 0}"
        fallback.mkdir(parents=True, exist_ok=True)
        return fallback


def _build(compiler: str, extra_flags: tuple[str, ...] = ()) -> pathlib.Path:
    """Compile the source (unless this source/flags/compiler/CPU is built already); returns the library.

    extra_flags: appended to the compiler flags (tests build the portable path with -mno-avx512f)."""
    include = jax.ffi.include_dir()
    flags = list(_FLAGS) + list(extra_flags) + [f"-I{include}"]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout
    key = hashlib.sha256()
    for part in (SOURCE.read_bytes(), " ".join(_FLAGS + tuple(extra_flags)).encode(), version.encode(),
                 cpu_signature().encode(),
                 jax.__version__.encode(), include.encode()):
        key.update(part)
        key.update(b"\0")
    folder = _cache_dir()
    lib = folder / f"cpu_attention-{key.hexdigest()[:20]}.so"
    if lib.is_file():
        return lib
    fd, tmp = tempfile.mkstemp(prefix=lib.stem + ".", suffix=".tmp.so", dir=folder)
    os.close(fd)
    try:
        proc = subprocess.run([compiler, *flags, str(SOURCE), "-o", tmp], capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{compiler} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")
        os.replace(tmp, lib)                 # atomic: a concurrent build ends with the same file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


def _load() -> None:
    """Build, load and register once per process; keeps the reason when that is not possible."""
    with _lock:
        if _state["done"]:
            return
        try:
            if jax.default_backend() != "cpu":
                raise RuntimeError(f"the default JAX backend is {jax.default_backend()!r}, not cpu")
            compiler = _compiler()
            if compiler is None:
                raise RuntimeError(f"no C++ compiler found ({os.environ.get('CXX', 'g++')!r}; set CXX)")
            lib = ctypes.CDLL(str(_build(compiler)))
            jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(getattr(lib, SYMBOL)), platform="cpu")
            jax.ffi.register_ffi_target(TARGET_BACKWARD, jax.ffi.pycapsule(getattr(lib, SYMBOL_BACKWARD)),
                                        platform="cpu")
            _state["lib"] = lib
        except Exception as err:  # noqa: BLE001 - available() never raises; the reason is kept
            _state["reason"] = f"{type(err).__name__}: {err}"
            warnings.warn(f"vxl_jax CPU attention kernel unavailable: {_state['reason']}", RuntimeWarning,
                          stacklevel=3)
        _state["done"] = True


def available() -> bool:
    """Whether the kernel is built and registered (building it on the first call). Never raises."""
    try:
        _load()
    except Exception as err:  # noqa: BLE001
        _state["reason"] = f"{type(err).__name__}: {err}"
        return False
    return _state["lib"] is not None


def unavailable_reason() -> Optional[str]:
    """Why `available()` returned False (None when it is available or was not asked yet)."""
    return _state["reason"]


def _check(name: str, x, rank: int) -> None:
    if getattr(x, "ndim", None) != rank:
        raise ValueError(f"{name} must have rank {rank}, got shape {getattr(x, 'shape', None)}")


def _validate(q, k, v, mem_k, mem_v, mem_len, q_pos):
    """Checks the primal inputs; returns (b, t, n, h, kv_heads, mem_len int32, q_pos int32)."""
    arrays = dict(q=q, k=k, v=v, mem_k=mem_k, mem_v=mem_v)
    for name, x in arrays.items():
        _check(name, x, 4)
        if jnp.dtype(x.dtype) != jnp.float32:
            raise ValueError(f"{name} must be float32, got {x.dtype} (the kernel takes float32 only)")
    b, t, n, h = q.shape
    if k.shape != v.shape:
        raise ValueError(f"k {k.shape} and v {v.shape} must have the same shape")
    if mem_k.shape != mem_v.shape:
        raise ValueError(f"mem_k {mem_k.shape} and mem_v {mem_v.shape} must have the same shape")
    _, u, kv_heads, hk = k.shape
    if k.shape[0] != b or mem_k.shape[0] != b:
        raise ValueError(f"batch sizes differ: q {q.shape}, k {k.shape}, mem_k {mem_k.shape}")
    if hk != h or mem_k.shape[3] != h:
        raise ValueError(f"head dims differ: q {q.shape}, k {k.shape}, mem_k {mem_k.shape}")
    if mem_k.shape[2] != kv_heads:
        raise ValueError(f"kv heads differ: k {k.shape}, mem_k {mem_k.shape}")
    if kv_heads == 0 or n % kv_heads:
        raise ValueError(f"query heads {n} must be a positive multiple of kv heads {kv_heads}")
    mem_len = jnp.asarray(mem_len)
    _check("mem_len", mem_len, 1)
    if mem_len.shape != (b,) or not jnp.issubdtype(mem_len.dtype, jnp.integer):
        raise ValueError(f"mem_len must be an integer array of shape ({b},), got {mem_len.dtype}{mem_len.shape}")
    if q_pos is None:
        q_pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    else:
        q_pos = jnp.asarray(q_pos)
        _check("q_pos", q_pos, 2)
        if q_pos.shape != (b, t) or not jnp.issubdtype(q_pos.dtype, jnp.integer):
            raise ValueError(f"q_pos must be an integer array of shape ({b}, {t}), got {q_pos.dtype}{q_pos.shape}")
    if not available():
        raise RuntimeError(f"the CPU attention kernel is unavailable: {unavailable_reason()}")
    return b, t, n, h, kv_heads, jnp.asarray(mem_len, jnp.int32), jnp.asarray(q_pos, jnp.int32)


def forward(q, k, v, mem_k, mem_v, mem_len, q_pos=None):
    """Flash-attention forward: (out [B, T, N, H], lse [B, K, G, T]), float32.

    q [B, T, N, H]; k, v [B, U, K, H] (the step's own keys; U = 0 allowed); mem_k, mem_v [B, S, K, H]
    (S = 0 allowed); mem_len [B] integer (entries [0, mem_len[b]) visible to every query, clipped to
    [0, S]); q_pos [B, T] integer or None (= arange(T)): query t sees own keys j <= q_pos[b, t].
    N must be a multiple of K. Scores are scaled by H ** -0.5.
    """
    b, t, n, h, kv_heads, mem_len, q_pos = _validate(q, k, v, mem_k, mem_v, mem_len, q_pos)
    call = jax.ffi.ffi_call(
        TARGET,
        (jax.ShapeDtypeStruct((b, t, n, h), jnp.float32),
         jax.ShapeDtypeStruct((b, kv_heads, n // kv_heads, t), jnp.float32)),
        vmap_method="sequential")
    out, lse = call(q, k, v, mem_k, mem_v, mem_len, q_pos)
    return out, lse


def backward(q, k, v, mem_k, mem_v, mem_len, q_pos, out, lse, d_out):
    """Flash-attention backward of `forward`: (dq, dk, dv, d_mem_k, d_mem_v), float32, shaped as the inputs.

    q_pos may be None (= arange(T)); out [B, T, N, H] and lse [B, K, G, T] are `forward`'s results (the
    probabilities are recomputed as exp(scaled score - lse)), d_out [B, T, N, H] the output's cotangent.
    d_mem_k/d_mem_v are exactly 0 at entries >= mem_len[b] (scratch, never read); rows that see no key
    (lse -1e30) contribute nothing.
    """
    b, t, n, h, kv_heads, mem_len, q_pos = _validate(q, k, v, mem_k, mem_v, mem_len, q_pos)
    for name, x, shape in (("out", out, q.shape), ("d_out", d_out, q.shape),
                           ("lse", lse, (b, kv_heads, n // kv_heads, t))):
        if tuple(getattr(x, "shape", ())) != tuple(shape) or jnp.dtype(x.dtype) != jnp.float32:
            raise ValueError(f"{name} must be float32 of shape {tuple(shape)}, got "
                             f"{getattr(x, 'dtype', None)}{getattr(x, 'shape', None)}")
    call = jax.ffi.ffi_call(
        TARGET_BACKWARD,
        tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v, mem_k, mem_v)),
        vmap_method="sequential")
    return tuple(call(q, k, v, mem_k, mem_v, mem_len, q_pos, out, lse, d_out))


__all__ = ["available", "unavailable_reason", "forward", "backward", "TARGET", "TARGET_BACKWARD", "SOURCE"]
