"""Resume falls back to the previous checkpoint when the latest one is damaged."""

import logging
import os

import grain
import jax.numpy as jnp
import numpy as np
import pytest

from vxl_jax.train import checkpoint


def _iterator():
    return iter(grain.MapDataset.range(100).to_iter_dataset())


def _state(value: float) -> dict:
    return {"w": jnp.full((64, 32), value, jnp.float32), "step": jnp.asarray(int(value), jnp.int32)}


def test_a_truncated_latest_checkpoint_falls_back_to_the_one_before(tmp_path, caplog):
    mgr = checkpoint.manager(str(tmp_path / "ckpt"), keep=3)
    it = _iterator()
    for step in (1, 2):
        next(it)
        checkpoint.save(mgr, step, _state(step), it)
    files = [os.path.join(d, f) for d, _, names in os.walk(tmp_path / "ckpt" / "2" / "state") for f in names
             if os.path.getsize(os.path.join(d, f)) > 64 and "metadata" not in f]
    assert files
    for path in files:                                  # half-written: every data file of the latest cut short
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    fresh = _iterator()
    with caplog.at_level(logging.WARNING, logger="vxl_jax.train.checkpoint"):
        state = checkpoint.restore(mgr, _state(0), fresh)
    np.testing.assert_array_equal(np.asarray(state["w"]), 1.0)
    assert int(state["step"]) == 1 and next(fresh) == 1          # the data position of checkpoint 1
    assert "checkpoint 2" in caplog.text and "falling back" in caplog.text
    with pytest.raises(Exception):
        checkpoint.restore(mgr, _state(0), _iterator(), step=2)    # asked for by number: no fallback
    mgr.close()
