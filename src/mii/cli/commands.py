"""The ``mii`` command: its parser (each subcommand is added by its own module) and entry point."""

from __future__ import annotations

import argparse
import sys

from mii.cli.deployments import add_list_parser, add_terminate_parser
from mii.cli.errors import CliError
from mii.cli.generate import add_demo_parser, add_generate_parser
from mii.cli.serve import add_serve_parser


def build_parser() -> argparse.ArgumentParser:
    from mii import __version__

    parser = argparse.ArgumentParser(
        prog="mii",
        description="Fast LLM inference: serve models, generate text, manage deployments.",
    )
    parser.add_argument("--version", action="version", version=f"mii {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_parser in (
        add_serve_parser,
        add_generate_parser,
        add_list_parser,
        add_terminate_parser,
        add_demo_parser,
    ):
        add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except CliError as err:
        print(f"mii {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\n[mii] interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        from mii.errors import MiiError

        if not isinstance(err, (MiiError, OSError, ValueError)):
            raise
        print(f"mii {args.command}: error: {err}", file=sys.stderr)
        return 1
