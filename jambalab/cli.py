"""The `jambalab` command line: one subcommand per module in jambalab.commands.

Each command module defines `register(subparsers)`, which adds its parser and
sets `func` to the function that runs it. A JambalabError (bad input) prints one
line and exits 2; nothing else is caught.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from jambalab.errors import JambalabError

# Order is the order shown by --help.
COMMANDS = ["info", "generate", "serve", "memory", "bench", "train", "ablate", "eval", "vision"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jambalab", description="Jamba-style hybrid language models.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"jambalab.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except JambalabError as e:
        print(f"jambalab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"jambalab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
