"""The programs `vxl aot` compiles, built from abstract inputs on a mesh of any devices (no arrays).

Each builder returns a `Program`: a thunk that builds it (call it inside `jax.set_mesh(mesh)`), the
analytic FLOPs of its work, and the facts of its shapes. Inputs are synthetic but shaped as the CLI's:

  prefill  `compress.prefill.prefill` (what `vxl infer` runs): per row a 14-token prefix, F uint8 frames
           streamed window by window (CLIP inside the scan), a 16-token suffix, one fixed ratio, room
           for 16 new tokens.
  decode   `generate.generate`: 16 greedy tokens after the memory that prefill leaves at F frames.
  train    one optimizer step of `train.step.make_step` (AdamW, every parameter trainable; float32
           state): per row a 14-token prefix, F frames, a 32-token suffix with 16 labelled tokens.

Rows split over the mesh's (data, fsdp) axes, parameters and optimizer state as `parallel.RULES` says.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from vxl_jax import parallel
from vxl_jax.aot import JOBS  # noqa: F401 - re-exported
from vxl_jax.aot import flops as flops_lib
from vxl_jax.compress import packing
from vxl_jax.compress.memory import Memory
from vxl_jax.compress.plan import make_plan, num_windows
from vxl_jax.config import VideoXLConfig
from vxl_jax.model import qwen2

PREFIX, SUFFIX, NEW_TOKENS = 14, 16, 16          # prefill / decode prompt layout (as benchmarks/prefill_bench.py)
TRAIN_PREFIX, TRAIN_SUFFIX, TRAIN_LABELLED = 14, 32, 16
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class Program:
    job: str
    make: Callable[[], tuple]         # -> (jitted function, args, kwargs): abstract inputs; call inside jax.set_mesh
    flops: float                      # analytic model FLOPs of one call (all devices together)
    facts: dict                       # shapes: windows, KV entries, buffer size, ...


def _replicated(mesh, shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, P()))


def abstract_params(cfg: VideoXLConfig, mesh, dtype=jnp.float32):
    """The parameters as `ShapeDtypeStruct`s sharded by `parallel.RULES` on `mesh`."""
    from vxl_jax.model import videoxl

    shapes = jax.eval_shape(lambda: videoxl.init_params(cfg, jax.random.key(0), dtype))
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), shapes,
                        parallel.param_shardings(shapes, mesh))


def abstract_plan(arrays: packing.PlanArrays, mesh) -> packing.PlanArrays:
    """Plan arrays' abstract twins: rows over (data, fsdp), the per-window branch [W] replicated."""
    rows = parallel.host_to_global(arrays.replace(branch=None), mesh, abstract=True)
    return rows.replace(branch=parallel.host_to_global(arrays.branch, mesh, replicated=True, abstract=True))


def _prompt_plans(cfg: VideoXLConfig, frames: int, ratio: int, rows: int):
    window, per_frame = cfg.vst.window, cfg.tokens_per_frame
    if window % per_frame:
        raise ValueError(f"streaming frames needs whole frames per window: {window} tokens, {per_frame} per frame")
    visual = frames * per_frame
    plan = make_plan(PREFIX, visual, SUFFIX, [ratio] * num_windows(visual, window), window=window)
    rng = np.random.default_rng(0)
    vocab = min(cfg.llm.vocab_size, 1000)
    prefixes = [rng.integers(11, vocab, PREFIX) for _ in range(rows)]
    suffixes = [rng.integers(11, vocab, SUFFIX) for _ in range(rows)]
    arrays, spec = packing.pack([plan] * rows, prefixes, suffixes, max_new_tokens=NEW_TOKENS)
    return plan, arrays, spec


def _kv_bytes(cfg: VideoXLConfig, entries: int, rows: int, dtype) -> int:
    llm = cfg.llm
    return 2 * llm.num_layers * rows * entries * llm.num_kv_heads * llm.head_dim * jnp.dtype(dtype).itemsize


def prefill(cfg: VideoXLConfig, mesh, *, frames: int, ratio: int, rows: int = 1, dtype: str = "bfloat16") -> Program:
    from vxl_jax.compress import prefill as prefill_lib

    dt = DTYPES[dtype]
    plan, arrays, spec = _prompt_plans(cfg, frames, ratio, rows)
    padded = arrays.num_windows * cfg.vst.window // cfg.tokens_per_frame
    size, channels = cfg.vision.image_size, cfg.vision.num_channels
    visual = parallel.host_to_global(np.zeros((rows, 0), np.uint8), mesh, abstract=True)     # its sharding
    visual = jax.ShapeDtypeStruct((rows, padded, channels, size, size), jnp.uint8, sharding=visual.sharding)
    norm = (_replicated(mesh, (channels,), jnp.float32),) * 2

    def make():
        return (prefill_lib.prefill_jit, (abstract_params(cfg, mesh, dt), cfg, abstract_plan(arrays, mesh), visual),
                dict(spec=spec, pixel_norm=norm, dtype=dt))

    facts = dict(windows=len(plan.windows), windows_padded=arrays.num_windows, frames_padded=padded,
                 kv_entries=plan.memory_after_prefill, buffer_entries=spec.buffer_size,
                 kv_kept_bytes=_kv_bytes(cfg, plan.memory_after_prefill, rows, dt),
                 kv_buffer_bytes=_kv_bytes(cfg, spec.buffer_size, rows, dt),
                 frames_bytes=rows * padded * channels * size * size)
    work = rows * (flops_lib.prefill(cfg, plan) + frames * flops_lib.vision_per_frame(cfg)
                   + flops_lib.logits(cfg, 1))
    return Program("prefill", make, work, facts)


def decode(cfg: VideoXLConfig, mesh, *, frames: int, ratio: int, rows: int = 1, dtype: str = "bfloat16") -> Program:
    from vxl_jax.compress.prefill import CACHE_AXES
    from vxl_jax.generate import generate_jit

    dt = DTYPES[dtype]
    plan, _, spec = _prompt_plans(cfg, frames, ratio, rows)
    llm = cfg.llm
    shape = (llm.num_layers, rows, spec.buffer_size, llm.num_kv_heads, llm.head_dim)
    cache_sharding = NamedSharding(mesh, parallel.spec_for(CACHE_AXES, shape, dict(mesh.shape)))
    row_sharding = lambda *tail: parallel.host_to_global(np.zeros((rows, *tail), np.int8), mesh,
                                                         abstract=True).sharding
    kv = jax.ShapeDtypeStruct(shape, dt, sharding=cache_sharding)
    memory = Memory(qwen2.KVCache(kv, kv), jax.ShapeDtypeStruct((rows,), jnp.int32, sharding=row_sharding()))
    last_logits = jax.ShapeDtypeStruct((rows, llm.vocab_size), jnp.float32, sharding=row_sharding(1))
    key = jax.eval_shape(lambda: jax.random.key(0))
    key = jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=NamedSharding(mesh, P()))

    def make():
        return (generate_jit, (abstract_params(cfg, mesh, dt), cfg, memory, last_logits, key),
                dict(max_new_tokens=NEW_TOKENS, dtype=dt))

    facts = dict(windows=len(plan.windows), kv_entries=plan.memory_after_prefill, buffer_entries=spec.buffer_size,
                 kv_kept_bytes=_kv_bytes(cfg, plan.memory_after_prefill, rows, dt),
                 kv_buffer_bytes=_kv_bytes(cfg, spec.buffer_size, rows, dt), new_tokens=NEW_TOKENS)
    return Program("decode", make, flops_lib.decode(cfg, plan.memory_after_prefill, NEW_TOKENS, rows), facts)


def synthetic_batch(cfg: VideoXLConfig, frames: int, rows: int, ratio: int, seed: int = 0) -> dict:
    """A loader-shaped training batch (`data.loader.collate`'s keys) of random ids and uint8 frames."""
    rng = np.random.default_rng(seed)
    t = TRAIN_PREFIX + 1 + TRAIN_SUFFIX
    ids = rng.integers(0, min(cfg.llm.vocab_size, 30000), (rows, t)).astype(np.int32)
    ids[:, TRAIN_PREFIX] = -200
    labels = np.full_like(ids, -100)
    labels[:, -TRAIN_LABELLED:] = ids[:, -TRAIN_LABELLED:]
    per_window = cfg.vst.window // cfg.tokens_per_frame
    windows = -(-frames // per_window)
    size = cfg.vision.image_size
    return {"input_ids": ids, "labels": labels, "text_mask": np.ones_like(ids, bool),
            "frames": rng.integers(0, 256, (rows, windows * per_window, 3, size, size), dtype=np.uint8),
            "num_frames": np.full(rows, frames, np.int32), "ratios": np.full((rows, windows), ratio, np.int32)}


def abstract_train_step(cfg: VideoXLConfig, mesh, settings):
    """(the jitted step, the train state as sharded `ShapeDtypeStruct`s): AdamW over every parameter, float32
    state sharded by `parallel.RULES` on `mesh` (call inside `jax.set_mesh(mesh)`)."""
    from vxl_jax.model import videoxl
    from vxl_jax.train import optim, step as step_lib

    params = jax.eval_shape(lambda: videoxl.init_params(cfg, jax.random.key(0)))
    ocfg = optim.OptimConfig(learning_rate=1e-5)
    tx = optim.build(ocfg, params, 100)
    step = step_lib.make_step(cfg, tx, optim.trainable_mask(ocfg, params), settings)
    abstract = jax.eval_shape(lambda p: step_lib.init_state(p, tx), params)
    shardings = parallel.tree_shardings(abstract, mesh)
    state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)
    return step_lib.jit_step(step, shardings), state


def train(cfg: VideoXLConfig, mesh, *, frames: int, ratio: int, rows: int = 1, dtype: str = "bfloat16",
          settings: Optional[dict] = None) -> Program:
    from vxl_jax.train import batch as batch_lib, step as step_lib

    settings = step_lib.StepSettings(**{"dtype": dtype, **(settings or {})})
    batch = synthetic_batch(cfg, frames, rows, ratio)
    prepared = batch_lib.prepare(batch, cfg, (ratio,))

    def make():
        jitted, state = abstract_train_step(cfg, mesh, settings)
        return jitted, (state, batch_lib.to_global(prepared.inputs, mesh, abstract=True)), dict(spec=prepared.spec)

    visual = frames * cfg.tokens_per_frame
    plan = make_plan(TRAIN_PREFIX, visual, TRAIN_SUFFIX, [ratio] * num_windows(visual, cfg.vst.window),
                     window=cfg.vst.window)
    facts = dict(windows=len(plan.windows), windows_padded=prepared.inputs.plan.num_windows,
                 kv_entries=plan.memory_after_prefill, buffer_entries=prepared.spec.buffer_size,
                 kv_kept_bytes=_kv_bytes(cfg, plan.memory_after_prefill, rows, DTYPES[settings.dtype]),
                 text_tokens=TRAIN_PREFIX + 1 + TRAIN_SUFFIX, targets=prepared.targets,
                 step_settings=dataclasses.asdict(settings))
    work = flops_lib.train_step(cfg, [plan] * rows, frames, TRAIN_PREFIX + TRAIN_SUFFIX)
    return Program("train", make, work, facts)


BUILDERS = {"prefill": prefill, "decode": decode, "train": train}
