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


def test_infer_answers_about_an_image_and_names_a_file_that_is_neither(tmp_path, capsys):
    """An image is a one-frame video; the global --compilation-cache flag puts the compiled programs there."""
    from PIL import Image

    from vxl_jax.data.synthetic import synthetic_video

    assert vxl(["tiny-model", str(tmp_path / "m")]) == 0
    Image.fromarray(synthetic_video(1, 96, seed=2)[0][:80]).save(tmp_path / "photo.png")
    cache = tmp_path / "cache"
    argv = ["infer", "--checkpoint", str(tmp_path / "m"), "--question", "What is it?", "--frames", "4",
            "--max-new-tokens", "3"]
    capsys.readouterr()
    assert vxl(["--compilation-cache", str(cache)] + argv + ["--video", str(tmp_path / "photo.png")]) == 0
    out, err = capsys.readouterr()
    assert "read 1 of 1 frames" in err and "compressed 1 frames" in err and out.strip()
    assert any(cache.iterdir())
    (tmp_path / "notes.txt").write_text("not a video\n" * 20)
    assert vxl(["--compilation-cache", "off"] + argv + ["--video", str(tmp_path / "notes.txt")]) == 1
    err = capsys.readouterr().err
    assert f"cannot read video {tmp_path / 'notes.txt'}: neither a video decord can read nor an image" in err


def test_peak_rss_is_the_commands_own_not_its_parents():
    """`ru_maxrss` survives exec on Linux: a command started from a large process (a test runner late in a
    run) reported the parent's size as its peak (the 2 GB conversion-memory test read 5.3 GB both ways)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("the inherited ru_maxrss is Linux behaviour")
    ballast = bytearray(768 * 2**20)
    ballast[::4096] = b"\1" * len(ballast[::4096])        # touch every page: resident in this process
    out = subprocess.run([sys.executable, "-c", "from vxl_jax.cli.util import peak_rss_mib; print(peak_rss_mib())"],
                         capture_output=True, text=True, check=True)
    assert float(out.stdout) < 400, out.stdout          # an interpreter with our util module: tens of MiB
    del ballast
