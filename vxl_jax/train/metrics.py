"""Per-step training metrics: one stdout line, one JSON line and TensorBoard scalars per step.

    with MetricsWriter(workdir, enabled=jax.process_index() == 0, resume_from_step=start) as mw:
        mw.write_text("config", config_json, step=start)
        for step in ...:
            mw.write(step, {"loss": loss, "grad_norm": gnorm, "lr": lr, "tokens_per_s": tps})

Files under `workdir`:
  metrics.jsonl   {"step": 12, "loss": 4.31, ...} per `write`; the durable record, line
                  buffered so a killed run keeps every line it wrote. Non-finite values
                  are written as null (strict JSON readers reject NaN/Infinity).
  tensorboard/    tensorboardX event files; tags are the metric keys unchanged
                  ("loss", "data/records_skipped"), NaN/inf kept as they are.

Resuming from a checkpoint at step k (`resume_from_step=k`) drops the jsonl lines with
step > k written by a run that got further before it died, and tells TensorBoard to
purge its events from step k + 1 on, so both logs read as one uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
from typing import Any, Optional, Sequence

import numpy as np
from tqdm import tqdm

log = logging.getLogger(__name__)

JSONL_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"

Number = float | int

# Stdout label and format per well-known key; other keys get `key {value:.4g}`.
_FORMATS: dict[str, tuple[str, str]] = {
    "loss": ("loss", "{:.4f}"),
    "grad_norm": ("grad_norm", "{:.3g}"),
    "lr": ("lr", "{:.1e}"),
    "tokens_per_s": ("tokens/s", "{:.0f}"),
    "step_time_s": ("step", "{:.2f} s"),
}


def to_number(value: Any) -> Number:
    """A Python int or float from a Python, numpy or JAX scalar (or any size-1 array).

    Integers and bools stay ints (counts read better as 3 than 3.0); everything else,
    bfloat16 included, becomes a float. Arrays are fetched to host here.
    """
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    array = np.asarray(value)
    if array.size != 1:
        raise TypeError(f"metric value must be a scalar, got shape {array.shape}")
    if array.dtype == np.bool_ or np.issubdtype(array.dtype, np.integer):
        return int(array.reshape(()))
    try:
        return float(array.reshape(()))
    except (TypeError, ValueError) as e:
        raise TypeError(f"metric value must be numeric, got {value!r}") from e


def format_metrics(
    step: int,
    metrics: dict[str, Any],
    keys: Sequence[str] = ("loss", "grad_norm", "lr", "tokens_per_s", "step_time_s"),
) -> str:
    """One compact line, e.g. "step 12 | loss 4.3121 | grad_norm 1.02 | lr 3.0e-04 | tokens/s 812 | step 0.41 s".

    Only `keys` present in `metrics` are shown, in `keys` order.
    """
    parts = [f"step {step}"]
    for key in keys:
        if key not in metrics:
            continue
        value = float(to_number(metrics[key]))
        label, fmt = _FORMATS.get(key, (key, "{:.4g}"))
        parts.append(f"{label} {fmt.format(value)}")
    return " | ".join(parts)


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl file; a torn last line (run killed mid-write) is skipped."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    return _parse_records(text, str(path))


def _parse_records(text: str, path: str) -> list[dict[str, Any]]:
    lines = text.split("\n")
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            # Only the final, unterminated line can be legitimately torn by a kill.
            if i == len(lines) - 1:
                log.warning("%s: skipping torn last line %r", path, line[:80])
                continue
            raise
    return records


def _truncate_after(path: str, step: int) -> None:
    """Rewrite `path` keeping only records with step <= `step`, atomically (temp file + rename)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        records = _parse_records(f.read(), path)
    kept = [r for r in records if r.get("step", -1) <= step]
    if len(kept) == len(records):
        return
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".metrics.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for record in kept:
                f.write(json.dumps(record, allow_nan=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    log.info("%s: dropped %d lines after step %d (resumed run)", path, len(records) - len(kept), step)


class MetricsWriter:
    """Per-step training metrics to stdout, DIR/metrics.jsonl and a TensorBoard log (DIR/tensorboard/).

    `enabled=False` (non-zero JAX processes) makes every method a no-op and creates nothing.
    Without `resume_from_step` an existing metrics.jsonl is appended to.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        *,
        enabled: bool = True,
        stdout: bool = True,
        tensorboard: bool = True,
        resume_from_step: Optional[int] = None,
    ):
        self.enabled = enabled
        self.stdout = stdout
        self.jsonl_path = os.path.join(os.fspath(workdir), JSONL_NAME)
        self.tensorboard_dir = os.path.join(os.fspath(workdir), TENSORBOARD_DIR)
        self._file = None
        self._tb = None
        self._warned_nonfinite: set[str] = set()
        self._closed = False
        if not enabled:
            return

        os.makedirs(workdir, exist_ok=True)
        _drop_torn_tail(self.jsonl_path)
        if resume_from_step is not None:
            _truncate_after(self.jsonl_path, resume_from_step)
        # buffering=1: line buffered, each record reaches the OS as soon as it is written.
        self._file = open(self.jsonl_path, "a", encoding="utf-8", buffering=1)

        if tensorboard:
            # Imported here so disabled writers (most processes) never load protobuf.
            from tensorboardX import SummaryWriter

            # purge_step makes TensorBoard hide events at steps >= it from earlier files,
            # mirroring the jsonl truncation above.
            purge = None if resume_from_step is None else resume_from_step + 1
            self._tb = SummaryWriter(logdir=self.tensorboard_dir, purge_step=purge, flush_secs=30)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        """Log `metrics` at `step`: one jsonl object, TensorBoard scalars, one stdout line."""
        if not self.enabled:
            return
        self._check_open()
        if "step" in metrics:
            raise ValueError("'step' is reserved for the step number; pass it as `step`")
        step = int(step)
        values = {key: to_number(value) for key, value in metrics.items()}

        record: dict[str, Any] = {"step": step}
        for key, value in values.items():
            if isinstance(value, float) and not math.isfinite(value):
                if key not in self._warned_nonfinite:
                    self._warned_nonfinite.add(key)
                    log.warning("metric %r is %s at step %d; written as null in %s "
                                "(warned once per key)", key, value, step, self.jsonl_path)
                record[key] = None
            else:
                record[key] = value
        self._file.write(json.dumps(record, allow_nan=False) + "\n")

        if self._tb is not None:
            for key, value in values.items():
                self._tb.add_scalar(key, float(value), step)
        if self.stdout:
            tqdm.write(format_metrics(step, values))

    def write_text(self, tag: str, text: str, step: int) -> None:
        """A TensorBoard text summary (e.g. the config at start); nothing goes to the jsonl."""
        if not self.enabled:
            return
        self._check_open()
        if self._tb is not None:
            self._tb.add_text(tag, text, int(step))

    def flush(self) -> None:
        if not self.enabled or self._closed:
            return
        self._file.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self) -> None:
        """Flush and close both logs; idempotent."""
        if not self.enabled or self._closed:
            return
        self._closed = True
        self._file.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("MetricsWriter is closed")


def _drop_torn_tail(path: str) -> None:
    """Cut an unterminated last line (a run killed mid-write) so appends start on a fresh line."""
    if not os.path.exists(path):
        return
    with open(path, "r+b") as f:
        data = f.read()
        if not data or data.endswith(b"\n"):
            return
        keep = data.rfind(b"\n") + 1
        log.warning("%s: dropping torn last line %r", path, data[keep:keep + 80])
        f.truncate(keep)
