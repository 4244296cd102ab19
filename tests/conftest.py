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
# XLA flags of the test processes and the `vxl` processes they start (`xla_flags()` adds to them):
# - XLA's GPU flags for compiling without a GPU (tests/test_aot.py compiles for an H100 in process too); they change
#   nothing for the CPU;
# - LLVM at -O0 for the CPU programs: the suite's programs are compiled once and run on tiny shapes, and code
#   generation was most of their compile time (a tiny train step: 25 s -> 14 s; tests/test_compression.py 92 s ->
#   61 s). Results move at rounding level (LLVM fuses and vectorises less), as they do between CPU kinds: every
#   exactness test holds at its tolerance, as it must on any CPU (see tests/test_sharding.py for one that did not).
from vxl_jax.aot.targets import GPU_XLA_FLAGS, with_flags  # noqa: E402

TEST_XLA_FLAGS = (*GPU_XLA_FLAGS, "--xla_backend_optimization_level=0")
os.environ["XLA_FLAGS"] = with_flags(os.environ.get("XLA_FLAGS", ""), TEST_XLA_FLAGS)


def xla_flags(*extra: str) -> str:
    """This session's XLA_FLAGS with `extra` flags after them (for the environment of a child process)."""
    return " ".join([os.environ["XLA_FLAGS"], *extra])

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


# The files that take minutes run first: `make test` runs two workers, a file per worker at a time (pytest-xdist
# --dist loadfile --no-loadscope-reorder: in this order), and a long file started last would leave the other
# worker idle at the end.
HEAVY_FIRST = ("test_aot.py", "test_train_loop.py", "test_compression.py", "test_sharding.py", "test_model_invariants.py",
               "test_train_step.py", "test_train_fixture.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(HEAVY_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))     # stable: order within a file kept

