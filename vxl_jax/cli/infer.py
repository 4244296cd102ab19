"""`vxl infer`: ask a question about a video file; the answer goes to stdout, progress to stderr."""

from __future__ import annotations

import argparse
import sys


def _ratio(text: str):
    if text.lower() in ("none", "0"):
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"the ratio is an integer >= 1 or 'none', got {text}")
    return value


def add_parser(sub) -> None:
    p = sub.add_parser(
        "infer", help="answer a question about a video file",
        description="Decode frames of a video with decord, resize and crop them for CLIP, wrap the question in "
                    "the checkpoint's chat template, compress the video's visual tokens into VSTs window by "
                    "window, and generate an answer. Works with an HF Video-XL checkpoint folder or a converted "
                    "vxl_jax folder; either needs the tokenizer files beside the weights. Progress goes to "
                    "stderr, the answer to stdout.")
    p.add_argument("--checkpoint", required=True, help="HF Video-XL folder or vxl_jax folder (with tokenizer files)")
    p.add_argument("--video", required=True,
                   help="video file (anything decord/ffmpeg reads: mp4, mkv, avi, ...) or an image (one frame, or its "
                        "336 px tiles when the checkpoint's config says anyres + unires with grid pinpoints)")
    p.add_argument("--question", required=True, help="the question; '<image>\\n' is put before it unless it holds "
                                                      "'<image>' itself")
    frames = p.add_mutually_exclusive_group()
    frames.add_argument("--frames", type=int, default=None,
                        help="number of frames, spread uniformly over the video (default 32)")
    frames.add_argument("--fps", type=float, default=None,
                        help="sample frames at this rate instead, capped at --max-frames")
    p.add_argument("--max-frames", type=int, default=256, help="cap for --fps sampling (default 256)")
    add_answer_options(p)
    p.add_argument("--quiet", action="store_true", help="print only the answer")
    p.set_defaults(run=_run)


def add_answer_options(p: argparse.ArgumentParser) -> None:
    """The options of how a question is answered (compression, decoding, dtype); shared with `vxl eval`."""
    p.add_argument("--ratio", type=_ratio, default=8,
                   help="compression ratio: one VST per R visual tokens, or 'none' for no compression (default 8)")
    p.add_argument("--schedule", default=None, metavar="NAME[:k=v,...]",
                   help="compression schedule instead of --ratio: fixed:ratio=R, uncompressed, "
                        "per-window:ratios=2/4/8, step-random:choices=2/4/8 (keyed by --seed), "
                        "curriculum:name=curriculum_paper,step=S, or dynamic:ratio=8,threshold=0.1,min_frames=2"
                        "[,max_frames=10] (windows cut at scene changes)")
    p.add_argument("--x2l", nargs="?", const="", default=None, metavar="k=v,...",
                   help="answer with Video-X2L: every chunk (window) compressed at a low and a high ratio, the k "
                        "most relevant re-loaded at the low one. Options: low=2,high=32,k=3,"
                        "oracle=attention|clip|uniform|last|random,clip_dir=DIR (CLIPModel checkpoint for the clip "
                        "oracle),force_first=0,force_last=0,offload=0 (keep both levels in host memory),seed=0. "
                        "With --schedule, the schedule's windows are the chunks")
    p.add_argument("--max-new-tokens", type=int, default=64, help="most tokens to generate (default 64)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 decodes greedily (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when sampling (default 1.0)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed of the sampling (default 0)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute and parameter dtype (default float32)")


def answer_options(args: argparse.Namespace) -> dict:
    """`Answerer.ask_frames` keyword arguments from `add_answer_options`' flags (validated)."""
    from vxl_jax.compress import schedules
    from vxl_jax.generate import Sampling
    from vxl_jax.x2l.runner import X2LConfig

    if args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
    return dict(ratio=args.ratio, schedule=schedules.parse(args.schedule) if args.schedule else None,
                x2l=X2LConfig.parse(args.x2l) if args.x2l is not None else None, max_new_tokens=args.max_new_tokens,
                decoding=Sampling(temperature=args.temperature, top_p=args.top_p), seed=args.seed)


def _run(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from vxl_jax.data import video
    from vxl_jax.infer import Answerer

    options = answer_options(args)
    sampling = video.by_fps(args.fps, args.max_frames) if args.fps else video.uniform(args.frames or 32)

    def progress(message: str) -> None:
        if not args.quiet:
            print(f"[vxl infer] {message}", file=sys.stderr, flush=True)

    answerer = Answerer.load(args.checkpoint, dtype=getattr(jnp, args.dtype), progress=progress)
    answer = answerer.ask(args.video, args.question, sampling=sampling, progress=progress, **options)
    print(answer.text)
    return 0
