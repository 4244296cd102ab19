"""`vxl infer` end to end on a tiny model and a generated video, and its errors."""

import numpy as np
import pytest

from vxl_jax import pipeline
from vxl_jax.data.synthetic import synthetic_video
from vxl_jax.cli.main import main as vxl
from vxl_jax.compress import schedules
from vxl_jax.conversion.checkpoint import CLIP_MEAN, CLIP_STD, hf_to_jax
from vxl_jax.data import preprocess, prompts, video
from vxl_jax.infer import Answerer
from vxl_jax.tiny import write_tiny_checkpoint
from vxl_jax.x2l.runner import X2LConfig

QUESTION = "Where does the square go?"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("infer")
    write_tiny_checkpoint(str(root / "hf"), seed=4)
    hf_to_jax(str(root / "hf"), str(root / "jax"), progress=False)
    path = video.write_test_video(root / "v.mp4", synthetic_video(23, 224, seed=4), fps=8)
    return root, path


def test_infer_answers_on_stdout_with_progress_on_stderr(setup, capsys):
    root, path = setup
    argv = ["infer", "--checkpoint", str(root / "hf"), "--video", path, "--question", QUESTION,
            "--frames", "13", "--ratio", "6", "--max-new-tokens", "5"]
    assert vxl(argv) == 0
    out, err = capsys.readouterr()
    assert "read 13 of 23 frames" in err and "compressed 13 frames at ratio 6" in err and "[vxl infer]" in err
    answer = out.rstrip("\n")
    # The converted JAX checkpoint gives the same answer (same weights, same path).
    assert vxl(argv[:2] + [str(root / "jax")] + argv[3:] + ["--quiet"]) == 0
    out2, err2 = capsys.readouterr()
    assert out2.rstrip("\n") == answer and err2 == ""


def test_infer_equals_the_pipeline_by_hand(setup):
    root, path = setup
    answerer = Answerer.load(str(root / "hf"))
    got = answerer.ask(path, QUESTION, sampling=video.uniform(13), ratio=6, max_new_tokens=5)
    # The same steps spelled out: decord frames, PIL-exact crop, chat prompt, compressed prefill, greedy decode.
    frames = video.read(path, video.uniform(13)).frames
    pixels = preprocess.crop_frames_u8(frames, 336)
    ids = prompts.inference_prompt(answerer.tokenizer, QUESTION)
    assert (ids == -200).sum() == 1
    prepared = pipeline.prepare(answerer.cfg, [ids], [pixels], schedules.fixed(6), max_new_tokens=5)
    norm = (np.asarray(CLIP_MEAN) * 255, np.asarray(CLIP_STD) * 255)
    _, gen = pipeline.run(answerer.params, answerer.cfg, prepared, max_new_tokens=5, eos_ids=answerer.eos,
                          pad_id=answerer.eos[0], pixel_norm=norm)
    n = int(gen.num_tokens[0])
    np.testing.assert_array_equal(got.token_ids, np.asarray(gen.tokens)[0, :n])
    assert got.memory_entries == prepared.plans[0].memory_after_prefill
    assert got.frame_indices.tolist() == video.uniform_indices(23, 13).tolist()
    assert set(answerer.eos) == {510, 501}  # generation_config's eos and the tokenizer's <|im_end|>


def test_truncated_video_exits_nonzero_naming_the_file(setup, tmp_path, capsys):
    root, path = setup
    data = open(path, "rb").read()
    bad = tmp_path / "cut.mp4"
    bad.write_bytes(data[: len(data) // 2])
    assert vxl(["infer", "--checkpoint", str(root / "hf"), "--video", str(bad), "--question", "hi"]) == 1
    err = capsys.readouterr().err
    assert f"cannot read video {bad}" in err


def test_checkpoint_without_tokenizer_exits_nonzero(tmp_path, capsys):
    write_tiny_checkpoint(str(tmp_path / "m"), tokenizer=False)
    assert vxl(["infer", "--checkpoint", str(tmp_path / "m"), "--video", "x.mp4", "--question", "hi"]) == 1
    assert "has no tokenizer" in capsys.readouterr().err


@pytest.mark.slow  # 30 s; test_x2l checks the same equalities on features
def test_x2l_with_every_or_no_chunk_reloaded_answers_like_the_low_or_high_ratio(setup):
    root, path = setup
    answerer = Answerer.load(str(root / "hf"))
    frames = video.read(path, video.uniform(23)).frames                 # 3 chunks: 10, 10, 3 frames
    ask = lambda **kw: answerer.ask_frames(frames, QUESTION, max_new_tokens=5, **kw)
    for k, ratio in ((3, 2), (0, 16)):
        x2l = ask(x2l=X2LConfig(low=2, high=16, k=k))
        plain = ask(ratio=ratio)
        np.testing.assert_array_equal(x2l.token_ids, plain.token_ids)
        assert x2l.memory_entries == plain.memory_entries
        assert len(x2l.details["selected"]) == k and x2l.details["chunk_frames"] == [[0, 10], [10, 10], [20, 3]]
    one = ask(x2l=X2LConfig(low=2, high=16, k=1, offload=True))
    sizes = one.details["entries"]
    assert sizes["all_high"] < sizes["merged"] < sizes["all_low"] and 0 < one.details["reduction_vs_all_low"] < 1
    assert one.seconds["ttft"] > 0


def test_infer_takes_a_schedule_and_x2l_from_the_command_line(setup, capsys):
    root, path = setup
    base = ["infer", "--checkpoint", str(root / "hf"), "--video", path, "--question", QUESTION,
            "--frames", "13", "--max-new-tokens", "3"]
    assert vxl(base + ["--schedule", "dynamic:ratio=6,threshold=0.0,min_frames=3"]) == 0
    assert "at ratio 6 in" in capsys.readouterr().err
    assert vxl(base + ["--x2l", "low=2,high=8,k=1,oracle=uniform"]) == 0
    assert "X2L: 2 chunk(s) at ratios 2/8" in capsys.readouterr().err
    assert vxl(base + ["--schedule", "fixed:ratio=seven"]) == 1
    assert "bad value for ratio" in capsys.readouterr().err


def test_dynamic_schedule_finds_the_scene_cuts_of_a_generated_video(setup):
    root, _ = setup
    answerer = Answerer.load(str(root / "hf"))
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200)]
    scenes = [np.broadcast_to(np.asarray(c, np.uint8), (n, 64, 64, 3)) for c, n in zip(colours, (4, 7, 5))]
    frames = np.concatenate(scenes)                                    # cuts after frames 3 and 10
    got = answerer.ask_frames(frames, QUESTION, schedule=schedules.dynamic(ratio=6, threshold=1e-4),
                              max_new_tokens=2)
    assert got.details["window_frames"] == [4, 7, 5] and got.details["ratios"] == [6, 6, 6]
    # No cut deep enough: the 16 frames are split evenly into windows of at most 10 (8 + 8).
    flat = answerer.ask_frames(frames, QUESTION, schedule=schedules.dynamic(ratio=6, threshold=10.0),
                               max_new_tokens=2)
    assert flat.details["window_frames"] == [8, 8]
