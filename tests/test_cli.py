"""The `vxl` command line: help texts, the demo, tiny-model, error exits."""

import subprocess
import sys

import pytest

from vxl_jax.cli.main import main as vxl
from vxl_jax.conversion.safetensors_io import CheckpointReader


@pytest.mark.parametrize("argv", [["--help"], ["convert", "--help"], ["convert", "hf-to-jax", "--help"],
                                  ["convert", "jax-to-hf", "--help"], ["convert", "import-parts", "--help"],
                                  ["tiny-model", "--help"], ["demo", "--help"], ["infer", "--help"],
                                  ["train", "--help"]])
def test_help_explains_usage(argv, capsys):
    with pytest.raises(SystemExit) as info:
        vxl(argv)
    assert info.value.code == 0
    assert "usage: vxl" in capsys.readouterr().out


def test_console_script_is_installed():
    out = subprocess.run([sys.executable, "-m", "vxl_jax.cli.main", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "convert" in out.stdout


def test_tiny_model_command(tmp_path, capsys):
    assert vxl(["tiny-model", str(tmp_path / "m"), "--seed", "3"]) == 0
    assert "seed 3" in capsys.readouterr().out
    assert len(CheckpointReader(tmp_path / "m").keys()) == 83


@pytest.mark.slow  # 80 s: the whole demo; make demo runs it too
def test_demo_trains_exports_and_answers(tmp_path, capsys):
    """The main job, shortened: 12 training steps on 8 simulated devices, export, convert, answer."""
    assert vxl(["demo", "--out", str(tmp_path), "--steps", "12", "--questions", "2"]) == 0
    out = capsys.readouterr().out
    for step in ("1. vxl train --config tiny_synthetic", "2. loss by step: 1: ", "-> last 3:",
                 "3. exported to HF format", "converted back to JAX", "4. vxl infer on 2 held-out videos",
                 "(truth '", "right", "done in"):
        assert step in out, step
    assert (tmp_path / "train" / "export_hf" / "tokenizer.json").is_file()
    assert (tmp_path / "train" / "checkpoints" / "12").is_dir()


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert vxl(["convert", "jax-to-hf", str(tmp_path / "empty"), str(tmp_path / "out")]) == 1
    assert "is not a vxl_jax checkpoint" in capsys.readouterr().err
