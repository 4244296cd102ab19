"""The train state and one optimizer step: forward + backward through the compression, accumulation, update.

    state = init_state(params, tx, seed)
    step = make_step(model_cfg, tx, trainable, settings)
    state, metrics = step(state, inputs, spec)          # inputs: train.batch.TrainInputs

Gradient accumulation splits the batch into `accum_steps` micro-batches run
one after another (`lax.scan`), summing the cross entropy and its gradient;
the sum is divided once by the labelled-token count of the whole batch, so
the result is the same token-level mean as one big batch (the original's
Trainer averages per-micro-batch means instead). Micro-batch a takes rows
a, a + accum, ...: with the batch sharded over devices, every device keeps
working on its own rows.

A step whose loss or gradient norm is not finite changes nothing but the
step counter and the PRNG key (metrics["skipped"] = 1); `train.loop` counts
them and stops after `max_bad_steps` in a row.

Frozen parameters (`optim.trainable_mask`) enter the forward through
`stop_gradient`, so no backward pass is spent on them (stage 1 never
differentiates the vision tower).

Axis legend: B batch, A accumulation steps, M micro-batch rows.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vxl_jax.compress.packing import PrefillSpec
from vxl_jax.config import VideoXLConfig
from vxl_jax.conversion.checkpoint import PIXEL_NORM_U8
from vxl_jax.train import optim
from vxl_jax.train.batch import TrainInputs
from vxl_jax.train.chunked_ce import DEFAULT_BLOCK
from vxl_jax.train.loss import loss_terms

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@flax.struct.dataclass
class TrainState:
    step: jax.Array        # [] int32: optimizer steps taken
    params: Any
    opt_state: Any
    rng: jax.Array         # [2] uint32 raw key data, split once per step (saved with the checkpoint)


@dataclasses.dataclass(frozen=True)
class StepSettings:
    accum_steps: int = 1
    dtype: str = "float32"          # compute dtype; parameters and optimizer state stay float32
    remat_layer: str = "none"       # qwen2.REMAT_POLICIES, per decoder layer
    remat_window: str = "full"      # per compression window (the scan body): keep only the carried memory
                                    # (a batch of one window is never recomputed: nothing to save)
    max_bad_steps: int = 10         # consecutive steps with a non-finite loss or gradient norm before the run stops
    loss_chunk: Optional[int] = DEFAULT_BLOCK   # vocabulary block of the chunked cross entropy; None: full logits
    pixel_mean: tuple[float, ...] = PIXEL_NORM_U8[0]   # on uint8 pixels
    pixel_std: tuple[float, ...] = PIXEL_NORM_U8[1]


def init_state(params, tx: optax.GradientTransformation, seed: int = 0) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=jax.random.key_data(jax.random.key(seed)))


def _micro_batches(inputs: TrainInputs, accum: int) -> TrainInputs:
    """[B, ...] -> [A, B/A, ...] with micro-batch a = rows a, a+A, ... (plan.branch is shared)."""
    def split(x):
        return x.reshape(x.shape[0] // accum, accum, *x.shape[1:]).swapaxes(0, 1)
    branch = inputs.plan.branch                           # [W]: no batch axis
    out = jax.tree.map(split, inputs.replace(plan=inputs.plan.replace(branch=None)))
    return out.replace(plan=out.plan.replace(branch=jnp.broadcast_to(branch, (accum, *branch.shape))))


def make_step(cfg: VideoXLConfig, tx: optax.GradientTransformation, trainable, settings: StepSettings,
              schedule: Optional[optax.Schedule] = None, return_grads: bool = False) -> Callable:
    """Returns step(state, inputs, spec) -> (state, metrics), not yet jitted (see `jit_step`).

    With `return_grads`, metrics["grads"] holds the (mean, unclipped) gradients, for tests.
    """
    dtype = DTYPES[settings.dtype]
    # numpy, not device arrays: building a step creates none (it may be compiled for a topology with no device)
    norm = (np.asarray(settings.pixel_mean, np.float32), np.asarray(settings.pixel_std, np.float32))

    def terms(params, inputs: TrainInputs, spec: PrefillSpec):
        params = jax.tree.map(lambda p, t: p if t else jax.lax.stop_gradient(p), params, trainable)
        out = loss_terms(params, cfg, inputs, spec=spec, pixel_norm=norm, dtype=dtype,
                         remat=settings.remat_layer, remat_window=settings.remat_window,
                         loss_chunk=settings.loss_chunk)
        return out.ce_sum, out.count

    grad_fn = jax.value_and_grad(terms, has_aux=True)

    def step(state: TrainState, inputs: TrainInputs, spec: PrefillSpec, fault: Optional[jax.Array] = None):
        """fault: None, or a float32 scalar that scales the loss and gradients by (1 + fault): NaN injects a
        non-finite step (fault injection, `debug_nan_steps`), 0 changes nothing."""
        accum = settings.accum_steps
        if accum == 1:
            (ce_sum, count), grads = grad_fn(state.params, inputs, spec)
        else:
            micro = _micro_batches(inputs, accum)
            zeros = jax.tree.map(jnp.zeros_like, state.params)

            def body(carry, mb):
                g_sum, ce, n = carry
                (c, k), g = grad_fn(state.params, mb, spec)
                return (jax.tree.map(jnp.add, g_sum, g), ce + c, n + k), None

            (grads, ce_sum, count), _ = jax.lax.scan(
                body, (zeros, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32)), micro)
        if fault is not None:
            ce_sum = ce_sum * (1 + fault)
            grads = jax.tree.map(lambda g: g * (1 + fault).astype(g.dtype), grads)
        denom = jnp.maximum(count, 1).astype(jnp.float32)
        grads = jax.tree.map(lambda g: g / denom, grads)
        grads = jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, trainable)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        loss, grad_norm = ce_sum / denom, optim.global_norm(grads)
        # A non-finite loss or gradient norm skips the update: parameters and optimizer state stay as they were
        # (the step counter and the data move on; the loop counts and stops after max_bad_steps in a row).
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
        rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
        metrics = {"loss": loss, "grad_norm": grad_norm, "target_tokens": count,
                   "skipped": (~finite).astype(jnp.int32)}
        if schedule is not None:
            metrics["lr"] = schedule(state.step)
        if return_grads:
            metrics["grads"] = grads
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=rng), metrics

    return step


def jit_step(step: Callable, state_shardings=None) -> Callable:
    """The compiled step; `spec` is static (one compilation per size bucket), the state is donated."""
    kwargs = {} if state_shardings is None else {"out_shardings": (state_shardings, None)}
    return jax.jit(step, static_argnames=("spec",), donate_argnums=(0,), **kwargs)
