"""`vxl_jax.program_cache`: compiled programs reloaded from disk without tracing, keyed by what decides a trace."""

import os
import subprocess
import sys
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vxl_jax import program_cache
from vxl_jax.cli.util import COMPILATION_CACHE_ENV, compilation_cache

TRACES = []


def _fn(x, power, y, *, scale):
    TRACES.append(power)                 # runs only when jax traces
    return -(x ** power) * scale + jnp.exp(y)


@pytest.fixture
def folder(tmp_path):
    old = program_cache.set_folder(str(tmp_path / "programs"))
    TRACES.clear()
    yield tmp_path / "programs"
    program_cache.set_folder(old)


def _entries(folder):
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _expected(x, power, y, scale):
    return -(np.asarray(x) ** power) * scale + np.exp(np.asarray(y))


def test_a_new_instance_loads_the_program_without_tracing(folder):
    """A second CachedJit of the same function (what a new process has) runs the stored executable."""
    x, y = jnp.arange(6.0).reshape(2, 3), jnp.ones((2, 3))
    first = program_cache.jit(_fn, static_argnames=("power", "scale"))
    out = first(x, 3, y, scale=2.0)                       # a static by position and one by keyword
    np.testing.assert_allclose(out, _expected(x, 3, y, 2.0), rtol=1e-6)
    assert len(TRACES) == 1 and len(_entries(folder)) == 1
    first(x, 3, y, scale=2.0)                             # in memory: no trace, no new entry
    assert len(TRACES) == 1
    again = program_cache.jit(_fn, static_argnames=("power", "scale"))
    np.testing.assert_array_equal(again(x, 3, y, scale=2.0), out)
    assert len(TRACES) == 1 and len(_entries(folder)) == 1


def test_statics_shapes_dtypes_and_weak_types_get_their_own_programs(folder):
    fn = program_cache.jit(_fn, static_argnames=("power", "scale"))
    x, y = jnp.ones((2, 3)), jnp.ones((2, 3))
    fn(x, 2, y, scale=1.0)
    fn(x, 3, y, scale=1.0)                                 # static
    fn(x, 2, y, scale=0.5)                                 # static by keyword
    fn(jnp.ones((4, 3)), 2, jnp.ones((4, 3)), scale=1.0)   # shape
    fn(x.astype(jnp.bfloat16), 2, y, scale=1.0)            # dtype
    out = fn(np.float32(2.0), 2, 1.0, scale=1.0)           # numpy scalar and a weakly typed Python float
    assert len(_entries(folder)) == 6 and len(TRACES) == 6
    np.testing.assert_allclose(out, _expected(2.0, 2, 1.0, 1.0), rtol=1e-6)


def test_off_and_statics_without_a_stable_repr_fall_back_to_jit(tmp_path):
    old = program_cache.set_folder(None)
    try:
        fn = program_cache.jit(_fn, static_argnames=("power", "scale"))
        np.testing.assert_allclose(fn(jnp.ones(3), 2, jnp.ones(3), scale=1.0),
                                   _expected(np.ones(3), 2, np.ones(3), 1.0), rtol=1e-6)
        assert fn._programs == {}                          # plain jax.jit: nothing of ours compiled
        program_cache.set_folder(str(tmp_path / "programs"))

        class Opaque:                                      # default repr: an address, never the same again
            def __hash__(self):
                return 0

            def __eq__(self, other):
                return isinstance(other, Opaque)

            def __rmul__(self, other):
                return other * 2.0

        out = fn(jnp.ones(3), 2, jnp.ones(3), scale=Opaque())
        np.testing.assert_allclose(out, _expected(np.ones(3), 2, np.ones(3), 2.0), rtol=1e-6)
        assert _entries(tmp_path / "programs") == [] and fn._programs == {}
    finally:
        program_cache.set_folder(old)


def test_by_default_it_follows_jax_persistent_cache(tmp_path):
    """On exactly when JAX's persistent cache is (JAX_COMPILATION_CACHE_DIR etc.), in its programs/ subfolder."""
    old = program_cache.set_folder(program_cache.FOLLOW_JAX)
    saved = (jax.config.jax_compilation_cache_dir, jax.config.jax_enable_compilation_cache)
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        assert program_cache.folder() is None
        jax.config.update("jax_compilation_cache_dir", str(tmp_path / "jax"))
        assert program_cache.folder() == str(tmp_path / "jax" / "programs")
        program_cache.jit(_fn, static_argnames=("power", "scale"))(jnp.ones(2), 2, jnp.ones(2), scale=1.0)
        assert len(_entries(tmp_path / "jax" / "programs")) == 1
        jax.config.update("jax_enable_compilation_cache", False)
        assert program_cache.folder() is None
        jax.config.update("jax_enable_compilation_cache", True)
        jax.config.update("jax_compilation_cache_dir", "gs://bucket/cache")     # not a local folder: off
        assert program_cache.folder() is None
    finally:
        jax.config.update("jax_compilation_cache_dir", saved[0])
        jax.config.update("jax_enable_compilation_cache", saved[1])
        program_cache.set_folder(old)


def test_without_source_to_hash_it_stays_off(folder, monkeypatch):
    monkeypatch.setattr(program_cache, "_fingerprint", None)
    monkeypatch.setattr(program_cache, "_source_digest", lambda: None)
    fn = program_cache.jit(_fn, static_argnames=("power", "scale"))
    np.testing.assert_allclose(fn(jnp.ones(2), 2, jnp.ones(2), scale=1.0), _expected(np.ones(2), 2, np.ones(2), 1.0),
                               rtol=1e-6)
    assert _entries(folder) == [] and fn._programs == {}


def test_a_bad_entry_is_compiled_again_and_replaced(folder):
    x = jnp.arange(3.0)
    program_cache.jit(_fn, static_argnames=("power", "scale"))(x, 2, x, scale=1.0)
    (entry,) = folder.iterdir()
    entry.write_bytes(b"not a program")
    with pytest.warns(RuntimeWarning, match="could not load"):
        out = program_cache.jit(_fn, static_argnames=("power", "scale"))(x, 2, x, scale=1.0)
    np.testing.assert_allclose(out, _expected(x, 2, x, 1.0), rtol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                     # the rewritten entry loads
        np.testing.assert_array_equal(program_cache.jit(_fn, static_argnames=("power", "scale"))(x, 2, x, scale=1.0),
                                      out)


def test_a_folder_that_cannot_be_written_warns_and_still_runs(tmp_path):
    (tmp_path / "file").write_text("x")
    old = program_cache.set_folder(str(tmp_path / "file" / "programs"))
    try:
        x = jnp.arange(3.0)
        with pytest.warns(RuntimeWarning, match="cannot write"):
            out = program_cache.jit(_fn, static_argnames=("power", "scale"))(x, 2, x, scale=1.0)
        np.testing.assert_allclose(out, _expected(x, 2, x, 1.0), rtol=1e-6)
    finally:
        program_cache.set_folder(old)


def test_an_entry_is_a_fresh_compilation_even_when_jax_cache_holds_the_program(tmp_path, monkeypatch):
    """Regression: an executable jax read from its persistent cache serializes without its code. The entry our
    miss wrote from one failed when a later process ran it ("Function negate_power_fusion.1 not found")."""
    monkeypatch.delenv(COMPILATION_CACHE_ENV, raising=False)
    x, y = jnp.linspace(0.0, 1.0, 8), jnp.ones(8)
    with compilation_cache(str(tmp_path / "cache")):      # jax's cache in cache/, ours in cache/programs
        jax.jit(_fn, static_argnames=("power", "scale"))(x, 2, y, scale=3.0)       # jax's entry
        jax.clear_caches()                                                          # (nothing in memory)
        program_cache.jit(_fn, static_argnames=("power", "scale"))(x, 2, y, scale=3.0)   # our miss
        loaded = program_cache.jit(_fn, static_argnames=("power", "scale"))(x, 2, y, scale=3.0)
        np.testing.assert_allclose(jax.block_until_ready(loaded), _expected(x, 2, y, 3.0), rtol=1e-6)


def test_the_key_follows_the_environment_that_shapes_a_trace(folder, monkeypatch):
    fn = program_cache.jit(_fn, static_argnames=("power", "scale"))
    args = ([jnp.ones(2), jnp.ones(2)], {})
    key = fn._key(*args, {"power": 2, "scale": 1.0})
    assert fn._key(*args, {"power": 2, "scale": 1.0}) == key
    monkeypatch.setenv("VXL_KERNEL_THREADS", "1")
    assert fn._key(*args, {"power": 2, "scale": 1.0}) != key
    monkeypatch.delenv("VXL_KERNEL_THREADS")
    assert fn._key(*args, {"power": 2, "scale": 1.0}) == key
    with jax.default_matmul_precision("bfloat16"):                      # jax's configuration, as it is now
        assert fn._key(*args, {"power": 2, "scale": 1.0}) != key
    monkeypatch.setenv(COMPILATION_CACHE_ENV, "/elsewhere")            # where caches live is not part of it
    assert fn._key(*args, {"power": 2, "scale": 1.0}) == key


def test_vxl_infer_twice_the_second_process_traces_nothing(tmp_path):
    """Two `vxl infer` processes on one cache: the second loads every model program (no tracing, no new entries),
    answers the same, and its quick exit keeps the exit code (1 for a missing video)."""
    from vxl_jax.cli.main import main as vxl
    from vxl_jax.data.synthetic import synthetic_video
    from vxl_jax.data.video import write_test_video

    assert vxl(["--compilation-cache", "off", "tiny-model", str(tmp_path / "m")]) == 0
    write_test_video(tmp_path / "v.mp4", synthetic_video(8, 64, seed=1), fps=4)
    cache = tmp_path / "cache"
    script = "import sys; from vxl_jax.cli.main import run; sys.argv[0] = 'vxl'; run()"
    argv = ["--compilation-cache", str(cache), "infer", "--checkpoint", str(tmp_path / "m"), "--video",
            str(tmp_path / "v.mp4"), "--question", "What moves?", "--frames", "8", "--max-new-tokens", "4"]
    env = dict(os.environ, JAX_LOG_COMPILES="1")

    def vxl_process(*extra):
        return subprocess.run([sys.executable, "-c", script, *argv, *extra], env=env, capture_output=True,
                              text=True, timeout=300)

    cold = vxl_process()
    assert cold.returncode == 0, cold.stderr[-3000:]
    assert "Finished tracing _encode" in cold.stderr and "Finished tracing generate" in cold.stderr
    programs = _entries(cache / "programs")
    assert {name.split("-")[0] for name in programs} == {"encode", "ask_prefill", "generate"}
    warm = vxl_process()
    assert warm.returncode == 0, warm.stderr[-3000:]
    for name in ("_encode", "_ask_prefill", "generate"):
        assert f"Finished tracing {name} " not in warm.stderr
    assert warm.stdout == cold.stdout and warm.stdout.strip()
    assert _entries(cache / "programs") == programs
    argv[argv.index("--video") + 1] = str(tmp_path / "missing.mp4")
    missing = vxl_process()
    assert missing.returncode == 1 and "missing.mp4" in missing.stderr
