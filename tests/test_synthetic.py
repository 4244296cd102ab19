"""The synthetic video QA dataset: counts, pixels that match the answers, idempotence, determinism, loading."""

import dataclasses
import json
import os

import numpy as np
import pytest

from vxl_jax.data import loader, synthetic, video

SPEC = synthetic.SyntheticSpec(num_records=6, num_eval=2, frames=8, size=64, seed=3)


@pytest.fixture(scope="module")
def out_dir(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("synth"))
    synthetic.generate(out, SPEC)
    return out


def _records(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _nearest_colour(pixels: np.ndarray) -> str:
    mean = pixels.reshape(-1, 3).astype(np.float64).mean(0)
    return min(synthetic.PALETTE, key=lambda name: np.sum((mean - synthetic.PALETTE[name]) ** 2))


def test_counts_and_files(out_dir):
    train, held_out = _records(os.path.join(out_dir, "train.jsonl")), _records(os.path.join(out_dir, "eval.jsonl"))
    assert len(train) == SPEC.num_records and len(held_out) == SPEC.num_eval
    assert not {r["video"] for r in train} & {r["video"] for r in held_out}
    assert len({r["id"] for r in train + held_out}) == len(train + held_out)
    for r in train + held_out:
        assert r["conversations"][0]["value"].startswith("<image>\n")
        assert r["conversations"][1]["value"] == r["answer"]
        assert os.path.isfile(os.path.join(out_dir, r["video"]))
    assert os.path.isfile(os.path.join(out_dir, "tokenizer", "tokenizer.json"))
    assert not [name for name in os.listdir(out_dir) if name.endswith(".tmp")]


def test_pixels_match_answers(out_dir):
    corner = slice(2, SPEC.size // 8)  # background only: the shape stays near the centre
    records = _records(os.path.join(out_dir, "train.jsonl")) + _records(os.path.join(out_dir, "eval.jsonl"))
    checked = 0
    for r in records:
        clip = video.read(os.path.join(out_dir, r["video"]), video.uniform(SPEC.frames))
        assert clip.frames.shape == (SPEC.frames, SPEC.size, SPEC.size, 3)
        first, last = (_nearest_colour(clip.frames[i, corner, corner]) for i in (0, -1))
        assert first != last
        question = r["conversations"][0]["value"]
        if "first frame" in question:
            assert first == r["answer"]
            checked += 1
        elif "last frame" in question:
            assert last == r["answer"]
            checked += 1
        else:
            assert r["answer"] in synthetic.SHAPES
            centre = _nearest_colour(clip.frames[0, SPEC.size // 2 - 2:SPEC.size // 2 + 2,
                                                 SPEC.size // 2 - 2:SPEC.size // 2 + 2])
            assert centre not in (first, last)
    assert checked >= 2


def test_idempotent_and_refuses_another_spec(out_dir):
    files = [os.path.join(out_dir, name) for name in ("spec.json", "train.jsonl", "videos/000.mp4")]
    before = [os.stat(p).st_mtime_ns for p in files]
    assert synthetic.generate(out_dir, SPEC) == os.path.join(out_dir, "train.jsonl")
    assert [os.stat(p).st_mtime_ns for p in files] == before
    with pytest.raises(ValueError, match="num_records"):
        synthetic.generate(out_dir, dataclasses.replace(SPEC, num_records=9))
    assert [os.stat(p).st_mtime_ns for p in files] == before


def test_deterministic(out_dir, tmp_path):
    again = synthetic.generate(str(tmp_path / "again"), SPEC)
    for name in ("train.jsonl", "eval.jsonl"):
        with open(os.path.join(out_dir, name)) as a, open(os.path.join(os.path.dirname(again), name)) as b:
            assert a.read() == b.read()


def test_bad_spec():
    with pytest.raises(ValueError, match="even"):
        synthetic.SyntheticSpec(size=65)
    with pytest.raises(ValueError, match="frames"):
        synthetic.SyntheticSpec(frames=1)


def test_loader_reads_it(out_dir):
    cfg = loader.LoaderConfig(annotations=os.path.join(out_dir, "train.jsonl"),
                              tokenizer=os.path.join(out_dir, "tokenizer"), media_root=out_dir, frames=8,
                              image_size=112, tokens_per_frame=16, window=64, frame_buckets=(8,), text_buckets=(64,),
                              batch_size=2, shuffle=False, num_epochs=1)
    it = iter(loader.build_dataset(cfg))
    batch = next(it)
    assert batch["frames"].shape == (2, 8, 3, 112, 112)
    assert (batch["labels"] != -100).any()
    assert len(list(it)) == SPEC.num_records // 2 - 1  # the rest of the epoch
    assert it.metrics()["data/records_skipped"] == 0


def test_size_decord_cannot_read_is_refused(tmp_path):
    # decord mis-decodes 48 px wide H.264; the generator must say so and leave the folder unmarked.
    with pytest.raises(ValueError, match="decord"):
        synthetic.generate(str(tmp_path), dataclasses.replace(SPEC, size=48, num_records=1, num_eval=0))
    assert not (tmp_path / "spec.json").exists()


def test_colour_then_grey_layout(tmp_path):
    """The demo's layout: the first half of the frames is the answer colour alone, the rest grey with a shape of
    another colour; only the asked kinds of question are written."""
    spec = dataclasses.replace(SPEC, num_records=4, num_eval=2, layout="colour_then_grey", questions=("first",))
    out = str(tmp_path)
    synthetic.generate(out, spec)
    assert synthetic.generate(out, spec) == os.path.join(out, "train.jsonl")  # the tuple field reads back equal
    train, held_out = _records(os.path.join(out, "train.jsonl")), _records(os.path.join(out, "eval.jsonl"))
    assert len(train) == 4 and len(held_out) == 2 and len({r["video"] for r in train + held_out}) == 6
    half = SPEC.size // 2
    for r in train + held_out:
        assert r["question_type"] == "first" and r["answer"] in synthetic.PALETTE
        clip = video.read(os.path.join(out, r["video"]), video.uniform(SPEC.frames))
        first, last = clip.frames[0], clip.frames[-1]
        assert _nearest_colour(first[2:SPEC.size // 8, 2:SPEC.size // 8]) == r["answer"]
        assert _nearest_colour(first[half - 2:half + 2, half - 2:half + 2]) == r["answer"]  # no shape on it
        assert np.abs(last[2:SPEC.size // 8, 2:SPEC.size // 8].astype(int) - synthetic.GREY).max() < 24
        assert _nearest_colour(last[half - 2:half + 2, half - 2:half + 2]) != r["answer"]  # the shape's colour
    with pytest.raises(ValueError, match="last"):
        dataclasses.replace(spec, questions=("first", "last"))
    with pytest.raises(ValueError, match="layout"):
        dataclasses.replace(spec, layout="stripes")
    with pytest.raises(ValueError, match="questions"):
        dataclasses.replace(SPEC, questions=("colour",))
