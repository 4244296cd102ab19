"""`vxl eval`: score a checkpoint on multiple-choice video QA (MLVU, Video-MME, LongVideoBench, LVBench) or video needle-in-a-haystack."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

from vxl_jax.cli.infer import add_answer_options, answer_options

EPILOG = """examples:
  vxl eval --task mcqa --checkpoint CKPT --out runs/mlvu --data MLVU/json --video-root MLVU/video --frames 256
  vxl eval --task mcqa --checkpoint CKPT --out runs/mme --data videomme.json --video-root Video-MME/data --frames 128
  vxl eval --task niah --checkpoint CKPT --out runs/niah --lengths 10,20,40 --depths 0,0.25,0.5,0.75,1

mcqa reads MLVU (per-task JSON lists with "candidates" and the answer's text, or the HF dev export),
Video-MME (records with "options" ["A. ...", ...] and a letter answer, flat or nested under "questions"),
LongVideoBench (lvb_val.json) and LVBench (video_info.meta.jsonl, or flat); the layout is detected per
file. Those four are prompted and scored as lmms-eval 0.7 does (its prompt text, its letter extraction),
so accuracies compare with published ones; other files get Video-XL's prompt and a lenient parser. Each
video is encoded once and all its questions are asked on that encoding (--batch-videos videos per
batched prefill). The papers use 256 frames for MLVU and 128 for Video-MME. For niah, --seed (also the
sampling seed) picks the needles and the synthetic haystack: same flags, same videos and questions.
Writes OUT/results.json (config, summary, one record per question or cell) and, for niah, also
OUT/niah_heatmap.png."""


def _number_list(convert, kind: str):
    """An argparse type: a comma-separated list of `convert`ed values, at least one."""
    def parse(text: str) -> tuple:
        try:
            values = tuple(convert(v) for v in text.split(",") if v.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated {kind}, got {text!r}") from None
        if not values:
            raise argparse.ArgumentTypeError("expected at least one value")
        return values

    return parse


_ints = _number_list(int, "integers")
_floats = _number_list(float, "numbers")


def add_parser(sub) -> None:
    from vxl_jax.eval import niah

    p = sub.add_parser(
        "eval", help="score a checkpoint on multiple-choice video QA or needle-in-a-haystack",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Score a checkpoint. --task mcqa asks the multiple-choice questions of an MLVU or Video-MME "
                    "annotation file about their videos and reports accuracy overall and per task type. "
                    "--task niah inserts a generated needle frame (a coloured shape) into haystacks of several "
                    "lengths at several depths, asks for the shape's colour, and draws accuracy as a heat map "
                    "(haystack length x needle depth), as in the Video-XL and Video-X2L papers. Answers are read "
                    "back from free text: Video-MME, MLVU, LongVideoBench and LVBench with lmms-eval's rules, "
                    "anything else leniently (a letter, '(B)', 'Answer: B', or an option's text); unparsed ones "
                    "count wrong. Progress goes to stderr, one line per question or cell.")
    p.add_argument("--task", required=True, choices=("mcqa", "niah"), help="what to evaluate")
    p.add_argument("--checkpoint", required=True, help="HF Video-XL folder or vxl_jax folder (with tokenizer files)")
    p.add_argument("--out", required=True, help="output folder for results.json (and niah_heatmap.png)")

    g = p.add_argument_group("mcqa (MLVU, Video-MME, LongVideoBench, LVBench)")
    g.add_argument("--data", help="annotation JSON file, or a folder of them (MLVU's json/)")
    g.add_argument("--video-root", help="folder the records' videos are relative to (default: the --data folder); "
                                        "MLVU's per-task subfolders are looked in too")
    frames = g.add_mutually_exclusive_group()
    frames.add_argument("--frames", type=int, default=None,
                        help="frames per video, spread uniformly (default 32)")
    frames.add_argument("--fps", type=float, default=None, help="sample at this rate instead, capped at --max-frames")
    g.add_argument("--max-frames", type=int, default=256, help="cap for --fps sampling (default 256)")
    g.add_argument("--limit", type=int, default=None, help="only the first N questions")
    g.add_argument("--batch-videos", type=int, default=1,
                   help="videos encoded in one batched prefill (their questions answered as one batch); each "
                        "video is encoded once whatever this is, and every question about it reuses that "
                        "encoding (default 1; raise it on a GPU, where a batch costs little more than one video)")

    d = niah.NiahSpec()
    g = p.add_argument_group("niah (video needle in a haystack)")
    g.add_argument("--lengths", type=_ints, default=d.lengths,
                   help=f"haystack lengths in frames, comma-separated (default {','.join(map(str, d.lengths))})")
    g.add_argument("--depths", type=_floats, default=d.depths,
                   help=f"needle depths as fractions of the haystack (default {','.join(f'{x:g}' for x in d.depths)})")
    g.add_argument("--trials", type=int, default=d.trials, help=f"needles per cell (default {d.trials})")
    g.add_argument("--haystack", default=None,
                   help="video file to sample each haystack from (default: a generated synthetic video)")
    g.add_argument("--size", type=int, default=d.size, help=f"side of generated haystack frames (default {d.size})")
    g.add_argument("--num-options", type=int, default=d.num_options,
                   help=f"colours offered per question (default {d.num_options})")
    add_answer_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    p.set_defaults(run=_run)


def _check_task_flags(args: argparse.Namespace) -> None:
    if args.task == "mcqa":
        if not args.data:
            raise ValueError("--task mcqa needs --data (an MLVU, Video-MME, LongVideoBench or LVBench annotation "
                             "file or folder)")
        if args.haystack:
            raise ValueError("--haystack is for --task niah")
        if args.frames is not None and args.frames < 1:
            raise ValueError(f"--frames must be >= 1, got {args.frames}")
        if args.limit is not None and args.limit < 1:
            raise ValueError(f"--limit must be >= 1, got {args.limit}")
        if args.batch_videos < 1:
            raise ValueError(f"--batch-videos must be >= 1, got {args.batch_videos}")
    else:
        for flag in ("data", "video_root", "frames", "fps", "limit"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag.replace('_', '-')} is for --task mcqa")


def _config(args: argparse.Namespace, options: dict) -> dict:
    """The run's settings for results.json: the flags and the answer options actually passed."""
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items() if k != "run"}
    # A schedule is a function: its --schedule text is already in the flags.
    config["answer_options"] = {k: dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
                                for k, v in options.items() if not callable(v)}
    return config


def _run(args: argparse.Namespace) -> int:
    import jax.numpy as jnp

    from vxl_jax.data import video
    from vxl_jax.eval import mcqa, niah, write_json
    from vxl_jax.infer import Answerer

    _check_task_flags(args)
    options = answer_options(args)
    start = time.perf_counter()

    def progress(message: str) -> None:
        if not args.quiet:
            print(f"[vxl eval] {message}", file=sys.stderr, flush=True)

    # Everything that can fail on the inputs fails before the model loads.
    if args.task == "mcqa":
        questions = mcqa.load(args.data)[:args.limit]
        root = args.video_root or (args.data if os.path.isdir(args.data) else os.path.dirname(args.data) or ".")
        missing = mcqa.missing_videos(questions, root)
        if missing:
            shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
            raise FileNotFoundError(f"{len(missing)} of the videos of {args.data} are not under {root}: {shown}")
        sampling = video.by_fps(args.fps, args.max_frames) if args.fps else video.uniform(args.frames or 32)
        progress(f"{len(questions)} questions from {args.data}, videos under {root}")
    else:
        spec = niah.NiahSpec(lengths=args.lengths, depths=args.depths, trials=args.trials, seed=args.seed,
                             size=args.size, num_options=args.num_options, haystack=args.haystack)
        if spec.haystack is not None and not os.path.isfile(spec.haystack):
            raise FileNotFoundError(f"haystack video {spec.haystack} does not exist")
        progress(f"{len(niah.grid(spec))} cells: lengths {list(spec.lengths)} x depths {list(spec.depths)} "
                 f"x {spec.trials} trial(s)")
    os.makedirs(args.out, exist_ok=True)

    answerer = Answerer.load(args.checkpoint, dtype=getattr(jnp, args.dtype), progress=progress)

    def answer_fn(frames, text: str):
        return answerer.ask_frames(frames, text, **options)   # records keep its details (X2L's selection)

    # mcqa: each video encoded once (batch_videos at a time), all its questions asked on that encoding.
    encode_options = {k: options[k] for k in ("ratio", "schedule", "x2l", "seed")}
    answer_options_ = {k: options[k] for k in ("max_new_tokens", "decoding", "seed")}
    asker = mcqa.Asker(lambda frames: answerer.encode_many(frames, **encode_options),
                       lambda pairs: answerer.answer(pairs, **answer_options_))

    config = _config(args, options)
    if args.task == "mcqa":
        results = mcqa.run(questions, asker, root, sampling, progress, batch_videos=args.batch_videos)
        payload = {"task": "mcqa", "config": config, **results.to_json()}
        summary = results.summary
        for task_type, row in summary["by_task_type"].items():
            progress(f"  {task_type}: {row['correct']}/{row['total']} = {row['accuracy']:.3f}")
    else:
        results = niah.run(answer_fn, spec, progress)
        summary = results.summary
        png = niah.heatmap(results.table, spec.lengths, spec.depths, os.path.join(args.out, "niah_heatmap.png"),
                           title=f"V-NIAH, {os.path.basename(os.path.normpath(args.checkpoint))}")
        payload = {"task": "niah", "config": config, **results.to_json(), "heatmap": os.path.basename(png)}
        progress("accuracy (rows: haystack frames, columns: needle depth)\n"
                 + niah.format_table(results.table, spec.lengths, spec.depths))
    payload["seconds"] = time.perf_counter() - start
    path = write_json(os.path.join(args.out, "results.json"), payload)
    print(f"accuracy {summary['correct']}/{summary['total']} = {summary['accuracy'] or 0:.3f} "
          f"({summary['unparsed']} unparsed); wrote {path}" + (f" and {png}" if args.task == "niah" else ""))
    return 0
