"""Conversion peak memory on a checkpoint over 1 GB stays near one copy of the model (slow)."""

import dataclasses
import re
import subprocess
import sys

import pytest

from vxl_jax.config import Qwen2Config, VideoXLConfig
from vxl_jax.conversion.checkpoint import write_hf
from vxl_jax.conversion.safetensors_io import CheckpointReader
from vxl_jax.tiny import random_params

pytestmark = pytest.mark.slow


def _peak_mib(argv) -> float:
    out = subprocess.run([sys.executable, "-m", "vxl_jax.cli.main", *argv], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return float(re.search(r"peak RSS ([\d,]+) MiB", out.stdout).group(1).replace(",", ""))


def test_conversion_memory_on_a_2gb_checkpoint(tmp_path):
    # Qwen2 hidden 1024 x 16 layers + a full CLIP ViT-L/14-336: 577M float32 parameters, 2.2 GB, 3 shards.
    big = VideoXLConfig.load("videoxl_7b")
    cfg = dataclasses.replace(big, llm=Qwen2Config(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                                                   num_layers=16, num_heads=16, num_kv_heads=4, eos_token_id=2))
    write_hf(tmp_path / "hf", random_params(cfg, seed=0), cfg, max_shard_bytes=2**30)
    model_mib = sum(CheckpointReader(tmp_path / "hf").nbytes(k) for k in CheckpointReader(tmp_path / "hf").keys()) / 2**20
    assert model_mib > 1024
    budget = 1.25 * model_mib + 700  # one copy, one stacked target in flight, the interpreter and jax
    to_jax = _peak_mib(["convert", "hf-to-jax", str(tmp_path / "hf"), str(tmp_path / "jax"), "--quiet"])
    to_hf = _peak_mib(["convert", "jax-to-hf", str(tmp_path / "jax"), str(tmp_path / "back"), "--max-shard-gb", "1"])
    print(f"model {model_mib:,.0f} MiB; peak RSS hf-to-jax {to_jax:,.0f} MiB, jax-to-hf {to_hf:,.0f} MiB")
    assert to_jax < budget and to_hf < budget
    a, b = CheckpointReader(tmp_path / "hf"), CheckpointReader(tmp_path / "back")
    assert a.keys() == b.keys() and all(a.get(k).tobytes() == b.get(k).tobytes() for k in a.keys())
