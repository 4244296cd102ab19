"""`vxl`: the command line of vxl-jax. One module per subcommand."""

from __future__ import annotations

import argparse
import sys

from vxl_jax.cli import convert, demo, eval, fixture_check, infer, tiny_clip, tiny_model, train

COMMANDS = (convert, tiny_model, tiny_clip, demo, infer, eval, train, fixture_check)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="vxl",
        description="Video-XL in JAX: convert checkpoints, make tiny test models, run the demo, answer questions about videos, evaluate (multiple-choice QA, needle in a haystack), train, check parity with golden cases.",
        epilog="Run `vxl COMMAND --help` for a command's options.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for module in COMMANDS:
        module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args) or 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        # ConversionError and ConfigError are ValueErrors: their message is the report.
        print(f"vxl {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
