"""Shared test set-up: float32 with exact matmuls, and where the golden fixtures live."""

import atexit
import os
import pathlib
import shutil
import tempfile

# The suite runs on the CPU. The `aot` extra installs the CUDA plugin and libtpu, which would otherwise try (and
# fail, noisily) to find a GPU or TPU in every process: the test process and its children stay on the CPU
# platform (compiling for accelerators does not need theirs: `vxl aot`, tests/test_aot.py).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA's GPU flags for compiling without a GPU (tests/test_aot.py compiles for an H100 in process too); they change
# nothing for the CPU.
from vxl_jax.aot.targets import GPU_XLA_FLAGS  # noqa: E402

os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""),
                                    *[f for f in GPU_XLA_FLAGS if f not in os.environ.get("XLA_FLAGS", "")]]).strip()

import jax  # noqa: E402
import pytest  # noqa: E402

from vxl_jax import program_cache  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# `vxl` commands run by the tests (in process and in subprocesses) share one persistent compilation cache that
# lives as long as the session, not the user's ~/.cache/vxl_jax (hermetic, and a later subprocess reuses the
# programs an earlier one compiled).
if "VXL_COMPILATION_CACHE" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="vxl_test_jax_cache_")
    os.environ["VXL_COMPILATION_CACHE"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

# Outside `vxl` commands (which set it themselves) the program cache is off, even where the environment sets
# JAX_COMPILATION_CACHE_DIR (which it follows by default): tests that count traces stay exact.
program_cache.set_folder(None)

REPO = pathlib.Path(__file__).resolve().parents[1]


def fixtures_dir() -> pathlib.Path:
    """`$VXL_FIXTURES`, else ../shared/fixtures/videoxl_tiny beside the repo."""
    return pathlib.Path(os.environ.get("VXL_FIXTURES", REPO.parent / "shared" / "fixtures" / "videoxl_tiny"))


@pytest.fixture(scope="session")
def fixtures() -> pathlib.Path:
    path = fixtures_dir()
    if not (path / "ckpt_A" / "config.json").is_file():
        pytest.skip(f"golden fixtures not found at {path} (set VXL_FIXTURES to the videoxl_tiny folder)")
    return path
