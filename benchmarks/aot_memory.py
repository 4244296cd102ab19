"""Ahead-of-time memory estimate: the compressed prefill and a train step, from XLA's compile alone.

Nothing is run (unless `--execute`): each point is `jax.jit(fn).lower(args).compile()`
with the parameters (and the train state) as `jax.ShapeDtypeStruct`s, then
`compiled.memory_analysis()` gives the bytes of the arguments, the outputs, the
temporaries (everything XLA's buffer assignment allocates inside the program,
loops included), the generated code and the donated bytes aliased with outputs.

  prefill   `compress.prefill.prefill` (jitted as `prefill_jit`: cfg, spec, dtype,
            remat, remat_window static) on one row: a 14-token prefix, F uint8 frames
            streamed window by window (CLIP inside the scan), a 16-token suffix,
            one fixed ratio, a buffer with room for 16 new tokens. The frames
            argument is [1, F_padded, 3, S, S] uint8, F padded to the packed window
            count (`packing.pack`'s bucket) times the frames per window.
  train     one optimizer step of `train.step.make_step` + `jit_step` (AdamW, all
            parameters trainable, as benchmarks/train_bench.py builds it): the state
            (float32 params + Adam moments) abstract, batch 1 from
            `aot.programs.synthetic_batch` / `train.batch.prepare` (14-token prefix, 32-token
            suffix; `--train-text-tokens N`: an N-token suffix, all but its first token
            labelled); one row per `--train-loss-chunk` (the cross entropy's vocabulary
            block, "none": full logits).
  loss      the cross entropy alone through the LM head, forward + backward (d hidden,
            d head), hidden [1, T, D] float32 at the train config's width and vocabulary:
            the full logits path (`qwen2.logits` + `loss.cross_entropy`) against
            `train.chunked_ce` at each `--loss-chunks` block.

On a CPU, estimate in float32 (the default `--dtype`): XLA's CPU backend upcasts
bfloat16 matmuls, so a bfloat16 compile there measures neither the CPU nor a GPU.
The bfloat16 figure printed next to it is an extrapolation: every float figure
halved; the uint8 frames argument does not halve and is reported on its own.
CPU caveats: the CPU program runs CLIP 2 frames at a time and the CPU's default
attention (the fused kernels of `vxl_jax/kernels/` where they build: their few MB
of scratch are invisible to XLA; the README's table was computed before them,
with the blocked "xla" attention); on a GPU CLIP takes a window's frames at once
and the attention is cuDNN's, so temporaries differ. On a GPU, pass `--dtype bfloat16`: the figures
are then the device's own, nothing is extrapolated, and `--execute` also runs
the compiled prefill once (random weights and frames) to see whether it really
fits (it OOMs at allocation, right at the start, if it does not).

    python benchmarks/aot_memory.py                                  # videoxl_7b: 2048 10000 30000 frames + train at 128
    python benchmarks/aot_memory.py --config bench_small --frames 40 80 --train-config bench_small --train-frames 10
    python benchmarks/aot_memory.py --dtype bfloat16 --frames 20000 --skip-train --execute --out gpu/fit_20000   # on a GPU
    python benchmarks/aot_memory.py --skip-prefill --train-loss-chunk none 8192 --loss-tokens 4096   # chunked CE vs full

Exit status: 0, or 2 when an `--execute` run ran out of device memory.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

PREFIX, SUFFIX, NEW_TOKENS = 14, 16, 16     # prompt layout of prefill_bench
GIB = 2 ** 30
FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
          "generated_code_size_in_bytes", "alias_size_in_bytes")


def _memory(compiled) -> dict:
    stats = compiled.memory_analysis()
    if stats is None:
        raise RuntimeError(f"{compiled} has no memory analysis on this backend")
    return {f.removesuffix("_size_in_bytes") + "_bytes": int(getattr(stats, f, 0) or 0) for f in FIELDS}


def _device_limit() -> int | None:
    import jax
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def prefill_point(cfg_name: str, frames: int, ratio: int, dtype_name: str, budget_bytes: float) -> tuple[dict, tuple]:
    """Compiles the streamed-frames prefill at `frames`; returns (row, (compiled, cfg, arrays, visual, norm, dtype))."""
    import jax
    import jax.numpy as jnp

    from vxl_jax.compress import packing
    from vxl_jax.compress import prefill as prefill_lib
    from vxl_jax.compress.plan import make_plan, num_windows
    from vxl_jax.config import VideoXLConfig
    from vxl_jax.conversion.checkpoint import PIXEL_NORM_U8
    from vxl_jax.model import videoxl

    cfg = VideoXLConfig.load(cfg_name)
    dtype = jnp.dtype(dtype_name)
    window, per_frame, llm = cfg.vst.window, cfg.tokens_per_frame, cfg.llm
    if window % per_frame:
        raise ValueError(f"streaming frames needs whole frames per window: {window} tokens, {per_frame} per frame")
    num_visual = frames * per_frame
    windows = num_windows(num_visual, window)
    plan = make_plan(PREFIX, num_visual, SUFFIX, [ratio] * windows, window=window)
    rng = np.random.default_rng(0)
    vocab = min(llm.vocab_size, 1000)
    prefix_ids, suffix_ids = rng.integers(11, vocab, PREFIX), rng.integers(11, vocab, SUFFIX)
    arrays, spec = packing.pack([plan], [prefix_ids], [suffix_ids], max_new_tokens=NEW_TOKENS)
    padded = arrays.num_windows * window // per_frame
    size = cfg.vision.image_size
    visual = jax.ShapeDtypeStruct((1, padded, cfg.vision.num_channels, size, size), jnp.uint8)
    params = jax.eval_shape(lambda: videoxl.init_params(cfg, jax.random.key(0), dtype))
    norm = tuple(jnp.asarray(x, jnp.float32) for x in PIXEL_NORM_U8)

    t0 = time.perf_counter()
    compiled = prefill_lib.prefill_jit.lower(params, cfg, arrays, visual, spec=spec, pixel_norm=norm,
                                             dtype=dtype).compile()
    compile_s = time.perf_counter() - t0
    mem = _memory(compiled)

    kv_elements = 2 * llm.num_layers * 1 * spec.buffer_size * llm.num_kv_heads * llm.head_dim
    frames_bytes = int(np.prod(visual.shape))                              # uint8: one byte each
    measured = mem["argument_bytes"] + mem["output_bytes"] + mem["temp_bytes"] - mem["alias_bytes"]
    halve = dtype == jnp.float32                   # a float32 compile (the CPU estimate) -> extrapolate to bfloat16
    bf16_total = frames_bytes + (measured - frames_bytes) / 2 if halve else measured
    row = dict(kind="prefill", config=cfg_name, dtype=dtype_name, frames=frames, ratio=ratio,
               windows=windows, windows_padded=arrays.num_windows, frames_padded=padded,
               kv_entries=plan.memory_after_prefill, buffer_entries=spec.buffer_size,
               kv_buffer_bytes_float32=kv_elements * 4, kv_buffer_bytes_bfloat16=kv_elements * 2,
               kv_kept_bytes_bfloat16=2 * llm.num_layers * plan.memory_after_prefill * llm.num_kv_heads
               * llm.head_dim * 2,
               frames_bytes=frames_bytes, **mem, total_bytes=measured,
               bf16_total_bytes=bf16_total, bf16_extrapolated=bool(halve),
               budget_bytes=budget_bytes, fits=bool(bf16_total <= budget_bytes),
               compile_s=compile_s, backend=jax.default_backend(), device=jax.devices()[0].device_kind)
    limit = _device_limit()
    if limit:
        row["device_limit_bytes"] = limit
        row["fits_device"] = bool(measured <= limit)
    return row, (compiled, cfg, arrays, visual, norm, dtype)


def execute(compiled, cfg, arrays, visual, norm, dtype, budget_s: float) -> dict:
    """Runs the compiled prefill once on random weights and frames; status ok / oom / running (past budget_s)."""
    import jax
    import jax.numpy as jnp

    from vxl_jax.model import videoxl

    def is_oom(err: Exception) -> bool:
        text = str(err)
        return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()

    def synthetic(shape):
        # Index hash as pixel values: elementwise from iotas, so no temporaries the size of the video.
        idx = [jax.lax.broadcasted_iota(jnp.uint32, shape, d) for d in range(len(shape))]
        h = idx[1] * jnp.uint32(2654435761) + idx[2] * jnp.uint32(40503) + idx[3] * jnp.uint32(97) + idx[4]
        return (h * jnp.uint32(2246822519) >> 24).astype(jnp.uint8)

    dev = jax.devices()[0]
    try:
        params = jax.jit(videoxl.init_params, static_argnums=(0, 2))(cfg, jax.random.key(0), dtype)
        frames = jax.jit(synthetic, static_argnums=0)(visual.shape)
        plan = jax.device_put(arrays)
        jax.block_until_ready((params, frames, plan))
    except Exception as err:       # noqa: BLE001 - report, do not crash the sweep
        return {"status": "oom" if is_oom(err) else "error", "stage": "inputs", "error": str(err)[-800:]}
    base = (dev.memory_stats() or {}).get("bytes_in_use")
    print("  executing" + (f" (inputs on the device: {_g(base)})" if base is not None else "") + " ...", flush=True)
    t0 = time.perf_counter()
    try:
        result = compiled(params, plan, frames, pixel_norm=norm)
        leaves = jax.tree.leaves(result)
        while not all(x.is_ready() for x in leaves):
            if time.perf_counter() - t0 > budget_s:
                stats = dev.memory_stats() or {}
                return {"status": "running", "seconds": time.perf_counter() - t0,
                        "bytes_in_use": stats.get("bytes_in_use"), "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
                        "note": f"still running after {budget_s:g} s, not waited for (XLA allocates a GPU program's "
                                "buffers at launch, so no OOM by then means it fits)"}
            time.sleep(0.2)
        jax.block_until_ready(result)
    except Exception as err:       # noqa: BLE001
        return {"status": "oom" if is_oom(err) else "error", "stage": "prefill", "error": str(err)[-800:],
                "seconds": time.perf_counter() - t0}
    stats = dev.memory_stats() or {}
    return {"status": "ok", "seconds": time.perf_counter() - t0, "peak_bytes_in_use": stats.get("peak_bytes_in_use"),
            "kv_length": int(np.asarray(result.memory.length)[0])}


def _text_batch(cfg, frames: int, ratio: int, text_tokens) -> dict:
    """aot.programs.synthetic_batch's row, with an N-token suffix after the video when text_tokens is set."""
    from vxl_jax.aot.programs import synthetic_batch

    batch = synthetic_batch(cfg, frames, 1, ratio)
    if text_tokens is None:
        return batch
    head = batch["input_ids"][:, :PREFIX + 1]                                   # the prefix and <image>
    text = np.random.default_rng(1).integers(0, min(cfg.llm.vocab_size, 30000), (1, text_tokens)).astype(np.int32)
    ids = np.concatenate([head, text], axis=1)
    labels = np.full_like(ids, -100)
    labels[:, PREFIX + 2:] = ids[:, PREFIX + 2:]             # the token right after <image> is never a target
    return dict(batch, input_ids=ids, labels=labels, text_mask=np.ones_like(ids, bool))


def train_point(cfg_name: str, frames: int, ratio: int, settings_kw: dict, text_tokens=None) -> dict:
    """Compiles one train step (batch 1) with the state abstract; returns its row."""
    import jax
    import jax.numpy as jnp

    from vxl_jax import parallel
    from vxl_jax.aot.programs import abstract_train_step
    from vxl_jax.config import VideoXLConfig
    from vxl_jax.train import batch as batch_lib, step as step_lib

    cfg = VideoXLConfig.load(cfg_name)
    settings = step_lib.StepSettings(**settings_kw)
    mesh = parallel.make_mesh(parallel.MeshConfig(data=1, fsdp=-1), devices=jax.devices()[:1])   # batch 1: one row
    with jax.set_mesh(mesh):
        jitted, state = abstract_train_step(cfg, mesh, settings)
        prepared = batch_lib.prepare(_text_batch(cfg, frames, ratio, text_tokens), cfg, (ratio,))
        inputs = batch_lib.to_global(prepared.inputs, mesh)
        t0 = time.perf_counter()
        compiled = jitted.lower(state, inputs, spec=prepared.spec).compile()
        compile_s = time.perf_counter() - t0
    mem = _memory(compiled)
    state_bytes = sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(state))
    param_bytes = sum(int(np.prod(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(state.params))
    measured = mem["argument_bytes"] + mem["output_bytes"] + mem["temp_bytes"] - mem["alias_bytes"]
    row = dict(kind="train", config=cfg_name, frames=frames, ratio=ratio, batch=1,
               text_tokens=int(prepared.inputs.suffix_targets.shape[1]), targets=prepared.targets,
               windows=prepared.inputs.plan.num_windows, buffer_entries=prepared.spec.buffer_size,
               frames_bytes=int(np.asarray(prepared.inputs.visual).nbytes), state_bytes=state_bytes,
               param_bytes=param_bytes, **settings_kw, **mem, total_bytes=measured, compile_s=compile_s,
               backend=jax.default_backend(), device=jax.devices()[0].device_kind)
    if settings.dtype == "float32":
        # The state stays float32 whatever the compute dtype; only the temporaries would roughly halve
        # (less: bfloat16 compute adds bfloat16 copies of the weights).
        row["bf16_compute_total_bytes_rough"] = measured - mem["temp_bytes"] / 2
    return row


def loss_point(cfg_name: str, tokens: int, chunk) -> dict:
    """Compiles the LM-head cross entropy's forward + backward (d hidden, d head) alone; returns its row."""
    import jax
    import jax.numpy as jnp

    from vxl_jax.config import VideoXLConfig
    from vxl_jax.model import qwen2
    from vxl_jax.train.chunked_ce import block_size, lm_head_cross_entropy
    from vxl_jax.train.loss import cross_entropy

    llm = VideoXLConfig.load(cfg_name).llm
    vocab, width = llm.vocab_size, llm.hidden_size
    head = "embed_tokens" if llm.tie_word_embeddings else "lm_head"
    params = {head: jax.ShapeDtypeStruct((vocab, width) if llm.tie_word_embeddings else (width, vocab), jnp.float32)}
    hidden = jax.ShapeDtypeStruct((1, tokens, width), jnp.float32)
    targets = jax.ShapeDtypeStruct((1, tokens), jnp.int32)
    if chunk is None:
        loss = lambda p, h, t: cross_entropy(qwen2.logits(p, llm, h), t)[0]
    else:
        loss = lambda p, h, t: lm_head_cross_entropy(p, llm, h, t, block=chunk)[0]
    t0 = time.perf_counter()
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, hidden, targets).compile()
    compile_s = time.perf_counter() - t0
    mem = _memory(compiled)
    return dict(kind="loss", config=cfg_name, tokens=tokens, width=width, vocab=vocab, loss_chunk=chunk,
                block=None if chunk is None else block_size(vocab, chunk), logits_bytes=tokens * vocab * 4, **mem,
                compile_s=compile_s, backend=jax.default_backend(), device=jax.devices()[0].device_kind)


def _chunk(text: str):
    """A --*-loss-chunk(s) value: an int, or none (the full logits)."""
    return None if text.lower() in ("none", "null", "full") else int(text)


def _g(n) -> str:
    """Bytes as GiB, or MiB under 1 GiB."""
    if n is None:
        return "-"
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / 2**20:.1f} MiB"


def prefill_line(r: dict) -> str:
    ex = " (extrapolated: float bytes halved)" if r["bf16_extrapolated"] else ""
    return (f"prefill {r['config']} {r['frames']} frames r{r['ratio']} [{r['dtype']}]: {r['windows']} windows "
            f"(padded {r['windows_padded']}, {r['frames_padded']} frames) | KV kept {r['kv_entries']} entries/layer, "
            f"buffer {r['buffer_entries']}: {_g(r['kv_buffer_bytes_float32'])} f32 / "
            f"{_g(r['kv_buffer_bytes_bfloat16'])} bf16 | args {_g(r['argument_bytes'])} "
            f"(uint8 frames {_g(r['frames_bytes'])}), out {_g(r['output_bytes'])}, temp {_g(r['temp_bytes'])}, "
            f"code {_g(r['generated_code_bytes'])} | bf16 total {_g(r['bf16_total_bytes'])}{ex} "
            f"-> fits {r['budget_bytes'] / 1e9:.0f} GB: {'yes' if r['fits'] else 'NO'} | compile {r['compile_s']:.1f} s")


def train_line(r: dict) -> str:
    rough = (f" | bf16-compute rough {_g(r['bf16_compute_total_bytes_rough'])}"
             if "bf16_compute_total_bytes_rough" in r else "")
    return (f"train {r['config']} {r['frames']} frames r{r['ratio']} batch 1 [{r['dtype']}, remat "
            f"{r['remat_layer']}/{r['remat_window']}, loss chunk {r.get('loss_chunk')}]: {r['windows']} windows, "
            f"{r.get('text_tokens')} text tokens "
            f"| state {_g(r['state_bytes'])} "
            f"(params {_g(r['param_bytes'])}) | args {_g(r['argument_bytes'])}, out {_g(r['output_bytes'])}, "
            f"aliased {_g(r['alias_bytes'])}, temp {_g(r['temp_bytes'])} | total {_g(r['total_bytes'])}"
            f"{rough} | compile {r['compile_s']:.1f} s")


def loss_line(r: dict) -> str:
    what = "full logits" if r["loss_chunk"] is None else f"chunked {r['loss_chunk']} (block {r['block']})"
    return (f"loss {r['config']} T={r['tokens']} D={r['width']} V={r['vocab']} [{what}] forward + backward: "
            f"args {_g(r['argument_bytes'])}, out {_g(r['output_bytes'])}, temp {_g(r['temp_bytes'])} "
            f"(the [T, V] float32 logits: {_g(r['logits_bytes'])}) | compile {r['compile_s']:.1f} s")


def _table(header: str, body: list[list]) -> str:
    """A markdown table from its header line ("| a | b |") and the cells of each row."""
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    lines += ["| " + " | ".join(str(c) for c in cells) + " |" for cells in body]
    return "\n".join(lines)


def markdown(rows: list[dict]) -> str:
    parts = []
    pre = [r for r in rows if r["kind"] == "prefill"]
    if pre:
        extrapolated = any(r["bf16_extrapolated"] for r in pre)
        budget = f"{pre[0]['budget_bytes'] / 1e9:.0f} GB"
        header = ("| config | dtype | frames | ratio | windows (padded) | KV entries/layer | KV buffer f32 | "
                  "KV buffer bf16 | arguments | of which uint8 frames | output | temp | "
                  f"bf16 total | fits {budget} | compile s |"
                  + (" device limit: fits |" if any("device_limit_bytes" in r for r in pre) else "")
                  + (" executed |" if any("execute" in r for r in pre) else ""))
        body = []
        for r in pre:
            cells = [r["config"], r["dtype"], r["frames"], r["ratio"], f"{r['windows']} ({r['windows_padded']})",
                     r["kv_entries"], _g(r["kv_buffer_bytes_float32"]), _g(r["kv_buffer_bytes_bfloat16"]),
                     _g(r["argument_bytes"]), _g(r["frames_bytes"]), _g(r["output_bytes"]), _g(r["temp_bytes"]),
                     _g(r["bf16_total_bytes"]), "yes" if r["fits"] else "no", f"{r['compile_s']:.1f}"]
            if any("device_limit_bytes" in x for x in pre):
                cells.append(f"{_g(r.get('device_limit_bytes'))}: {'yes' if r.get('fits_device') else 'no'}")
            if any("execute" in x for x in pre):
                ex = r.get("execute", {})
                cells.append(f"{ex.get('status', '-')}" + (f" {ex['seconds']:.1f} s" if "seconds" in ex else ""))
            body.append(cells)
        note = ("bf16 total = uint8 frames + (every other argument, output and temporary) / 2: the "
                "program was compiled in float32 on the CPU and halved." if extrapolated else
                "Figures are the compiled program's own (no extrapolation).")
        parts.append("Compressed prefill (frames streamed, one row):\n\n" + _table(header, body) + "\n\n" + note)
    tr = [r for r in rows if r["kind"] == "train"]
    if tr:
        header = ("| config | frames | text tokens | ratio | compute dtype | remat layer/window | loss chunk | state | "
                  "arguments | output | aliased | temp | total | compile s |")
        body = [[r["config"], r["frames"], r.get("text_tokens", "-"), r["ratio"], r["dtype"],
                 f"{r['remat_layer']}/{r['remat_window']}", r.get("loss_chunk") or "full", _g(r["state_bytes"]),
                 _g(r["argument_bytes"]), _g(r["output_bytes"]), _g(r["alias_bytes"]), _g(r["temp_bytes"]),
                 _g(r["total_bytes"]), f"{r['compile_s']:.1f}"] for r in tr]
        parts.append("Train step (AdamW, all parameters trainable, batch 1; state float32):\n\n" + _table(header, body)
                     + "\n\ntotal = arguments + outputs + temporaries - aliased (the donated state).")
    lo = [r for r in rows if r["kind"] == "loss"]
    if lo:
        header = ("| config | tokens | width | vocabulary | loss | arguments | output | temp | [T, V] logits f32 | "
                  "compile s |")
        body = [[r["config"], r["tokens"], r["width"], r["vocab"],
                 "full logits" if r["loss_chunk"] is None else f"chunked, block {r['block']}",
                 _g(r["argument_bytes"]), _g(r["output_bytes"]), _g(r["temp_bytes"]), _g(r["logits_bytes"]),
                 f"{r['compile_s']:.1f}"] for r in lo]
        parts.append("Cross entropy through the LM head alone, forward + backward (d hidden, d head), float32:\n\n"
                     + _table(header, body))
    return "\n\n".join(parts) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="videoxl_7b", help="prefill: model config name or path (default videoxl_7b)")
    p.add_argument("--frames", type=int, nargs="+", default=[2048, 10000, 30000],
                   help="prefill: frame counts (default 2048 10000 30000)")
    p.add_argument("--ratio", type=int, default=16, help="compression ratio of every window (default 16)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="prefill params + compute dtype; float32 (default, for a CPU: the bfloat16 figure is "
                        "extrapolated by halving) or bfloat16 (on a GPU: measured as is)")
    p.add_argument("--budget-gb", type=float, default=80.0, help="device memory the 'fits' column compares with, "
                   "in GB of 1e9 bytes (default 80)")
    p.add_argument("--execute", action="store_true",
                   help="after compiling, run each prefill point once on random weights/frames (a GPU fit probe)")
    p.add_argument("--execute-budget", type=float, default=60.0,
                   help="--execute: seconds to wait for the run; past that, a run still going has allocated "
                        "everything (XLA allocates at launch) and counts as fitting; the script then exits at "
                        "once, skipping any later point (default 60)")
    p.add_argument("--train-config", default="videoxl_7b", help="train: model config (default videoxl_7b)")
    p.add_argument("--train-frames", type=int, default=128, help="train: frames of the one row (default 128)")
    p.add_argument("--train-dtype", default=None, choices=["float32", "bfloat16"],
                   help="train: compute dtype (default StepSettings': float32; the state is float32 either way)")
    p.add_argument("--train-remat-layer", default=None, help="train: StepSettings.remat_layer (default none)")
    p.add_argument("--train-remat-window", default=None, help="train: StepSettings.remat_window (default none)")
    p.add_argument("--train-loss-chunk", type=_chunk, nargs="+", default=None, metavar="BLOCK|none",
                   help="train: StepSettings.loss_chunk, one train row per value (default StepSettings': the "
                        "chunked cross entropy); none: the full logits")
    p.add_argument("--train-text-tokens", type=int, default=None,
                   help="train: tokens of the text after the video (default train_bench's 32-token suffix)")
    p.add_argument("--loss-tokens", type=int, default=4096,
                   help="loss: tokens T of the cross-entropy-alone points (default 4096)")
    p.add_argument("--loss-chunks", type=_chunk, nargs="+", default=[None, 8192, 16384], metavar="BLOCK|none",
                   help="loss: vocabulary blocks to compare, none = the full logits (default none 8192 16384)")
    p.add_argument("--skip-prefill", action="store_true", help="no prefill points")
    p.add_argument("--skip-train", action="store_true", help="no train point")
    p.add_argument("--skip-loss", action="store_true", help="no cross-entropy-alone points")
    p.add_argument("--out", type=pathlib.Path, default=None,
                   help="folder for aot_memory.json and aot_memory.md (default: write nothing)")
    args = p.parse_args(argv)

    import jax
    from vxl_jax.train.step import StepSettings

    print(f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), jax {jax.__version__}", flush=True)
    if jax.default_backend() == "cpu" and args.dtype == "bfloat16":
        print("warning: a bfloat16 compile on the CPU upcasts matmuls; its temporaries say little about a GPU",
              flush=True)
    rows, status = [], 0

    def save():
        if args.out is not None and rows:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / "aot_memory.json").write_text(json.dumps(rows, indent=1) + "\n")
            (args.out / "aot_memory.md").write_text(markdown(rows))

    if not args.skip_prefill:
        for frames in args.frames:
            print(f"prefill {args.config} {frames} frames: compiling ...", flush=True)
            row, handles = prefill_point(args.config, frames, args.ratio, args.dtype, args.budget_gb * 1e9)
            print(prefill_line(row), flush=True)
            if args.execute:
                row["execute"] = {"status": "started"}     # what the JSON says if the run is killed from outside
                rows.append(row)
                save()
                rows.pop()
                row["execute"] = execute(*handles, budget_s=args.execute_budget)
                ex = row["execute"]
                print(f"  execute: {ex['status']}" + (f" after {ex['seconds']:.1f} s" if "seconds" in ex else "")
                      + (f", peak {_g(ex['peak_bytes_in_use'])}" if ex.get("peak_bytes_in_use") else "")
                      + (f" ({ex['error'].splitlines()[0][:200]})" if "error" in ex else ""), flush=True)
                if ex["status"] == "oom":
                    status = 2
            del handles
            rows.append(row)
            save()
            if args.execute and row["execute"]["status"] == "running":
                print("  (not waiting for the device; exiting)", flush=True)
                save()
                sys.stdout.flush()
                os._exit(status)
    if not args.skip_loss:
        for chunk in args.loss_chunks:
            row = loss_point(args.train_config, args.loss_tokens, chunk)
            print(loss_line(row), flush=True)
            rows.append(row)
            save()
    if not args.skip_train:
        defaults = StepSettings()
        for chunk in args.train_loss_chunk or [defaults.loss_chunk]:
            settings = dict(dtype=args.train_dtype or defaults.dtype,
                            remat_layer=args.train_remat_layer or defaults.remat_layer,
                            remat_window=args.train_remat_window or defaults.remat_window, loss_chunk=chunk)
            print(f"train {args.train_config} {args.train_frames} frames, loss chunk {chunk}: compiling ...",
                  flush=True)
            row = train_point(args.train_config, args.train_frames, args.ratio, settings, args.train_text_tokens)
            print(train_line(row), flush=True)
            rows.append(row)
            save()
    if rows and args.out is not None:
        print(f"wrote {args.out / 'aot_memory.json'} and {args.out / 'aot_memory.md'}")
    if rows and any(r["kind"] == "prefill" and r["bf16_extrapolated"] for r in rows):
        print("note: prefill compiled in float32 (XLA's CPU upcasts bfloat16 matmuls); the bf16 figures halve every "
              "float byte, the uint8 frames argument is counted once as is")
    return status


if __name__ == "__main__":
    sys.exit(main())
