"""MetricsWriter: jsonl records, resume truncation, NaN handling, TensorBoard event files, stdout form."""

import glob
import json
import logging
import math
import os
import struct

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboardX.proto import event_pb2
from tensorboardX.record_writer import masked_crc32c

from vxl_jax.train.metrics import MetricsWriter, format_metrics, read_jsonl


def read_events(logdir: str) -> list[event_pb2.Event]:
    """All events of all TFRecord files under `logdir`, checking the framing's CRCs."""
    events = []
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        with open(path, "rb") as f:
            data = f.read()
        pos = 0
        while pos < len(data):
            header = data[pos:pos + 8]
            (length,) = struct.unpack("<Q", header)
            (header_crc,) = struct.unpack("<I", data[pos + 8:pos + 12])
            assert header_crc == masked_crc32c(header)
            payload = data[pos + 12:pos + 12 + length]
            (payload_crc,) = struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])
            assert payload_crc == masked_crc32c(payload)
            event = event_pb2.Event()
            event.ParseFromString(payload)
            events.append(event)
            pos += 16 + length
    return events


def scalars(logdir: str) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for event in read_events(logdir):
        if event.HasField("summary"):
            for value in event.summary.value:
                if value.HasField("simple_value"):
                    out.setdefault(value.tag, {})[event.step] = value.simple_value
    return out


def test_jsonl_one_object_per_write(tmp_path):
    with MetricsWriter(tmp_path, stdout=False, tensorboard=False) as mw:
        mw.write(1, {"loss": 2.5, "grad_norm": np.float32(0.5), "lr": jnp.float32(3e-4),
                     "data/records_skipped": np.int64(3), "tokens": jnp.asarray(7, jnp.int32)})
        mw.write(2, {"loss": jnp.asarray(1.25, jnp.bfloat16), "ok": True})
        # Line buffered: visible on disk before flush/close.
        assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 2
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first == {"step": 1, "loss": 2.5, "grad_norm": 0.5, "lr": pytest.approx(3e-4),
                     "data/records_skipped": 3, "tokens": 7}
    assert isinstance(first["data/records_skipped"], int) and isinstance(first["grad_norm"], float)
    assert second == {"step": 2, "loss": 1.25, "ok": 1}
    assert not (tmp_path / "tensorboard").exists()


def test_rejects_bad_values(tmp_path):
    with MetricsWriter(tmp_path, stdout=False, tensorboard=False) as mw:
        with pytest.raises(TypeError):
            mw.write(1, {"loss": np.ones(3)})
        with pytest.raises(ValueError):
            mw.write(1, {"step": 3})
    with pytest.raises(ValueError):
        mw.write(2, {"loss": 1.0})  # closed


def test_resume_truncates_later_steps(tmp_path):
    with MetricsWriter(tmp_path, stdout=False, tensorboard=False) as mw:
        for step in range(1, 8):
            mw.write(step, {"loss": float(step)})
    # A kill mid-write leaves a torn last line.
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "lo')
    assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == list(range(1, 8))

    with MetricsWriter(tmp_path, stdout=False, tensorboard=False, resume_from_step=4) as mw:
        assert [r["step"] for r in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]
        mw.write(5, {"loss": 50.0})
    records = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0)]
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_append_without_resume_drops_torn_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo')
    with MetricsWriter(tmp_path, stdout=False, tensorboard=False) as mw:
        mw.write(2, {"loss": 2.0})
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}]


def test_disabled_writer_creates_nothing(tmp_path, capsys):
    workdir = tmp_path / "run"
    with MetricsWriter(workdir, enabled=False) as mw:
        mw.write(1, {"loss": 1.0})
        mw.write_text("config", "{}", 0)
        mw.flush()
    assert not workdir.exists()
    assert capsys.readouterr().out == ""


def test_nan_written_as_null_and_warned_once(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="vxl_jax.train.metrics"):
        with MetricsWriter(tmp_path, stdout=False) as mw:
            mw.write(1, {"loss": float("nan"), "grad_norm": jnp.float32(jnp.inf)})
            mw.write(2, {"loss": np.float32("nan"), "grad_norm": 1.0})
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text
    assert [json.loads(line) for line in text.splitlines()] == [
        {"step": 1, "loss": None, "grad_norm": None}, {"step": 2, "loss": None, "grad_norm": 1.0}]
    warnings = [r for r in caplog.records if "written as null" in r.getMessage()]
    assert len(warnings) == 2  # once per key, not per step
    # TensorBoard keeps the real values: a NaN curve is worth seeing.
    tb = scalars(str(tmp_path / "tensorboard"))
    assert math.isnan(tb["loss"][1]) and math.isinf(tb["grad_norm"][1]) and tb["grad_norm"][2] == 1.0


def test_tensorboard_scalars_and_text(tmp_path):
    with MetricsWriter(tmp_path, stdout=False) as mw:
        mw.write_text("config", '{"lr": 0.001}', 0)
        for step in (10, 20, 30):
            mw.write(step, {"loss": step / 10, "data/records_skipped": step // 10})
    tb = scalars(str(tmp_path / "tensorboard"))
    assert tb == {"loss": {10: 1.0, 20: 2.0, 30: 3.0}, "data/records_skipped": {10: 1.0, 20: 2.0, 30: 3.0}}
    texts = [v for e in read_events(str(tmp_path / "tensorboard")) if e.HasField("summary")
             for v in e.summary.value if v.metadata.plugin_data.plugin_name == "text"]
    assert len(texts) == 1 and texts[0].tensor.string_val == [b'{"lr": 0.001}']
    assert texts[0].tag.startswith("config")


def test_tensorboard_resume_purges_later_steps(tmp_path):
    with MetricsWriter(tmp_path, stdout=False, resume_from_step=4) as mw:
        mw.write(5, {"loss": 1.0})
    starts = [e for e in read_events(str(tmp_path / "tensorboard")) if e.HasField("session_log")]
    assert len(starts) == 1 and starts[0].step == 5
    assert starts[0].session_log.status == event_pb2.SessionLog.START


def test_format_metrics():
    metrics = {"loss": 4.31214, "grad_norm": np.float32(1.0213), "lr": jnp.float32(3e-4),
               "tokens_per_s": 812.4, "step_time_s": 0.4123, "other": 5}
    assert format_metrics(12, metrics) == (
        "step 12 | loss 4.3121 | grad_norm 1.02 | lr 3.0e-04 | tokens/s 812 | step 0.41 s")
    assert format_metrics(3, {"loss": 1.0}) == "step 3 | loss 1.0000"
    assert format_metrics(3, {"loss": float("nan"), "other": 5}, keys=("loss", "other")) == (
        "step 3 | loss nan | other 5")


def test_stdout_goes_through_tqdm(tmp_path, capsys):
    with MetricsWriter(tmp_path, tensorboard=False) as mw:
        mw.write(7, {"loss": 2.0, "lr": 1e-3})
    assert capsys.readouterr().out == "step 7 | loss 2.0000 | lr 1.0e-03\n"
