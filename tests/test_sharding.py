"""Sharded training on 8 simulated CPU devices equals the unsharded step (run in a subprocess: the device
count must be set before jax starts)."""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import xla_flags

REPO = pathlib.Path(__file__).resolve().parents[1]


def _run_worker(mesh: str, accum: int = 1) -> dict:
    env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "sharding_worker.py"), mesh, str(accum)],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def result():
    return _run_worker("2,2,2")


def test_sharded_step_equals_unsharded(result):
    assert result["devices"] == 8
    loss, norm = result["loss"], result["grad_norm"]
    assert abs(loss[0] - loss[1]) <= 1e-5, loss
    assert abs(norm[0] - norm[1]) <= 1e-5, norm
    assert result["grad_max_diff"] <= 1e-5
    # One Adam step from identical state moves each parameter by about lr * sign(g). Where the gradient's sign is
    # sure (far above its rounding noise), the two steps agree to rounding; where it is noise, they may go opposite
    # ways, by at most two Adam steps (lr x the largest group scale, 1). Comparing the whole tree at 1e-5 measured
    # the sign of noise, and failed on some CPUs and code generators.
    assert result["param_max_diff_sure_sign"] <= 1e-5
    assert result["param_max_diff"] <= 2 * result["learning_rate"] * 1.001
    assert result["unsure_sign_entries"] < 0.25 * result["num_param_entries"]    # 17% here: not a vacuous check
    assert result["params_moved"] == result["num_params"] - 2     # CLIP's unused post_norm scale/bias


def test_parameters_and_optimizer_state_are_really_sharded(result):
    shards = result["shards"]
    # q_proj kernel [L, D, N, H]: D over fsdp (2), N over tensor (2), on all 8 devices.
    assert shards["q_proj"] == [[2, 64, 4, 16], [2, 32, 2, 16], 8]
    assert shards["q_proj_adam_mu"] == [[2, 64, 4, 16], [2, 32, 2, 16]]
    assert shards["embed_tokens"] == [256, 32]          # [V, D]: V over tensor, D over fsdp
    assert shards["mlp_down"] == [2, 64, 32]            # [L, F, D]: F over tensor, D over fsdp
    assert shards["inputs_frames"][0] == 1              # 4 rows over data x fsdp = 4 ways
