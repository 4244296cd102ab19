"""`vxl train` end to end on the tiny synthetic config (subprocesses, 8 simulated CPU devices):

resume == uninterrupted (stopped at max_steps or by SIGTERM), metrics files, HF export, and two
processes training together through launch/local_multiprocess.sh. The runs share a persistent
compilation cache, so only the first one compiles.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import xla_flags

from vxl_jax.conversion.safetensors_io import CheckpointReader
from vxl_jax.train.metrics import read_jsonl

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache = tmp_path_factory.mktemp("jax_cache")
    return dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"), JAX_PLATFORMS="cpu",
                JAX_COMPILATION_CACHE_DIR=str(cache))


def _train(env, workdir, *overrides, wait=True):
    cmd = [sys.executable, "-m", "vxl_jax.cli.main", "train", "--config", "tiny_synthetic", "--workdir",
           str(workdir), "--quiet"] + [a for o in overrides for a in ("--set", o)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-4000:]
    return err


def _losses(workdir) -> dict:
    return {r["step"]: r["loss"] for r in read_jsonl(pathlib.Path(workdir) / "metrics.jsonl")}


def _exported(workdir) -> dict:
    reader = CheckpointReader(str(pathlib.Path(workdir) / "export_hf"))
    return {k: reader.get(k) for k in reader.keys()}


@pytest.fixture(scope="module")
def uninterrupted(env, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run_a")
    _train(env, workdir, "max_steps=12")
    return workdir


def test_metrics_tensorboard_and_export(uninterrupted):
    rows = read_jsonl(uninterrupted / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13))
    for key in ("loss", "grad_norm", "lr", "tokens_per_s", "step_time_s", "data/records_skipped"):
        assert all(key in r for r in rows), key
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert rows[0]["lr"] == 0.0 and rows[1]["lr"] > 0          # warmup from 0
    assert list((uninterrupted / "tensorboard").glob("events.out.tfevents.*"))
    assert (uninterrupted / "export_hf" / "config.json").is_file()
    assert (uninterrupted / "export_hf" / "tokenizer.json").is_file()
    assert sorted(p.name for p in (uninterrupted / "checkpoints").iterdir() if p.name.isdigit()) == ["12"]


def test_resume_at_max_steps_equals_uninterrupted(env, tmp_path, uninterrupted):
    """Acceptance: max_steps=6, then the same command with max_steps=12 -> identical losses 7..12."""
    _train(env, tmp_path, "max_steps=6")
    assert sorted(_losses(tmp_path)) == list(range(1, 7))
    err = _train(env, tmp_path, "max_steps=12")
    assert "trained steps 6..12" in err
    want, got = _losses(uninterrupted), _losses(tmp_path)
    assert sorted(got) == list(range(1, 13))
    assert [got[s] for s in range(7, 13)] == [want[s] for s in range(7, 13)]     # bitwise on CPU
    a, b = _exported(uninterrupted), _exported(tmp_path)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow  # 57 s; resume == uninterrupted stays in the default suite
def test_sigterm_saves_and_the_rerun_continues_exactly(env, tmp_path, uninterrupted):
    proc = _train(env, tmp_path, "max_steps=12", "save_every=1000", wait=False)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-4000:]
    assert "stopped by SIGTERM at step" in err
    stopped = max(_losses(tmp_path))
    assert 2 <= stopped < 12
    assert (tmp_path / "checkpoints" / str(stopped)).is_dir()
    assert not (tmp_path / "export_hf").exists()
    err = _train(env, tmp_path, "max_steps=12")
    assert f"trained steps {stopped}..12" in err
    assert _losses(tmp_path) == _losses(uninterrupted)


@pytest.mark.slow  # 90 s: two trainer processes; run with make test-slow
def test_two_processes_train_together(env, tmp_path):
    """launch/local_multiprocess.sh: 2 CPU processes x 2 devices, one jax.distributed run, batch split."""
    env2 = dict(env, VXL_CPU_DEVICES="2", VXL_PYTHON=sys.executable, VXL_FOLLOW="0")
    env2.pop("XLA_FLAGS")
    proc = subprocess.run(["bash", str(REPO / "launch" / "local_multiprocess.sh"), "2", "tiny_synthetic",
                           str(tmp_path), "--set", "max_steps=3", "--quiet"],
                          cwd=REPO, env=env2, capture_output=True, text=True, timeout=600)
    logs = "".join(p.read_text() for p in sorted((tmp_path / "logs").glob("process_*.log")))
    assert proc.returncode == 0, (proc.stderr[-2000:], logs[-4000:])
    assert "process 1 of 2, 2 local / 4 global devices" in logs
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3] and all(np.isfinite(r["loss"]) for r in rows)
    step_dir = tmp_path / "checkpoints" / "3"
    data_states = sorted(p.name for p in (step_dir / "data").glob("process_*.json"))
    assert data_states == ["process_0-of-2.json", "process_1-of-2.json"]   # one iterator state per process
    config = json.loads((tmp_path / "export_hf" / "config.json").read_text())
    assert config["model_type"] == "llava_qwen"


@pytest.mark.slow  # 60 s: its own compile (another learning rate)
def test_non_finite_steps_are_skipped_counted_and_stop_the_run(env, tmp_path):
    """An absurd learning rate blows the model up: the non-finite steps are skipped and counted, and the run
    stops with a clear error after step.max_bad_steps of them in a row."""
    proc = _train(env, tmp_path, "max_steps=10", "optim.learning_rate=1e30", "step.max_bad_steps=2",
                  "print_every=1", wait=False)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err[-4000:]
    assert "vxl train: error: 2 steps in a row" in err and "not finite, update skipped" in err
    rows = read_jsonl(tmp_path / "metrics.jsonl")
    assert rows and rows[0]["steps_skipped"] == 0
    skipped = [r["steps_skipped"] for r in rows]
    assert skipped == sorted(skipped) and all(b - a <= 1 for a, b in zip(skipped, skipped[1:]))


def _mixed_set(root: pathlib.Path) -> pathlib.Path:
    """The synthetic video QA set plus image records (one solid colour and a shape per PNG), shuffled together."""
    from PIL import Image
    from vxl_jax.data import synthetic
    train = pathlib.Path(synthetic.generate(str(root), synthetic.SyntheticSpec(num_records=48, num_eval=0)))
    recs = [json.loads(line) for line in train.read_text().splitlines()]
    rng = np.random.default_rng(0)
    colours = list(synthetic.PALETTE)
    (root / "images").mkdir()
    for i in range(24):
        name = colours[int(rng.integers(len(colours)))]
        pixels = np.empty((96, 160, 3), np.uint8)
        pixels[:] = synthetic.PALETTE[name]
        Image.fromarray(pixels).save(root / "images" / f"{i}.png")
        recs.append({"image": f"images/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat color is the image?"}, {"from": "gpt", "value": name}]})
    order = rng.permutation(len(recs))
    out = root / "mixed.jsonl"
    out.write_text("".join(json.dumps(recs[i]) + "\n" for i in order))
    return out


@pytest.mark.slow  # ~60 s: its own compile
def test_mixed_images_and_videos_with_per_row_ratios_learn_and_a_nan_step_is_skipped(env, tmp_path):
    """Issue 15's acceptance run: image and video records in batches of 8, instance-random ratios (rows differ),
    the loss falls; a NaN injected at step 4 is skipped (counted, nothing updated) and the run goes on."""
    data = tmp_path / "data"
    mixed = _mixed_set(data)
    work = tmp_path / "run"
    _train(env, work, "max_steps=24", "synthetic=null", f"data.annotations={json.dumps(str(mixed))}",
           f"data.tokenizer={json.dumps(str(data / 'tokenizer'))}", f"data.media_root={json.dumps(str(data))}",
           "data.curriculum.mode=instance-random", "debug_nan_steps=[4]", "save_every=100", "export_hf=false")
    rows = {r["step"]: r for r in read_jsonl(work / "metrics.jsonl")}
    assert sorted(rows) == list(range(1, 25))
    assert [rows[s]["steps_skipped"] for s in (3, 4, 5, 24)] == [0, 1, 1, 1]
    assert rows[4]["loss"] is None      # NaN, written as null
    losses = [rows[s]["loss"] for s in sorted(rows) if s != 4]
    assert all(v is not None and np.isfinite(v) for v in losses)
    assert np.mean(losses[-4:]) < np.mean(losses[:3]) - 1.0, losses
    assert rows[24]["data/records_skipped"] == 0
