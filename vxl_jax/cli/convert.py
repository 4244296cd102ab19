"""`vxl convert`: HF Video-XL <-> vxl_jax checkpoints, and import from plain Qwen2 + CLIP."""

from __future__ import annotations

import argparse
import time

from vxl_jax.cli.util import peak_rss_mib

_DTYPES = {"keep": None, "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "convert", help="convert checkpoints between HF and JAX",
        description="Convert checkpoints. hf-to-jax reads an HF Video-XL dir (model.safetensors or sharded "
                    "with model.safetensors.index.json) tensor by tensor and writes an orbax checkpoint plus "
                    "vxl_config.json; jax-to-hf writes it back with the original key names; import-parts "
                    "builds a fresh Video-XL model from a Qwen2ForCausalLM dir and a CLIP vision dir.")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = verbs.add_parser("hf-to-jax", help="HF Video-XL checkpoint dir -> vxl_jax checkpoint dir",
                         description="HF Video-XL checkpoint dir -> vxl_jax checkpoint dir (orbax + config).")
    p.add_argument("src", help="HF checkpoint dir (config.json, model.safetensors[.index.json], vision tower)")
    p.add_argument("out", help="output dir (must not hold a checkpoint yet)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="keep",
                   help="cast parameters (default: keep the checkpoint's dtype, which makes the round trip exact)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_hf_to_jax)

    p = verbs.add_parser("jax-to-hf", help="vxl_jax checkpoint dir -> HF Video-XL checkpoint dir",
                         description="vxl_jax checkpoint dir -> HF Video-XL dir with the original key names, "
                                     "config.json and the vision tower folder.")
    p.add_argument("src", help="vxl_jax checkpoint dir (from hf-to-jax or training)")
    p.add_argument("out", help="output dir")
    p.add_argument("--max-shard-gb", type=float, default=5.0,
                   help="split model.safetensors into shards of at most this size, with an index (default 5)")
    p.set_defaults(run=_jax_to_hf)

    p = verbs.add_parser("import-parts", help="Qwen2ForCausalLM + CLIP vision dirs -> fresh Video-XL (JAX)",
                         description="Build a fresh Video-XL model from a plain Qwen2ForCausalLM checkpoint and "
                                     "a CLIPVisionModel (or CLIPModel) checkpoint. VST q/k/v are copied from "
                                     "q/k/v and the VST embedding from the eos embedding, as the authors "
                                     "initialise them; the projector is freshly initialised from --seed.")
    p.add_argument("llm", help="Qwen2ForCausalLM checkpoint dir")
    p.add_argument("vision", help="CLIPVisionModel or CLIPModel checkpoint dir")
    p.add_argument("out", help="output dir")
    p.add_argument("--format", choices=("jax", "hf"), default="jax", help="write a vxl_jax (default) or HF dir")
    p.add_argument("--seed", type=int, default=0, help="seed of the projector initialisation (default 0)")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default="keep", help="cast parameters")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_import_parts)


def _report(what: str, stats, out: str, start: float) -> None:
    print(f"{what}: {stats.summary()}")
    print(f"wrote {out} in {time.perf_counter() - start:.2f} s; peak RSS {peak_rss_mib():,.0f} MiB")


def _hf_to_jax(args: argparse.Namespace) -> int:
    from vxl_jax.conversion.checkpoint import hf_to_jax
    start = time.perf_counter()
    stats = hf_to_jax(args.src, args.out, dtype=_DTYPES[args.dtype], progress=not args.quiet)
    _report("hf-to-jax", stats, args.out, start)
    return 0


def _jax_to_hf(args: argparse.Namespace) -> int:
    from vxl_jax.conversion.checkpoint import jax_to_hf
    start = time.perf_counter()
    stats = jax_to_hf(args.src, args.out, max_shard_bytes=int(args.max_shard_gb * 2**30))
    _report("jax-to-hf", stats, args.out, start)
    return 0


def _import_parts(args: argparse.Namespace) -> int:
    from vxl_jax.conversion.checkpoint import import_parts, save_jax, write_hf
    start = time.perf_counter()
    params, cfg, stats = import_parts(args.llm, args.vision, seed=args.seed, dtype=_DTYPES[args.dtype],
                                      progress=not args.quiet)
    if args.format == "jax":
        save_jax(args.out, params, cfg, side_files_from=args.llm)
    else:
        write_hf(args.out, params, cfg, side_files_from=args.llm)
    _report("import-parts", stats, args.out, start)
    return 0
