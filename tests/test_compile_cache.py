"""The persistent compilation cache of the `vxl` command line: where it lives, how it is turned off, and that a
second process reads what the first compiled."""

import os
import subprocess
import sys
import textwrap

import jax
import pytest

from conftest import xla_flags

from vxl_jax.cli import util
from vxl_jax.cli.main import build_parser
from vxl_jax.cli.util import COMPILATION_CACHE_ENV, compilation_cache, resolve_compilation_cache


def test_default_folder_is_under_the_user_cache_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert util.default_compilation_cache_dir({}) == str(tmp_path / "home" / ".cache" / "vxl_jax" / "jax_cache")
    xdg = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    assert util.default_compilation_cache_dir(xdg) == str(tmp_path / "xdg" / "vxl_jax" / "jax_cache")
    # XDG: an empty or relative XDG_CACHE_HOME is ignored
    for ignored in ("", "relative/cache"):
        assert util.default_compilation_cache_dir({"XDG_CACHE_HOME": ignored}).startswith(str(tmp_path / "home"))
    assert resolve_compilation_cache(None, xdg) == str(tmp_path / "xdg" / "vxl_jax" / "jax_cache")


def test_flag_then_env_var_then_jax_env_var_then_default(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    default = str(tmp_path / "xdg" / "vxl_jax" / "jax_cache")
    assert resolve_compilation_cache(None, {**env, "JAX_COMPILATION_CACHE_DIR": "/j"}) == "/j"
    assert resolve_compilation_cache(None, {**env, COMPILATION_CACHE_ENV: "/v", "JAX_COMPILATION_CACHE_DIR": "/j"}) == "/v"
    assert resolve_compilation_cache("/f", {**env, COMPILATION_CACHE_ENV: "/v"}) == "/f"
    # relative folders are made absolute (child processes may run elsewhere), ~ is expanded
    assert resolve_compilation_cache("rel", env) == str(tmp_path / "rel")
    assert resolve_compilation_cache("~/c", env) == os.path.expanduser("~/c")
    # empty counts as not given
    assert resolve_compilation_cache("", {**env, COMPILATION_CACHE_ENV: ""}) == default
    assert resolve_compilation_cache(None, {**env, COMPILATION_CACHE_ENV: "  "}) == default


@pytest.mark.parametrize("off", ["off", "OFF", "0", " off "])
def test_off_and_0_turn_it_off(off):
    assert resolve_compilation_cache(off, {}) is None
    assert resolve_compilation_cache(None, {COMPILATION_CACHE_ENV: off, "JAX_COMPILATION_CACHE_DIR": "/j"}) is None
    assert resolve_compilation_cache(off, {COMPILATION_CACHE_ENV: "/v"}) is None    # the flag wins
    assert resolve_compilation_cache("./off", {}) == os.path.abspath("off")         # a folder named off


def test_global_flag_is_parsed_before_the_command():
    args = build_parser().parse_args(["--compilation-cache", "off", "tiny-model", "out"])
    assert args.compilation_cache == "off" and args.command == "tiny-model"
    assert build_parser().parse_args(["tiny-model", "out"]).compilation_cache is None


def _settings():
    names = ("jax_compilation_cache_dir", "jax_enable_compilation_cache",
             "jax_persistent_cache_min_compile_time_secs", "jax_persistent_cache_min_entry_size_bytes")
    return {n: getattr(jax.config, n) for n in names}


def test_the_block_sees_the_cache_and_its_callers_get_their_settings_back(tmp_path, monkeypatch):
    monkeypatch.delenv(COMPILATION_CACHE_ENV, raising=False)
    before = _settings()
    folder = str(tmp_path / "a" / "b")
    with pytest.raises(RuntimeError):
        with compilation_cache(folder) as used:
            assert used == folder and os.path.isdir(folder)
            assert _settings() == {"jax_compilation_cache_dir": folder, "jax_enable_compilation_cache": True,
                                   "jax_persistent_cache_min_compile_time_secs": 0.0,
                                   "jax_persistent_cache_min_entry_size_bytes": -1}
            assert os.environ[COMPILATION_CACHE_ENV] == folder      # for the processes the command starts
            raise RuntimeError("restored on errors too")
    assert _settings() == before and COMPILATION_CACHE_ENV not in os.environ
    with compilation_cache(None) as used:
        assert used is None and not jax.config.jax_enable_compilation_cache
        assert os.environ[COMPILATION_CACHE_ENV] == "off"
    assert _settings() == before


def test_a_folder_that_cannot_be_made_turns_it_off_with_a_warning(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    with compilation_cache(str(tmp_path / "file" / "cache")) as used:
        assert used is None and not jax.config.jax_enable_compilation_cache
    assert "compilation cache off, cannot create" in capsys.readouterr().err


# A `vxl` process with one extra command that compiles a small program, logging compilations and cache hits.
PROBE = textwrap.dedent("""
    import sys
    import jax, jax.numpy as jnp
    from vxl_jax.cli import main as cli

    class probe:
        @staticmethod
        def add_parser(sub):
            sub.add_parser("probe").set_defaults(run=lambda args: print(float(jax.jit(
                lambda x: (jnp.sin(x) * 2 + 1).sum())(jnp.arange(8.0)))))

    cli.COMMANDS = cli.COMMANDS + (probe,)
    jax.config.update("jax_log_compiles", True)
    sys.exit(cli.main(sys.argv[1:]))
""")


def _probe(tmp_path, *args) -> str:
    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=2"), JAX_PLATFORMS="cpu")
    env.pop(COMPILATION_CACHE_ENV, None)
    out = subprocess.run([sys.executable, "-c", PROBE, *args, "probe"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    assert float(out.stdout) == pytest.approx(8 + 2 * sum(__import__("math").sin(i) for i in range(8)), rel=1e-5)
    return out.stderr


def _entries(folder):
    return sorted(p for p in os.listdir(folder) if not p.startswith(".")) if os.path.isdir(folder) else []


def test_a_second_process_reads_the_first_ones_programs(tmp_path):
    """Through `vxl --compilation-cache DIR`, with 2 simulated CPU devices (as training runs here): the first
    process writes the programs (even sub-second ones), the second loads every one and writes nothing."""
    cache = tmp_path / "cache"
    err = _probe(tmp_path, "--compilation-cache", str(cache))
    first = _entries(cache)
    assert any("jit__lambda" in name for name in first), first
    assert "Persistent compilation cache hit" not in err
    err = _probe(tmp_path, "--compilation-cache", str(cache))
    assert "Persistent compilation cache hit for 'jit__lambda'" in err, err[-3000:]
    assert _entries(cache) == first
    # off: nothing is read or written
    err = _probe(tmp_path, "--compilation-cache", "off")
    assert "Persistent compilation cache hit" not in err and _entries(cache) == first
