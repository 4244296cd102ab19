"""Training checkpoints: the train state and the data iterator in one orbax CheckpointManager.

Each step directory holds two items:

    state   params, optimizer state, step, PRNG key data (orbax's standard handler,
            restored straight into the run's shardings)
    data    the grain iterator state of every process (grain's handler: one JSON
            per process), so the data order, the curriculum's step and the skip
            counts continue exactly

Restoring both gives the same future as the run that was interrupted (bitwise
on CPU; see tests/test_train_loop.py). A latest checkpoint that cannot be read
(corrupt, half-written) makes `restore` fall back to the one before, with a
warning.
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
    """Restores `step` into the structure and shardings of `state_like` (and the iterator's position).

    Default: the latest step, and if it cannot be read (a corrupt or half-written file), the one before it, and
    so on, with a warning per checkpoint passed over; a ValueError when none can be read.
    """
    steps = [step] if step is not None else sorted(mgr.all_steps(), reverse=True)
    if not steps:
        raise FileNotFoundError(f"no checkpoint in {mgr.directory}")
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state_like)
    failed = []
    for s in steps:
        try:
            out = mgr.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                          data=grain.checkpoint.CheckpointRestore(iterator)))
        except Exception as e:  # orbax / tensorstore raise many kinds for a damaged file
            if step is not None:
                raise
            reason = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            log.warning("checkpoint %d in %s cannot be restored (%s); falling back to the one before", s,
                        mgr.directory, reason)
            failed.append(f"{s}: {reason}")
            continue
        if failed:
            log.warning("resumed from checkpoint %d after %d unreadable newer one(s)", s, len(failed))
        return out["state"]
    raise ValueError(f"none of the checkpoints in {mgr.directory} can be restored: " + "; ".join(failed))
