"""`vxl`: the command line of vxl-jax. One module per subcommand."""

from __future__ import annotations

import argparse
import os
import sys

from vxl_jax.cli import aot, convert, demo, eval, fixture_check, infer, tiny_clip, tiny_model, train
from vxl_jax.cli.util import COMPILATION_CACHE_ENV, compilation_cache, resolve_compilation_cache

COMMANDS = (convert, tiny_model, tiny_clip, demo, infer, eval, train, fixture_check, aot)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vxl",
        description="Video-XL in JAX: convert checkpoints, make tiny test models, run the demo, answer questions about videos, evaluate (multiple-choice QA, needle in a haystack), train, check parity with golden cases, compile for a GPU or TPU without one (aot).",
        epilog="Run `vxl COMMAND --help` for a command's options. Compiled programs are kept in a persistent "
               "cache, so a second run of a command does not compile them again (the model's programs are "
               "not even traced again: their executables are kept in the folder's programs/): by default in "
               "${XDG_CACHE_HOME:-~/.cache}/vxl_jax/jax_cache; move it with --compilation-cache DIR or "
               f"${COMPILATION_CACHE_ENV}=DIR, turn it off with the value off (or 0); delete the folder to "
               "empty it.")
    parser.add_argument("--compilation-cache", metavar="DIR|off", default=None,
                        help=f"folder of JAX's persistent compilation cache, or off (default: ${COMPILATION_CACHE_ENV}, "
                             "else $JAX_COMPILATION_CACHE_DIR, else ${XDG_CACHE_HOME:-~/.cache}/vxl_jax/jax_cache)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


# Commands whose work is done (files written and closed, output printed) when they return. The `vxl` script ends
# them with os._exit after flushing: the interpreter's teardown (jax clears its backends and caches, the arrays
# are freed one by one) took 0.35-0.45 s of a 1.5-2 s warm `vxl infer`, and leaves nothing that needs writing.
QUICK_EXIT = ("infer", "eval")


def main(argv: list[str] | None = None) -> int:
    return _main(build_parser().parse_args(argv))


def _main(args: argparse.Namespace) -> int:
    try:
        # Every command (and the `vxl` processes it starts, e.g. the demo's training) reads and writes compiled
        # programs in one persistent cache; restored afterwards, for callers of main() in a longer process.
        with compilation_cache(resolve_compilation_cache(args.compilation_cache)):
            return args.run(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        # ConversionError and ConfigError are ValueErrors: their message is the report.
        print(f"vxl {args.command}: error: {e}", file=sys.stderr)
        return 1


def run() -> None:
    """The `vxl` script: `main()` with the command line, then its exit code; QUICK_EXIT commands skip the teardown."""
    args = build_parser().parse_args()
    code = _main(args)
    if args.command in QUICK_EXIT:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    run()
