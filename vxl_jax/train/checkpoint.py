"""Training checkpoints: the train state and the data iterator in one orbax CheckpointManager.

Each step directory holds two items:

    state   params, optimizer state, step, PRNG key data (orbax's standard handler,
            restored straight into the run's shardings)
    data    the grain iterator state of every process (grain's handler: one JSON
            per process), so the data order, the curriculum's step and the skip
            counts continue exactly

Restoring both gives the same future as the run that was interrupted (bitwise
on CPU; see tests/test_train_loop.py).
"""

from __future__ import annotations

import logging
from typing import Optional

import grain
import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


def manager(directory: str, keep: int = 3) -> ocp.CheckpointManager:
    return ocp.CheckpointManager(
        directory, item_names=("state", "data"),
        item_handlers={"state": ocp.StandardCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()},
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


def save(mgr: ocp.CheckpointManager, step: int, state, iterator) -> None:
    """Saves and waits: a checkpoint that returns is complete on disk (SIGTERM relies on it)."""
    if step in mgr.all_steps():
        return
    mgr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                           data=grain.checkpoint.CheckpointSave(iterator)), force=True)
    mgr.wait_until_finished()
    log.info("saved checkpoint %d to %s", step, mgr.directory)


def restore(mgr: ocp.CheckpointManager, state_like, iterator, step: Optional[int] = None):
    """Restores `step` (default: the latest) into the structure and shardings of `state_like`."""
    step = mgr.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint in {mgr.directory}")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state_like)
    out = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                    data=grain.checkpoint.CheckpointRestore(iterator)))
    return out["state"]
