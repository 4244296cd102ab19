"""Run in a subprocess with 8 simulated CPU devices (tests/test_sharding.py): sharded step == unsharded step.

Builds one batch of 4 rows of the tiny_112 model (three videos of different
lengths and one text-only row), runs the train step once without a mesh on
one device and once on a (data 2, fsdp 2, tensor 2) mesh, and compares the
loss, the gradient norm and every updated parameter; also reports the
per-device shard shapes. Prints one JSON line.
"""

import json
import sys

import jax

jax.config.update("jax_default_matmul_precision", "highest")

import numpy as np  # noqa: E402

from vxl_jax import parallel  # noqa: E402
from vxl_jax.config import VideoXLConfig  # noqa: E402
from vxl_jax.model import videoxl  # noqa: E402
from vxl_jax.train import batch as batch_lib, optim, step as step_lib  # noqa: E402


def make_batch(cfg: VideoXLConfig, rows: int = 4, text: int = 64, frames: int = 8, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    size = cfg.vision.image_size
    ids = np.zeros((rows, text), np.int32)
    labels = np.full((rows, text), -100, np.int32)
    mask = np.zeros((rows, text), bool)
    num_frames = np.array([8, 5, 0, 3][:rows], np.int32)
    for b in range(rows):
        n = int(rng.integers(30, text))
        ids[b, :n] = rng.integers(0, 500, n)
        if num_frames[b]:
            ids[b, 6] = -200
        labels[b, n - 8:n] = ids[b, n - 8:n]
        labels[b, 2:4] = ids[b, 2:4]          # a few labels inside the prefix too
        mask[b, :n] = True
    windows = frames * cfg.tokens_per_frame // cfg.vst.window
    ratios = np.zeros((rows, windows), np.int32)
    for b in range(rows):
        used = -(-int(num_frames[b]) * cfg.tokens_per_frame // cfg.vst.window)
        ratios[b, :used] = [4, 2][:used]
    return {"input_ids": ids, "labels": labels, "text_mask": mask,
            "frames": rng.integers(0, 256, (rows, frames, 3, size, size), dtype=np.uint8),
            "num_frames": num_frames, "ratios": ratios}


def main(mesh_shape: tuple[int, int, int], accum: int) -> dict:
    cfg = VideoXLConfig.load("tiny_112")
    params = jax.jit(lambda: videoxl.init_params(cfg, jax.random.key(0)))()
    host_params = jax.tree.map(np.asarray, params)
    ocfg = optim.OptimConfig(learning_rate=1e-3, groups=(optim.ParamGroup("^vision/layers", lr_scale=0.5),))
    prepared = batch_lib.prepare(make_batch(cfg), cfg, (2, 4))
    results = {}
    for name in ("unsharded", "sharded"):
        tx = optim.build(ocfg, host_params, 10)
        settings = step_lib.StepSettings(accum_steps=accum)
        step = step_lib.make_step(cfg, tx, optim.trainable_mask(ocfg, host_params), settings, return_grads=True)
        if name == "unsharded":
            one = jax.devices()[0]
            state = step_lib.init_state(jax.device_put(host_params, one), tx)
            new, out = step_lib.jit_step(step)(state, jax.device_put(prepared.inputs, one), spec=prepared.spec)
        else:
            mesh = parallel.make_mesh(parallel.MeshConfig(*mesh_shape))
            with jax.set_mesh(mesh):
                sharded = jax.device_put(host_params, parallel.param_shardings(host_params, mesh))
                init = lambda p: step_lib.init_state(p, tx)
                shardings = parallel.tree_shardings(jax.eval_shape(init, sharded), mesh)
                state = jax.jit(init, out_shardings=shardings)(sharded)
                inputs = batch_lib.to_global(prepared.inputs, mesh)
                new, out = step_lib.jit_step(step, shardings)(state, inputs, spec=prepared.spec)
            q = new.params["llm"]["layers"]["q_proj"]["kernel"]
            mu = new.opt_state[1].inner_states["g1"].inner_state[0].mu["llm"]["layers"]["q_proj"]["kernel"]
            results["shards"] = {
                "q_proj": [list(q.shape), list(q.addressable_shards[0].data.shape), len(q.sharding.device_set)],
                "q_proj_adam_mu": [list(mu.shape), list(mu.addressable_shards[0].data.shape)],
                "embed_tokens": list(new.params["llm"]["embed_tokens"].addressable_shards[0].data.shape),
                "mlp_down": list(new.params["llm"]["layers"]["mlp"]["down_proj"]["kernel"]
                                 .addressable_shards[0].data.shape),
                "inputs_frames": list(inputs.visual.addressable_shards[0].data.shape),
            }
        results[name] = (float(out["loss"]), float(out["grad_norm"]), jax.tree.map(np.asarray, new.params),
                         jax.tree.map(np.asarray, out["grads"]))
    (l0, g0, p0, d0), (l1, g1, p1, d1) = results["unsharded"], results["sharded"]
    grad_diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), d0, d1))
    diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), p0, p1))
    # Adam's first step moves a parameter by about lr * sign(g): where g is within its rounding noise of zero the
    # two runs may step opposite ways. Where the sign is sure (|g| far above eps and above 10x the two runs'
    # difference) the updates must agree to rounding.
    sure = lambda g, h: (np.abs(g) > 1e-6) & (np.abs(g) > 10 * np.abs(g - h))
    sure_diffs = jax.tree.leaves(jax.tree.map(
        lambda a, b, g, h: float(np.where(sure(g, h), np.abs(a - b), 0).max()), p0, p1, d0, d1))
    unsure = sum(jax.tree.leaves(jax.tree.map(lambda g, h: int((~sure(g, h)).sum()), d0, d1)))
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.abs(a - b).max()), p0, host_params))
    return {"loss": [l0, l1], "grad_norm": [g0, g1], "param_max_diff": max(diffs), "grad_max_diff": max(grad_diffs),
            "param_max_diff_sure_sign": max(sure_diffs), "unsure_sign_entries": unsure,
            "learning_rate": ocfg.learning_rate, "num_param_entries": sum(x.size for x in jax.tree.leaves(p0)),
            "params_moved": sum(m > 0 for m in moved), "num_params": len(moved), "shards": results["shards"],
            "devices": jax.device_count(), "targets": prepared.targets}


if __name__ == "__main__":
    shape = tuple(int(x) for x in sys.argv[1].split(","))
    print(json.dumps(main(shape, int(sys.argv[2]))))
