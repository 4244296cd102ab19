"""The training loop: config -> mesh, sharded state, loader -> steps, metrics, checkpoints, export.

    result = run(TrainConfig.load("tiny_synthetic"), "runs/a")

Every process runs this same function (`parallel.initialize` first when there
are several). The run resumes from the latest checkpoint in WORKDIR/checkpoints
when there is one (state and data iterator), saves every `save_every` steps
and at the end, and on SIGTERM finishes the step in flight, saves and returns
(`stopped_by_signal`). At `max_steps` the trained model is exported to
WORKDIR/export_hf in the HF Video-XL format (with the tokenizer), ready for
`vxl infer` or the original code.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
import time
from typing import Optional

import jax
import numpy as np
import tqdm
from jax.experimental import multihost_utils

from vxl_jax import hostmem, parallel
from vxl_jax.conversion.checkpoint import load_model, write_hf
from vxl_jax.data import loader as loader_lib
from vxl_jax.data import synthetic
from vxl_jax.model import videoxl
from vxl_jax.train import batch as batch_lib
from vxl_jax.train import checkpoint, optim
from vxl_jax.train import step as step_lib
from vxl_jax.train.config import TrainConfig
from vxl_jax.train.metrics import MetricsWriter, format_metrics

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class RunResult:
    start_step: int               # the step the run resumed from (0: fresh)
    end_step: int
    last_loss: Optional[float]
    stopped_by_signal: bool
    export_dir: Optional[str]


class _StopFlag:
    """Set by SIGTERM; the loop checks it between steps (all processes agree before acting)."""

    def __init__(self):
        self.set = False
        self._previous = None

    def __enter__(self):
        def handler(signum, frame):
            log.warning("SIGTERM: saving after the current step, then stopping")
            self.set = True
        try:
            self._previous = signal.signal(signal.SIGTERM, handler)
        except ValueError:          # not the main thread: no handler
            self._previous = None
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def any_process(self) -> bool:
        if jax.process_count() == 1:
            return self.set
        flags = multihost_utils.process_allgather(np.asarray(self.set, np.int32))
        return bool(np.any(flags))


def _prepare_data(cfg: TrainConfig, workdir: str, progress: bool) -> None:
    if cfg.synthetic is None:
        return
    if jax.process_index() == 0:
        synthetic.generate(os.path.join(workdir, "data"), cfg.synthetic_spec(), progress=progress)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("vxl synthetic data")


def _init_params(cfg: TrainConfig, mesh):
    """(params placed with the mesh's shardings, model config, tokenizer/side-file dir or None)."""
    if cfg.init is None:
        raise ValueError("this config starts from a checkpoint: --set init=CHECKPOINT_DIR (HF Video-XL or vxl_jax)")
    if cfg.init == "random":
        model_cfg = cfg.model_config()
        init = lambda: videoxl.init_params(model_cfg, jax.random.key(cfg.seed))
        shardings = parallel.param_shardings(jax.eval_shape(init), mesh)
        return jax.jit(init, out_shardings=shardings)(), model_cfg, None
    host_params, model_cfg = load_model(cfg.init)
    if cfg.model is not None and cfg.model_config() != model_cfg:
        log.warning("config.model differs from the checkpoint's config; using the checkpoint's")
    shardings = parallel.param_shardings(host_params, mesh)
    return jax.device_put(jax.tree.map(np.asarray, host_params), shardings), model_cfg, cfg.init


def _host_params(params) -> dict:
    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
    return jax.tree.map(np.asarray, params)


def run(cfg: TrainConfig, workdir: str, *, progress: bool = True, stdout: bool = True) -> RunResult:
    os.makedirs(workdir, exist_ok=True)
    leader = jax.process_index() == 0
    if leader:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(cfg.to_dict(), f, indent=2, sort_keys=True)
    _prepare_data(cfg, workdir, progress and leader)

    mesh = parallel.make_mesh(cfg.mesh_config())
    data_ways = int(np.prod([mesh.shape[a] for a in parallel.BATCH_AXES]))
    settings = cfg.step_settings()
    procs = jax.process_count()
    if cfg.global_batch % (data_ways * settings.accum_steps) or cfg.global_batch % procs:
        raise ValueError(f"data.batch_size {cfg.global_batch} must be a multiple of the data-parallel ways "
                         f"({data_ways} = data x fsdp) times accum_steps ({settings.accum_steps}) and of the "
                         f"process count ({procs})")

    with jax.set_mesh(mesh):
        params, model_cfg, side_dir = _init_params(cfg, mesh)
        ocfg = cfg.optim_config()
        tx = optim.build(ocfg, params, cfg.max_steps)
        trainable = optim.trainable_mask(ocfg, params)
        schedule = optim.lr_schedule(ocfg, cfg.max_steps)
        init_state = lambda p: step_lib.init_state(p, tx, cfg.seed)
        state_shardings = parallel.tree_shardings(jax.eval_shape(init_state, params), mesh)
        state = jax.jit(init_state, out_shardings=state_shardings)(params)     # Adam moments sharded like params
        del params

        lcfg = cfg.loader_config(workdir, model_cfg, batch_size=cfg.global_batch // procs,
                                 shard_index=jax.process_index(), shard_count=procs)
        iterator = iter(loader_lib.build_dataset(lcfg))
        mgr = checkpoint.manager(os.path.join(os.path.abspath(workdir), "checkpoints"), cfg.keep_checkpoints)
        if mgr.latest_step() is not None:
            state = checkpoint.restore(mgr, state, iterator)
        start = int(state.step)
        ratios = lcfg.curriculum.all_ratios
        if leader:
            log.info("mesh %s; %s", dict(mesh.shape), optim.describe(ocfg, state.params).replace("\n", "; "))
        step_fn = step_lib.jit_step(step_lib.make_step(model_cfg, tx, trainable, settings, schedule),
                                    state_shardings)

        writer = MetricsWriter(workdir, enabled=leader, stdout=False, resume_from_step=start)
        if start == 0:
            writer.write_text("config", "```\n" + json.dumps(cfg.to_dict(), indent=2) + "\n```", 0)
        bar = tqdm.tqdm(total=cfg.max_steps, initial=start, disable=not (progress and leader), unit="step",
                        dynamic_ncols=True)
        last_loss, stopped = None, False
        nan_steps = set(cfg.debug_nan_steps)
        bad_in_a_row, bad_total = 0, 0
        compiled_specs = set()
        try:
            with _StopFlag() as stop:
                step = start
                while step < cfg.max_steps:
                    t0 = time.perf_counter()
                    batch = next(iterator)
                    prepared = batch_lib.prepare(batch, model_cfg, ratios)
                    inputs = batch_lib.to_global(prepared.inputs, mesh)
                    t1 = time.perf_counter()
                    if nan_steps:   # every step passes a fault value (one compilation), NaN at the chosen ones
                        fault = np.float32(np.nan if step + 1 in nan_steps else 0.0)
                        state, out = step_fn(state, inputs, spec=prepared.spec, fault=fault)
                    else:
                        state, out = step_fn(state, inputs, spec=prepared.spec)
                    out = jax.device_get(out)
                    if prepared.spec not in compiled_specs:     # it compiled: give the compiler's garbage back
                        compiled_specs.add(prepared.spec)
                        hostmem.release_freed()
                    t2 = time.perf_counter()
                    step += 1
                    last_loss = float(out["loss"])
                    if int(out.pop("skipped")):
                        bad_in_a_row, bad_total = bad_in_a_row + 1, bad_total + 1
                        log.warning("step %d: loss %s, gradient norm %s: not finite, update skipped (%d in a row)",
                                    step, out["loss"], out["grad_norm"], bad_in_a_row)
                        if bad_in_a_row >= settings.max_bad_steps:
                            raise NonFiniteError(
                                f"{bad_in_a_row} steps in a row (up to step {step}) had a non-finite loss or gradient "
                                f"norm, so none of them updated the model (nothing was saved for them; the "
                                f"checkpoints hold earlier states). Lower the learning rate, check the data, or "
                                f"raise step.max_bad_steps ({settings.max_bad_steps})")
                    else:
                        bad_in_a_row = 0
                    out["steps_skipped"] = bad_total
                    log_now = step % cfg.log_every == 0 or step == cfg.max_steps
                    print_now = stdout and leader and (step % cfg.print_every == 0 or step == cfg.max_steps)
                    if log_now or print_now:
                        # tokens/s: this process's tokens times the process count (shards are alike in size)
                        metrics = dict(out, step_time_s=t2 - t1, data_time_s=t1 - t0,
                                       tokens_per_s=prepared.tokens * procs / max(t2 - t1, 1e-9))
                        metrics.update(_data_metrics(iterator))
                        if log_now:
                            writer.write(step, metrics)
                        if print_now:
                            tqdm.tqdm.write(format_metrics(step, metrics))
                    bar.update(1)
                    bar.set_postfix(loss=f"{last_loss:.4f}", refresh=False)
                    if stop.any_process():
                        checkpoint.save(mgr, step, state, iterator)
                        stopped = True
                        break
                    if step % cfg.save_every == 0:
                        checkpoint.save(mgr, step, state, iterator)
                if not stopped:
                    checkpoint.save(mgr, step, state, iterator)
        finally:
            bar.close()
            writer.close()
        export_dir = None
        if not stopped and cfg.export_hf:
            export_dir = os.path.join(workdir, "export_hf")
            host = _host_params(state.params)
            if leader:      # the tokenizer (and generation config) travel with the weights
                side = side_dir or lcfg.tokenizer
                write_hf(export_dir, host, model_cfg, side_files_from=side if os.path.isdir(side) else None)
            if procs > 1:
                multihost_utils.sync_global_devices("vxl export")
        mgr.close()
        del iterator
    return RunResult(start, int(state.step), last_loss, stopped, export_dir)


class NonFiniteError(ValueError):
    """Too many consecutive training steps with a non-finite loss or gradient norm (a ValueError: the CLI
    reports it as `vxl train: error: ...` and exits 1)."""


def _data_metrics(iterator) -> dict:
    """Records seen and skipped, summed over processes."""
    keys = ("data/records_skipped", "data/records_seen")
    local = iterator.metrics()
    values = np.asarray([local[k] for k in keys], np.int64)
    if jax.process_count() > 1:
        values = multihost_utils.process_allgather(values).sum(axis=0)
    return dict(zip(keys, values.tolist()))
