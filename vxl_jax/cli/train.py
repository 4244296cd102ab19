"""`vxl train`: train (or resume) a Video-XL model from a config; metrics to stdout, metrics.jsonl, TensorBoard."""

from __future__ import annotations

import logging
import sys


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train", help="train or fine-tune a model from a config (resumes from the workdir's latest checkpoint)",
        description="Train Video-XL with the compression in the loop: the loss is next-token cross entropy over "
                    "the whole compressed sequence, with gradients through the VST keys/values into earlier "
                    "windows, the projector and the vision tower. Parameters and optimizer state are sharded over "
                    "a (data, fsdp, tensor) mesh. Everything lands in WORKDIR: config.json, metrics.jsonl (one "
                    "JSON object per step), tensorboard/, checkpoints/ (state + data iterator; a rerun of the "
                    "same command resumes from the latest, and SIGTERM saves before exiting) and, at max_steps, "
                    "export_hf/ (HF Video-XL format with the tokenizer, for `vxl infer`).",
        epilog="Examples:\n"
               "  vxl train --config tiny_synthetic --workdir runs/tiny --set max_steps=50\n"
               "  vxl train --config videoxl_7b_stage2 --workdir /scratch/run --set init=/ckpt/Video-XL-7B "
               "--set data.annotations=/data/train.jsonl --set data.media_root=/data --set mesh.fsdp=8\n"
               "Multi-host: see launch/README.md.",
        formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True,
                   help="a training config JSON: a path, or a name under configs/ (tiny_synthetic, "
                        "videoxl_7b_stage1, videoxl_7b_stage2)")
    p.add_argument("--workdir", required=True, help="run directory (created; reused to resume)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, dotted for sections, value as JSON (repeatable), e.g. "
                        "--set max_steps=12 --set optim.learning_rate=3e-4 --set mesh.fsdp=8")
    p.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="multi-process: address of process 0's coordinator (or VXL_COORDINATOR); under SLURM "
                        "with several tasks jax finds it itself")
    p.add_argument("--num-processes", type=int, default=None, help="multi-process: number of processes")
    p.add_argument("--process-id", type=int, default=None, help="multi-process: this process's index")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no per-step lines on stdout")
    p.set_defaults(run=run)


def run(args) -> int:
    from vxl_jax import parallel
    from vxl_jax.train.config import TrainConfig

    # Our own handler: jax/absl may already own the root logger, which makes basicConfig a no-op.
    logger = logging.getLogger("vxl_jax")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False
    cfg = TrainConfig.load(args.config, args.overrides)     # config errors before any device work
    import jax
    # `vxl` (cli/main.py) set it for every process of the run; jax writes new entries from process 0 only.
    logger.info("persistent compilation cache: %s", jax.config.jax_compilation_cache_dir
                if jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir else "off")
    parallel.initialize(args.coordinator, args.num_processes, args.process_id)
    from vxl_jax.train import loop
    result = loop.run(cfg, args.workdir, progress=not args.quiet, stdout=not args.quiet)
    if result.stopped_by_signal:
        print(f"stopped by SIGTERM at step {result.end_step}; checkpoint saved, rerun the command to resume",
              file=sys.stderr)
    else:
        where = f"; HF export in {result.export_dir}" if result.export_dir else ""
        print(f"trained steps {result.start_step}..{result.end_step}, last loss {result.last_loss}{where}",
              file=sys.stderr)
    return 0
