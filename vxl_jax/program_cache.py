"""Compiled programs kept on disk, so that a new process does not trace, lower or compile them again.

JAX's persistent compilation cache saves only the compiling: each process still traces and lowers every
program to compute that cache's key (the lowered module's hash). On a warm `vxl infer` that is about 0.6 s of
~2 s. This cache keys a program by what decides its trace instead:
- the function's name;
- the source of the whole package (any edit gives new keys);
- the versions of jax and jaxlib, jax's configuration, `XLA_FLAGS` and the `VXL_*` environment;
- the devices, the CPU model and features, and whether the CPU attention kernel is available;
- the static arguments' `repr`, and the tree, shapes, dtypes, weak types and shardings of the others.

It stores the serialized executable under that key. A process that finds the entry loads it and calls it
directly.

    fn = program_cache.jit(f, static_argnames=("cfg",))    # a drop-in for jax.jit(f, ...)
    program_cache.set_folder("~/.cache/my_programs")        # None: off (plain jax.jit)

By default (`FOLLOW_JAX`) the cache is on exactly when JAX's persistent compilation cache is: in the
subfolder `programs` of its folder (`JAX_COMPILATION_CACHE_DIR`, `jax.config.update(
"jax_compilation_cache_dir", ...)`, or `vxl --compilation-cache`), if that is a local folder. Calls fall
back to plain `jax.jit` in these cases:
- the cache is off;
- a static argument's repr names an object address (it would never match again) or is summarised (`...`);
- an argument lives on more than one device;
- the process sees more than one device;
- the package has no source files to hash (a bytecode-only install).

An entry that cannot be read is compiled again and rewritten. Entries are never evicted: delete the folder to
empty it. Entries are pickles of executables, as in JAX's own cache: keep the folder where only you can write.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
import pathlib
import pickle
import sys
import tempfile
import threading
import warnings
from typing import Any, Callable, Optional, Sequence

import jax
import numpy as np

# Bump when the entry layout changes.
_FORMAT = 1
_PACKAGE = pathlib.Path(__file__).resolve().parent
# Settings of caches and logging, not of what a program computes.
_CONFIG_IGNORED = ("jax_compilation_cache", "jax_enable_compilation_cache", "jax_persistent_cache",
                   "jax_raise_persistent_cache_errors", "jax_log", "jax_explain_cache", "jax_debug_log_modules")

FOLLOW_JAX = "follow-jax"      # set_folder(FOLLOW_JAX): <JAX's persistent cache folder>/programs while that is on
PROGRAMS = "programs"

_lock = threading.Lock()
_folder: Any = FOLLOW_JAX
_fingerprint: Optional[bytes] = None
_warned: set = set()


def set_folder(folder: Optional[str]) -> Optional[str]:
    """Keeps compiled programs in `folder` (created when needed); None turns the cache off; FOLLOW_JAX (the
    default) follows JAX's persistent cache. Returns the previous setting (to pass back to `set_folder`)."""
    global _folder
    old = _folder if _folder in (None, FOLLOW_JAX) else str(_folder)
    _folder = folder if folder in (None, FOLLOW_JAX) else pathlib.Path(os.path.expanduser(folder))
    return old


def folder() -> Optional[str]:
    """The folder programs are kept in now (None: off)."""
    path = _current_folder()
    return None if path is None else str(path)


def _current_folder() -> Optional[pathlib.Path]:
    if _folder != FOLLOW_JAX:
        return _folder
    jax_folder = jax.config.jax_compilation_cache_dir
    if not jax.config.jax_enable_compilation_cache or not jax_folder or "://" in jax_folder:
        return None
    return pathlib.Path(os.path.expanduser(jax_folder)) / PROGRAMS


def _source_digest() -> Optional[bytes]:
    """A hash of the package's source files; None where there are none to read (an install of bytecode only:
    then nothing would tell one version's programs from another's, and the cache stays off)."""
    digest, found = hashlib.sha256(), False
    for path in sorted(_PACKAGE.rglob("*")):
        if path.suffix in (".py", ".cc", ".h") and "__pycache__" not in path.parts:
            digest.update(str(path.relative_to(_PACKAGE)).encode())
            digest.update(path.read_bytes())
            found = True
    return digest.digest() if found else None


def _config_items() -> list[tuple[str, str]]:
    values = getattr(jax.config, "values", {})
    return sorted((name, repr(value)) for name, value in values.items()
                  if not name.startswith(_CONFIG_IGNORED))


def _host_state() -> str:
    """On CPU: the processor (XLA compiles for the host's features; a shared home folder may see several kinds)
    and whether our attention kernel is available (this also registers it before any program is loaded)."""
    if jax.default_backend() != "cpu":
        return "not cpu"
    from vxl_jax.kernels import cpu_attention

    return f"{cpu_attention.cpu_signature()}\ncpu kernel {cpu_attention.available()}"


def _process_fingerprint() -> Optional[bytes]:
    """What cannot change while the process runs: versions, our source, devices, the host (computed once).
    None: no source to hash (the cache stays off)."""
    global _fingerprint
    if _fingerprint is None:
        import jaxlib

        source = _source_digest()
        if source is None:
            _fingerprint = b""
        else:
            parts = [str(_FORMAT), jax.__version__, jaxlib.__version__, sys.version, source.hex(),
                     repr([(d.platform, d.device_kind, d.id) for d in jax.devices()]), _host_state()]
            _fingerprint = hashlib.sha256("\0".join(parts).encode()).digest()
    return _fingerprint or None


def fingerprint() -> Optional[bytes]:
    """What every key shares: the process's fingerprint, jax's configuration and the environment, as they are now.
    None: the cache cannot tell versions apart here (see `_source_digest`)."""
    process = _process_fingerprint()
    if process is None:
        return None
    environment = sorted((k, v) for k, v in os.environ.items() if k.startswith("VXL_") and k != "VXL_COMPILATION_CACHE")
    parts = [process.hex(), repr(_config_items()), os.environ.get("XLA_FLAGS", ""), repr(environment)]
    return hashlib.sha256("\0".join(parts).encode()).digest()


def _leaf_signature(x: Any) -> Optional[str]:
    """A leaf's shape, dtype, weak type and placement; None for a leaf this cache does not handle."""
    if isinstance(x, jax.Array):
        if len(x.sharding.device_set) != 1:
            return None
        return f"{jax.typeof(x)}@{x.sharding}"
    if isinstance(x, (np.ndarray, np.generic, bool, int, float, complex)):
        try:
            return str(jax.typeof(x))       # "~" marks a weak type
        except (TypeError, OverflowError):
            return None
    return None


class CachedJit:
    """`jax.jit(fun, static_argnames=...)` whose compiled programs are also kept on disk (see the module doc).

    Static arguments may be passed by position or keyword, as with jax.jit. `lower`, `trace` and `eval_shape`
    are the jitted function's own.
    """

    def __init__(self, fun: Callable, *, static_argnames: Sequence[str] = (), **jit_kwargs):
        if "static_argnums" in jit_kwargs:
            raise ValueError("program_cache.jit takes static_argnames only (statics are keyed by name)")
        self._jitted = jax.jit(fun, static_argnames=tuple(static_argnames), **jit_kwargs)
        self._static = frozenset(static_argnames)
        params = list(inspect.signature(fun).parameters.values())
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        self._static_positions = {i: p.name for i, p in enumerate(params)
                                  if p.kind in positional and p.name in self._static}
        self._name = f"{fun.__module__}.{fun.__qualname__}"
        self._programs: dict[str, Any] = {}
        functools.update_wrapper(self, fun)

    def __getattr__(self, name):
        return getattr(self._jitted, name)

    def __call__(self, *args, **kwargs):
        where = _current_folder()
        if where is None or jax.device_count() != 1:
            return self._jitted(*args, **kwargs)
        statics = {k: v for k, v in kwargs.items() if k in self._static}
        statics.update((self._static_positions[i], a) for i, a in enumerate(args) if i in self._static_positions)
        dynamic = {k: v for k, v in kwargs.items() if k not in self._static}
        dynamic_args = [a for i, a in enumerate(args) if i not in self._static_positions]
        key = self._key(dynamic_args, dynamic, statics)
        if key is None:
            return self._jitted(*args, **kwargs)
        compiled = self._programs.get(key)
        if compiled is None:
            compiled = self._load(where, key)
            if compiled is None:
                compiled = _compile_uncached(self._jitted.lower(*args, **kwargs))
                self._store(where, key, compiled)
            self._programs[key] = compiled
        return compiled(*dynamic_args, **dynamic)

    def _key(self, args, dynamic, statics) -> Optional[str]:
        static_text = repr(sorted(statics.items()))
        if " at 0x" in static_text or "..." in static_text:   # an address, or a summarised array: not a key
            return None
        leaves, tree = jax.tree.flatten((args, dynamic))
        signatures = [_leaf_signature(x) for x in leaves]
        if any(s is None for s in signatures):
            return None
        shared = fingerprint()
        if shared is None:
            return None
        digest = hashlib.sha256(shared)
        for part in (self._name, static_text, str(tree), *signatures):
            digest.update(part.encode())
            digest.update(b"\0")
        return digest.hexdigest()

    def _path(self, where: pathlib.Path, key: str) -> pathlib.Path:
        return where / f"{self._name.rsplit('.', 1)[-1].lstrip('_')}-{key[:40]}.pkl"

    def _load(self, where: pathlib.Path, key: str):
        from jax.experimental import serialize_executable

        path = self._path(where, key)
        try:
            with open(path, "rb") as f:
                entry = pickle.load(f)
            if entry.get("key") != key:
                raise ValueError("the entry's key differs from its name")
            return serialize_executable.deserialize_and_load(entry["executable"], entry["in_tree"],
                                                             entry["out_tree"])
        except (FileNotFoundError, NotADirectoryError):   # not there (writing it says why, if it cannot be)
            return None
        except Exception as err:  # noqa: BLE001 - a bad entry is compiled again and replaced
            self._warn(f"could not load {path} ({type(err).__name__}: {err}); compiling it again")
            return None

    def _store(self, where: pathlib.Path, key: str, compiled) -> None:
        from jax.experimental import serialize_executable

        try:
            executable, in_tree, out_tree = serialize_executable.serialize(compiled)
            data = pickle.dumps({"key": key, "name": self._name, "executable": executable, "in_tree": in_tree,
                                 "out_tree": out_tree}, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as err:  # noqa: BLE001 - not every program serializes; it still runs
            self._warn(f"{self._name} is not kept on disk ({type(err).__name__}: {err})")
            return
        path, tmp = self._path(where, key), None
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=path.stem + ".", suffix=".tmp", dir=path.parent)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, path)          # atomic: a reader sees the old entry, the new one, or none
        except OSError as err:
            self._warn(f"cannot write {path} ({err.strerror or err})")
            if tmp is not None and os.path.exists(tmp):
                os.unlink(tmp)

    def _warn(self, message: str) -> None:
        with _lock:
            if message in _warned:
                return
            _warned.add(message)
        warnings.warn(f"vxl_jax program cache: {message}", RuntimeWarning, stacklevel=3)


def _compile_uncached(lowered):
    """Compiles `lowered` with JAX's persistent cache skipped.

    An executable that jax read from its persistent cache while compiling serializes without its code. On XLA
    CPU, loading that copy later fails when it runs ("Function negate_power_fusion.1 not found"). Each entry is
    compiled once, so the skipped lookup costs that one compilation.
    """
    from jax.experimental.compilation_cache import compilation_cache as jax_cache

    if not jax.config.jax_enable_compilation_cache:
        return lowered.compile()
    with _lock:
        jax.config.update("jax_enable_compilation_cache", False)
        jax_cache.reset_cache()        # jax decides once per process whether its cache is used: ask it again
        try:
            return lowered.compile()
        finally:
            jax.config.update("jax_enable_compilation_cache", True)
            jax_cache.reset_cache()


def jit(fun: Callable, *, static_argnames: Sequence[str] = (), **jit_kwargs) -> CachedJit:
    """`jax.jit` with compiled programs kept in `folder()` when it is set (see the module doc)."""
    return CachedJit(fun, static_argnames=static_argnames, **jit_kwargs)
