"""Parity with the original Video-XL on its golden cases, through `vxl fixture-check` (the CLI's own path)."""

import json
import shutil

import numpy as np
import pytest

from loop_reference import prefill_loop
from vxl_jax import golden
from vxl_jax.cli.main import main
from vxl_jax.compress.plan import make_plan, num_windows
from vxl_jax.model import videoxl
from vxl_jax.tiny import write_tiny_checkpoint


def _check(capsys, case_dir, ckpt_dir, *extra):
    code = main(["fixture-check", str(case_dir), "--checkpoint", str(ckpt_dir), *extra])
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.mark.parametrize("case,arrays", [("r4_25f", 30), ("r2_10f", 24), ("nocomp_4f", 7)])
def test_golden_case_passes(fixtures, capsys, case, arrays):
    code, out = _check(capsys, fixtures / case, fixtures / "ckpt_A")
    print(out)
    assert code == 0
    assert f"pass: {arrays} arrays within tolerance" in out
    assert "skip" not in out and "FAIL" not in out


def test_streamed_frames_match_too(fixtures, capsys):
    code, out = _check(capsys, fixtures / "r2_10f", fixtures / "ckpt_A", "--stream-frames")
    assert code == 0, out


def test_a_wrong_expectation_fails_with_a_row_per_array(fixtures, tmp_path, capsys):
    case = tmp_path / "r2_10f_tampered"
    shutil.copytree(fixtures / "r2_10f", case)
    expected = dict(np.load(case / "expected.npz"))
    expected["last_logits"] = expected["last_logits"] + 2e-4          # just outside 1e-4
    expected["generated_ids"] = expected["generated_ids"].copy()
    expected["generated_ids"][0, -1] += 1
    np.savez(case / "expected.npz", **expected)
    code, out = _check(capsys, case, fixtures / "ckpt_A")
    assert code == 1
    assert "FAIL: 2 of 24 arrays: generated_ids, last_logits" in out
    assert "1 differ" in out


def test_missing_case_files_are_named(tmp_path, capsys):
    code, out = _check(capsys, tmp_path, tmp_path)
    assert code == 1 and "has no inputs.npz" in out


def test_any_case_of_the_format(tmp_path, capsys):
    """A case unlike the shipped ones (prefix 10, suffix 7, 13 frames, ratio 7: windows that are not multiples
    of the ratio, so the remainder carries) with expected arrays from the independent Python loop."""
    ckpt = tmp_path / "ckpt"
    cfg = write_tiny_checkpoint(str(ckpt), seed=3)
    params, cfg, _ = golden.load_checkpoint(ckpt)
    rng = np.random.default_rng(9)
    prompt = np.concatenate([rng.integers(11, 490, 10), [-200], rng.integers(11, 490, 7)])
    pixel_u8 = rng.integers(0, 256, (13, 3, 336, 336), dtype=np.uint8)
    feats = np.asarray(videoxl.frame_features(params, cfg, (pixel_u8.astype(np.float32) - 128) / 64))
    n = 13 * 144
    plan = make_plan(10, n, 7, [7] * num_windows(n))
    assert [w.carry_in for w in plan.windows] == [0, 5] and plan.vst_per_window == [205, 62]
    k, v, hidden, _ = prefill_loop(params, cfg, plan, prompt[:10], feats.reshape(n, -1), prompt[11:])
    to_fixture = lambda x: x.transpose(0, 2, 1, 3)
    m = plan.num_vst
    case = tmp_path / "r7_13f"
    case.mkdir()
    np.savez(case / "inputs.npz", input_ids=prompt[None], pixel_u8=pixel_u8)
    np.savez(case / "expected.npz", image_features=feats,
             sink_keys=to_fixture(k[:, :10]), beacon_keys=to_fixture(k[:, 10:10 + m]),
             raw_values=to_fixture(v[:, 10 + m:]),
             last_window_logits=np.asarray(hidden @ np.asarray(params["llm"]["lm_head"])),
             all_beacon_sizes=np.array([0, 205, 62, 0]))
    (case / "meta.json").write_text(json.dumps({"beacon_ratio": 7, "n_frames": 13}))
    code, out = _check(capsys, case, ckpt)
    assert code == 0, out
    assert "pass: 6 arrays within tolerance" in out
