"""Small helpers shared by the subcommands."""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from typing import Callable, Iterator, Mapping, Optional

# The persistent compilation cache (see `resolve_compilation_cache`).
COMPILATION_CACHE_ENV = "VXL_COMPILATION_CACHE"
OFF = ("off", "0")


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far, MiB.

    On Linux from /proc/self/status (VmHWM, this program's own peak): `ru_maxrss` survives exec, so a command
    started from a large process (a test runner, a notebook) would report its parent's size. Elsewhere
    `ru_maxrss` (macOS reports bytes, others KiB).
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10          # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


def default_compilation_cache_dir(environ: Optional[Mapping[str, str]] = None) -> str:
    """`${XDG_CACHE_HOME:-~/.cache}/vxl_jax/jax_cache` (a relative or empty XDG_CACHE_HOME is ignored, as XDG says)."""
    environ = os.environ if environ is None else environ
    base = environ.get("XDG_CACHE_HOME", "")
    if not os.path.isabs(base):
        base = os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vxl_jax", "jax_cache")


def resolve_compilation_cache(flag: Optional[str] = None,
                              environ: Optional[Mapping[str, str]] = None) -> Optional[str]:
    """The folder of JAX's persistent compilation cache for this command, or None when it is off.

    The first of these that is given and not empty decides: the `--compilation-cache` flag,
    `$VXL_COMPILATION_CACHE`, jax's own `$JAX_COMPILATION_CACHE_DIR`; else the default folder
    (`default_compilation_cache_dir`). The value `off` or `0` (any case) turns the cache off; anything else
    is a folder (`~` expanded; `./off` for a folder named off). An empty value counts as not given.
    """
    environ = os.environ if environ is None else environ
    for value in (flag, environ.get(COMPILATION_CACHE_ENV), environ.get("JAX_COMPILATION_CACHE_DIR")):
        if value is None or not value.strip():
            continue
        value = value.strip()
        if value.lower() in OFF:
            return None
        return os.path.abspath(os.path.expanduser(value))
    return default_compilation_cache_dir(environ)


# Every program is written, however quick its compilation: a `vxl infer` compiles about ten programs, a few
# taking 0.5-5 s and the rest 10-20 ms. With jax's default threshold (1 s) whatever compiled in just under a
# second (which depends on the machine's load) is compiled again in every process: a warm tiny-model
# `vxl infer` took 6.6 s instead of 4.9 s. Reading an entry costs milliseconds; the ten entries take 0.5 MB.
# No size floor either (-1: and jax may not raise it later).
CACHE_SETTINGS = {"jax_persistent_cache_min_compile_time_secs": 0.0,
                  "jax_persistent_cache_min_entry_size_bytes": -1}


@contextlib.contextmanager
def compilation_cache(folder: Optional[str]) -> Iterator[Optional[str]]:
    """JAX's persistent compilation cache in `folder` (None: off) while the block runs; restored afterwards.

    See `use_compilation_cache` for what is set. Yields the folder in use (None when off).
    """
    used, restore = use_compilation_cache(folder)
    try:
        yield used
    finally:
        restore()


def use_compilation_cache(folder: Optional[str]) -> tuple[Optional[str], Callable[[], None]]:
    """Turns JAX's persistent compilation cache on in `folder` (None: off); returns (folder in use, restore).

    The programs of `vxl_jax.program_cache` (serialized executables keyed before tracing, so that a warm process
    skips tracing and lowering too) are kept in its subfolder `programs`.

    Also sets `$VXL_COMPILATION_CACHE`, so child processes (`vxl demo`'s training run) use the same folder. A
    folder that cannot be created turns the cache off, with a warning. `restore()` puts back the settings from
    before (the CLI restores them when a command ends; the lmms-eval plug-in keeps them for the process).
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache as jax_cache

    from vxl_jax import program_cache

    if folder is not None:
        try:
            os.makedirs(folder, exist_ok=True)
        except OSError as e:
            print(f"vxl: warning: compilation cache off, cannot create {folder} ({e.strerror or e}); "
                  f"set {COMPILATION_CACHE_ENV} to another folder or to off", file=sys.stderr)
            folder = None
    settings = {"jax_enable_compilation_cache": folder is not None, "jax_compilation_cache_dir": folder,
                **(CACHE_SETTINGS if folder is not None else {})}
    saved = {name: getattr(jax.config, name) for name in settings}
    saved_env = os.environ.get(COMPILATION_CACHE_ENV)
    for name, value in settings.items():
        jax.config.update(name, value)
    jax_cache.reset_cache()   # jax opens its cache once per process, at the first compilation: reopen it here
    # Beside it, our whole-program cache (no tracing either) in a subfolder, so that one folder holds both.
    saved_programs = program_cache.set_folder(None if folder is None else os.path.join(folder, program_cache.PROGRAMS))
    os.environ[COMPILATION_CACHE_ENV] = folder if folder is not None else OFF[0]

    def restore() -> None:
        for name, value in saved.items():
            jax.config.update(name, value)
        jax_cache.reset_cache()
        program_cache.set_folder(saved_programs)
        if saved_env is None:
            os.environ.pop(COMPILATION_CACHE_ENV, None)
        else:
            os.environ[COMPILATION_CACHE_ENV] = saved_env

    return folder, restore
