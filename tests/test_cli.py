"""The `vxl` command line: help texts, the demo, tiny-model, error exits."""

import subprocess
import sys

import pytest

from vxl_jax.cli.main import main as vxl
from vxl_jax.conversion.safetensors_io import CheckpointReader


@pytest.mark.parametrize("argv", [["--help"], ["convert", "--help"], ["convert", "hf-to-jax", "--help"],
                                  ["convert", "jax-to-hf", "--help"], ["convert", "import-parts", "--help"],
                                  ["tiny-model", "--help"], ["demo", "--help"], ["infer", "--help"]])
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


def test_demo_runs_and_says_what_it_did(tmp_path, capsys):
    assert vxl(["demo", "--out", str(tmp_path), "--frames", "12", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    for step in ("1. wrote a tiny random Video-XL checkpoint with its tokenizer", "2. converted it",
                 "3. wrote a 12-frame 224x224 H.264 video", "4. vxl infer --checkpoint", "read 12 of 12 frames",
                 "compressed 12 frames at ratio 4 into", "generated 3 tokens", "5. Q: What moves", "   A: ", "done"):
        assert step in out


def test_missing_checkpoint_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert vxl(["convert", "jax-to-hf", str(tmp_path / "empty"), str(tmp_path / "out")]) == 1
    assert "is not a vxl_jax checkpoint" in capsys.readouterr().err
