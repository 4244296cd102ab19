"""The grain training loader over 200 generated records, some broken on purpose.

Same seed -> same batches; a restored iterator continues exactly; the broken
records are skipped and counted by reason; curriculum ratios are reproducible
and switch stage; worker processes give the same batches as none; shards split
the records.
"""

import dataclasses
import json

import numpy as np
import pytest

from vxl_jax.data.synthetic import synthetic_video
from vxl_jax.data import curriculum, loader, video
from vxl_jax.data import tiny_tokenizer

N_RECORDS = 200


def _record(i: int) -> tuple[dict, str]:
    """Record i and the skip reason it must get ('' for a good one)."""
    conv = [{"from": "human", "value": f"<image>\nWhat happens at second {i}?"},
            {"from": "gpt", "value": f"The square moves {i} times."}]
    rec = {"id": f"r{i}", "conversations": conv, "video": f"v{i % 3}.mp4"}
    kind = i % 20
    if kind == 3:
        rec["video"] = "truncated.mp4"
        return rec, "unreadable_media"
    if kind == 7:
        rec["video"] = "empty.mp4"
        return rec, "unreadable_media"
    if kind == 11:
        rec["video"] = "missing.mp4"
        return rec, "unreadable_media"
    if kind == 13:
        conv[0]["value"] = "No placeholder in this question."
        return rec, "placeholder"
    if kind == 17:
        conv[1]["value"] = "word " * 300
        return rec, "too_long"
    if kind == 19:
        rec.pop("video")
        rec["conversations"] = [{"from": "human", "value": "Only text here."}, {"from": "gpt", "value": "Fine."}]
        return rec, ""  # a good text-only record
    if kind == 5:
        rec["conversations"] = [{"from": "human", "value": "<image>\nQ?"}, {"from": "gpt", "value": ""}]
        conv = rec["conversations"]
        return rec, ""  # an empty reply still has its <|im_end|> to learn
    return rec, ""


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    media = root / "media"
    media.mkdir()
    for k in range(3):
        video.write_test_video(media / f"v{k}.mp4", synthetic_video(12 + 6 * k, 64, seed=k), fps=8)
    data = (media / "v0.mp4").read_bytes()
    (media / "truncated.mp4").write_bytes(data[: len(data) // 3])
    (media / "empty.mp4").write_bytes(b"")
    recs, reasons = zip(*[_record(i) for i in range(N_RECORDS)])
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    tiny_tokenizer.save(str(root / "tok"), 512)
    cfg = loader.LoaderConfig(
        annotations=str(root / "train.jsonl"), tokenizer=str(root / "tok"), media_root=str(media), frames=12,
        image_size=28, frame_buckets=(10, 20), text_buckets=(64, 128), batch_size=4, num_epochs=1,
        seed=5, curriculum=curriculum.paper(stage1_steps=6, seed=9), shard_index=0, shard_count=1)
    return cfg, list(reasons), root


def _take(cfg, n=None, it=None):
    it = it if it is not None else iter(loader.build_dataset(cfg))
    out = []
    for batch in it:
        out.append(batch)
        if n is not None and len(out) == n:
            break
    return out, it


def _assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def test_one_epoch_same_batches_twice_and_bad_records_reported(dataset):
    cfg, reasons, _ = dataset
    first, it = _take(cfg)
    second, it2 = _take(cfg)
    _assert_same(first, second)
    expected = {r: reasons.count(r) for r in loader.SKIP_REASONS}
    good = N_RECORDS - sum(expected.values())
    assert len(first) == good // cfg.batch_size
    metrics = it.metrics()
    assert metrics["data/records_seen"] == N_RECORDS
    assert metrics["data/records_skipped"] == sum(expected.values()) == 50
    assert {k: metrics[f"data/skipped_{k}"] for k in loader.SKIP_REASONS} == expected
    # Each skip names its record and why; no broken record reaches a batch and every good one does.
    skipped = {s.index: s.reason for s in it.skipped_records}
    assert skipped == {i: r for i, r in enumerate(reasons) if r}
    assert any("truncated.mp4" in s.detail for s in it.skipped_records)
    seen = np.concatenate([b["index"] for b in first]).tolist()
    good_ids = {i for i, r in enumerate(reasons) if not r}
    assert len(seen) == len(set(seen)) == 148 and set(seen) <= good_ids  # 150 good: 2 left by drop_remainder
    assert seen != sorted(seen)  # shuffled


def test_batches_have_bucketed_static_shapes(dataset):
    cfg, _, _ = dataset
    batches, _ = _take(cfg, 10)
    for b in batches:
        assert b["input_ids"].shape[1] in cfg.text_buckets and b["frames"].shape[1] in (0, *cfg.frame_buckets)
        assert b["frames"].dtype == np.uint8 and b["frames"].shape[2:] == (3, 28, 28)
        np.testing.assert_array_equal(b["frame_mask"].sum(1), b["num_frames"])
        n_text = b["text_mask"].sum(1)
        for row in range(cfg.batch_size):
            ids, labels = b["input_ids"][row], b["labels"][row]
            assert (labels[n_text[row]:] == -100).all() and (ids[n_text[row]:] == 510).all()  # pad = <|endoftext|>
            has_video = b["num_frames"][row] > 0
            assert (ids == -200).sum() == int(has_video)
            assert b["num_frames"][row] in (0, 12)
            windows = int(np.ceil(b["num_frames"][row] * 144 / 1440))
            assert (b["ratios"][row, :windows] > 0).all() and (b["ratios"][row, windows:] == 0).all()
            assert not b["frames"][row, b["num_frames"][row]:].any()


def test_resume_from_saved_state_is_exact(dataset, tmp_path):
    cfg, _, _ = dataset
    uninterrupted, _ = _take(cfg, 12)
    head, it = _take(cfg, 5)
    manager = loader.checkpoint_manager(str(tmp_path / "ckpt"))
    loader.save_state(manager, 5, it)
    metrics_at_5 = it.metrics()
    fresh = iter(loader.build_dataset(cfg))
    loader.restore_state(loader.checkpoint_manager(str(tmp_path / "ckpt")), fresh)
    assert fresh.metrics() == metrics_at_5
    tail, _ = _take(cfg, 7, it=fresh)
    _assert_same(head + tail, uninterrupted)
    assert [int(b["step"]) for b in tail] == list(range(5, 12))


def test_curriculum_ratios_are_reproducible_and_switch_stage(dataset):
    cfg, _, _ = dataset
    cfg = dataclasses.replace(cfg, frames=20)  # 2 windows per video
    batches, _ = _take(cfg, 14)
    cur = cfg.curriculum
    for b in batches:
        step = int(b["step"])
        for row in range(cfg.batch_size):
            windows = int(np.ceil(b["num_frames"][row] * 144 / 1440))
            np.testing.assert_array_equal(b["ratios"][row, :windows], cur.ratios(step, b["index"][row], windows))
        video_rows = b["ratios"][b["num_frames"] > 0]
        assert (video_rows == video_rows[0]).all()  # step-random: one ratio per window index for the batch
        allowed = {2, 4} if step < 6 else {2, 4, 8, 12, 16}
        assert set(video_rows.ravel().tolist()) <= allowed
    late = {r for b in batches[6:] for r in b["ratios"].ravel().tolist()} - {0}
    assert late - {2, 4}, f"stage 2 never drew a ratio above 4 in 8 steps: {late}"


def test_curriculum_modes():
    inst = curriculum.Curriculum(((None, (2, 4, 8)),), mode="instance-random", seed=1)
    rows = [inst.ratios(3, i, 5) for i in range(20)]
    assert all(len(set(r.tolist())) == 1 for r in rows) and len({int(r[0]) for r in rows}) > 1
    assert [r.tolist() for r in rows] == [inst.ratios(3, i, 5).tolist() for i in range(20)]
    step = curriculum.paper(100, seed=2)
    assert step.ratios(7, 0, 6).tolist() == step.ratios(7, 123, 6).tolist()  # shared by the batch
    assert step.ratios(7, 0, 6).tolist() != step.ratios(8, 0, 6).tolist() or step.ratios(9, 0, 6).tolist() != step.ratios(7, 0, 6).tolist()
    assert curriculum.fixed(8).ratios(0, 0, 3).tolist() == [8, 8, 8]
    assert step.all_ratios == (2, 4, 8, 12, 16)
    for bad in [((None, (2, 4)),), ((10, (2,)),), ((10, (2,)), (5, (4,)), (None, (8,))), ((None, (0,)),)]:
        with pytest.raises(ValueError):
            curriculum.Curriculum(bad, mode="fixed" if len(bad[0][1]) == 2 else "step-random")
    assert curriculum.from_dict({"stages": [[6, [2, 4]], [None, [2, 4, 8]]], "mode": "step-random"}).stage(6) == 1
    shipped = curriculum.load("curriculum_paper")
    assert shipped == curriculum.paper(2000) and shipped.stage(1999) == 0 and shipped.stage(2000) == 1
    with pytest.raises(FileNotFoundError):
        curriculum.load("no_such_curriculum")


def test_worker_processes_give_the_same_batches(dataset):
    cfg, _, _ = dataset
    reference, _ = _take(cfg, 8)
    with_workers, it = _take(dataclasses.replace(cfg, num_workers=2), 8)
    try:
        _assert_same(with_workers, reference)
    finally:
        it.close()
        del it, with_workers


def test_shards_split_the_records(dataset):
    cfg, reasons, _ = dataset
    seen = []
    for shard in range(2):
        batches, it = _take(dataclasses.replace(cfg, shard_index=shard, shard_count=2, drop_remainder=False))
        seen.append(set(np.concatenate([b["index"] for b in batches]).tolist()))
        assert it.metrics()["data/records_seen"] == N_RECORDS // 2
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == {i for i, r in enumerate(reasons) if not r}


def test_bad_loader_configs(dataset):
    cfg, _, _ = dataset
    for change in ({"frame_buckets": (15, 30)}, {"frames": 40}, {"text_buckets": (128, 64)}, {"batch_size": 0},
                   {"text_overflow": "wrap"}):
        with pytest.raises(ValueError):
            dataclasses.replace(cfg, **change)


def test_truncation_keeps_long_replies_and_skips_records_left_without_reply_text(dataset, tmp_path):
    cfg, _, root = dataset
    recs = [  # a long reply is cut to the largest bucket; a long question leaves no reply; a normal record
        {"video": "v0.mp4", "conversations": [{"from": "human", "value": "<image>\nQ?"},
                                              {"from": "gpt", "value": "word " * 300}]},
        {"video": "v1.mp4", "conversations": [{"from": "human", "value": "<image>\n" + "why " * 300},
                                              {"from": "gpt", "value": "Because."}]},
        {"video": "v2.mp4", "conversations": [{"from": "human", "value": "<image>\nQ?"},
                                              {"from": "gpt", "value": "Yes."}]}]
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    base = dataclasses.replace(cfg, annotations=str(tmp_path / "t.jsonl"), batch_size=1, shuffle=False,
                               drop_remainder=False)
    skip_batches, it = _take(base)
    assert it.metrics()["data/skipped_too_long"] == 2 and len(skip_batches) == 1
    batches, it = _take(dataclasses.replace(base, text_overflow="truncate"))
    m = it.metrics()
    assert m["data/skipped_empty_text"] == 1 and m["data/records_skipped"] == 1
    assert [int(b["index"][0]) for b in batches] == [0, 2]
    cut = batches[0]
    assert cut["text_mask"].sum() == cfg.text_buckets[-1] and (cut["labels"] != -100).sum() > 100
    assert [s.reason for s in it.skipped_records] == ["empty_text"] and "truncation" in it.skipped_records[0].detail


def _png(path, h, w, seed):
    from PIL import Image
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)


def _image_records():
    q = lambda text: [{"from": "human", "value": text}, {"from": "gpt", "value": "An answer."}]
    return [
        ({"image": "a.png", "conversations": q("<image>\nWhat is this?")}, 1, 2),           # 672x336 canvas
        ({"image": ["a.png", "b.png"], "conversations": q("<image>\nCompare.")}, 2, 2 + 3),  # one placeholder
        ({"image": ["a.png", "b.png"], "conversations": q("<image><image>\nCompare.")}, 2, 2 + 3),  # one each
        ({"image": ["a.png", "b.png"], "conversations": q("<image>\nFirst. <image>\nSecond.")}, 0, 0),  # text between
        ({"video": "v0.mp4", "conversations": q("<image>\nWhat happens?")}, 12, 12),
        ({"conversations": q("Just text.")}, 0, 0),
    ]


def test_image_records_single_multi_and_tiled(dataset, tmp_path):
    """Images become frames, each on its own (sizes may differ); one placeholder per image merges into one
    visual span; with anyres + unires an image becomes its tiles; video and images mix in one run."""
    from vxl_jax.config import ImageConfig
    cfg, _, root = dataset
    media = tmp_path / "media"
    media.mkdir()
    (media / "v0.mp4").write_bytes((root / "media" / "v0.mp4").read_bytes())
    _png(media / "a.png", 30, 61, 0)     # wide: two tiles side by side on a 56x28 canvas
    _png(media / "b.png", 90, 30, 1)     # tall: three tiles
    recs = [r for r, _, _ in _image_records()]
    (tmp_path / "i.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    base = dataclasses.replace(cfg, annotations=str(tmp_path / "i.jsonl"), media_root=str(media), batch_size=1,
                               shuffle=False, drop_remainder=False, frame_buckets=(10, 20))
    for tiled in (False, True):
        image = ImageConfig("anyres", ((28, 28), (56, 28), (28, 56), (28, 84)), "unires") if tiled else ImageConfig()
        batches, it = _take(dataclasses.replace(base, image=image))
        assert it.metrics()["data/skipped_placeholder"] == 1
        got = {int(b["index"][0]): b for b in batches}
        for i, (rec, frames, tiles) in enumerate(_image_records()):
            if i == 3:
                assert i not in got and "text between images" in it.skipped_records[0].detail
                continue
            b = got[i]
            assert int(b["num_frames"][0]) == (tiles if tiled else frames), (i, tiled)
            assert (b["input_ids"][0] == -200).sum() == (1 if frames else 0)
        # Both placeholder layouts give the same frames; the merged one has the original's ids minus one -200.
        np.testing.assert_array_equal(got[1]["frames"], got[2]["frames"])
        if tiled:  # a.png's tiles: the 61x30 image fitted to 56x28 (no padding needed here), cut in two
            from vxl_jax.data import records, unires
            want = unires.tile_image(records.read_image(str(media / "a.png")), image.grid_pinpoints, 28).channels_first()
            np.testing.assert_array_equal(got[0]["frames"][0, :2], want)


def test_group_by_modality_length(dataset, tmp_path):
    cfg, _, root = dataset
    recs = []
    for i in range(40):
        kind = ("video", "image", "text")[i % 3]
        words = "word " * int(np.random.default_rng(i).integers(1, 12))
        rec = {"conversations": [{"from": "human", "value": ("<image>\n" if kind != "text" else "") + "Q?"},
                                 {"from": "gpt", "value": words}]}
        if kind == "video":
            rec["video"] = "v0.mp4"
        elif kind == "image":
            rec["image"] = "a.png"
        recs.append(rec)
    media = tmp_path / "media"
    media.mkdir()
    (media / "v0.mp4").write_bytes((root / "media" / "v0.mp4").read_bytes())
    _png(media / "a.png", 40, 40, 0)
    (tmp_path / "g.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    g = dataclasses.replace(cfg, annotations=str(tmp_path / "g.jsonl"), media_root=str(media), batch_size=4,
                            group_by_modality_length=True, num_epochs=2)
    batches, _ = _take(g)
    assert len(batches) == 20    # 80 records, nothing skipped, 4 per batch
    lengths = {i: loader.modality_length(r) for i, r in enumerate(recs)}
    mixed = 0
    for b in batches:
        kinds = {lengths[int(i)][0] for i in b["index"]}
        words = [lengths[int(i)][1] for i in b["index"]]
        mixed += len(kinds) > 1
        if len(kinds) == 1:
            assert words == sorted(words, reverse=True)
    assert mixed <= 2    # only the epoch's last batch gathers the partial megabatches (one per kind)
    epochs = [np.concatenate([b["index"] for b in batches[:10]]), np.concatenate([b["index"] for b in batches[10:]])]
    assert sorted(epochs[0].tolist()) == sorted(epochs[1].tolist()) == list(range(40))
    assert epochs[0].tolist() != epochs[1].tolist()           # reshuffled each epoch
    again, _ = _take(g)
    _assert_same(batches, again)
