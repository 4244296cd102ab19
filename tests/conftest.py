"""Shared test set-up: float32 with exact matmuls, and where the golden fixtures live."""

import os
import pathlib

import jax
import pytest

jax.config.update("jax_default_matmul_precision", "highest")

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
