"""The ``mii`` command: its parser (each subcommand is added by its own module) and entry point."""

from __future__ import annotations

import argparse
import os
import re
import sys
from typing import Any

from mii.cli.deployments import add_list_parser, add_terminate_parser
from mii.cli.errors import CliError, nearest_option
from mii.cli.generate import add_demo_parser, add_generate_parser
from mii.cli.serve import add_serve_parser
from mii.cli.vllm_flags import NOT_TAKEN
from mii.rpc import quiet_grpc_logs


def build_parser() -> argparse.ArgumentParser:
    from mii import __version__

    parser = argparse.ArgumentParser(
        prog="mii",
        description="Fast LLM inference: serve models, generate text, manage deployments.",
    )
    parser.add_argument("--version", action="version", version=f"mii {__version__}")
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=CommandParser
    )
    for add_parser in (
        add_serve_parser,
        add_generate_parser,
        add_list_parser,
        add_terminate_parser,
        add_demo_parser,
    ):
        add_parser(commands)
    return parser


class CommandParser(argparse.ArgumentParser):
    """A subcommand's parser: an unrecognized option is reported with this command's
    usage (not the top-level one) and the nearest option it has (or, for a vLLM flag
    mii does not take, what to do instead)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        # No abbreviations: `--gpu-mem 0.5` was taken for --gpu-memory-utilization
        # without a word, and a later flag sharing the prefix would break such scripts.
        kwargs.setdefault("allow_abbrev", False)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        unknown = re.match(r"unrecognized arguments: (.*)", message)
        given = unknown.group(1).split() if unknown else []
        vllm = [name for name in (g.split("=")[0] for g in given) if name in NOT_TAKEN]
        if vllm:  # a vLLM flag carried over from a launch script
            message += f" ({vllm[0]} is vLLM's: {NOT_TAKEN[vllm[0]]})"
        else:
            message += nearest_option(self, message)
        example = {"generate": "MODEL -- PROMPT", "demo": "-- QUESTION"}.get(self.prog.split()[-1])
        dashed = any(g.startswith("-") and not g.startswith("--") for g in given)  # not --opt
        if example and (dashed or "ignored explicit argument" in message) and "(" not in message:
            # "-hello" read as -h with a value: "ignored explicit argument 'ello'"
            message += f" (a prompt that starts with - goes after --: {self.prog} {example})"
        super().error(message)


def parse_command_line(
    parser: argparse.ArgumentParser, argv: list[str] | None
) -> argparse.Namespace:
    """``argv`` parsed by its subcommand's own parser, so that its errors show that
    command's usage; ``generate`` takes options between or after its prompts
    (``mii generate MODEL --chat "question"``: argparse's plain parse stops the
    prompts at the first option and refuses the text after it)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv[0] if argv else None
    sub = _subcommands(parser).get(command)
    if sub is None:  # --help, --version, a missing or unknown command
        return parser.parse_args(argv)
    intermixed = command in ("generate", "demo")  # prompts and options in any order
    parse = _parse_generate if intermixed else argparse.ArgumentParser.parse_args
    args = parse(sub, argv[1:])
    args.command = command
    return args


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """The ``mii`` parser's subcommand parsers, by name."""
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def _parse_generate(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """Options anywhere among the prompts; "--" ends them, so that what follows it is
    positional even where it starts with "-" (the intermixed parse refuses "--" after
    an option or a prompt, and the plain parse ends the prompts at the first option)."""
    if "--" not in argv:
        return parser.parse_intermixed_args(argv)
    end = argv.index("--")
    before = argv[end - 1] if end else ""
    action = parser._option_string_actions.get(before)
    if action is not None and action.nargs != 0:  # its value cannot come after "--"
        parser.error(f"argument {'/'.join(action.option_strings)}: expected one argument")
    # Positionals after "--" that look like options stand in as placeholders no option
    # can be, and are put back once parsed.
    after = argv[end + 1 :]
    tokens = [f"\0{i}" if token.startswith("-") else token for i, token in enumerate(after)]
    held = dict(zip(tokens, after))  # (a plain token stands for itself)
    args = parser.parse_intermixed_args(argv[:end] + tokens)
    args.model = held.get(args.model, args.model)
    args.prompt_args = [held.get(p, p) for p in args.prompt_args]
    return args


def main(argv: list[str] | None = None) -> int:
    quiet_grpc_logs()  # this process is mii's own: before any grpc use
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_command_line(parser, argv)
    try:
        return args.func(args)
    except CliError as err:
        hint = _flag_hint(parser, args.command, err, argv)
        print(f"mii {args.command}: error: {err}{hint}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\n[mii] interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `mii list | head`: the reader has all it wanted
        # (stdout pointed at /dev/null, so that the interpreter's last flush is quiet)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as err:
        from mii.errors import MiiError

        if not isinstance(err, (MiiError, OSError, ValueError)):
            raise
        hints = _flag_hint(parser, args.command, err, argv) + _cache_hint(err)
        print(f"mii {args.command}: error: {err}{hints}", file=sys.stderr)
        return 1


def _flag_hint(
    parser: argparse.ArgumentParser, command: str, err: Exception, argv: list[str]
) -> str:
    """The command-line flag of the option an error names by its Python name
    (``invalid generation option 'max_new_tokens'`` came with no ``--max-new-tokens``):
    the one typed (``--gpu-memory-utilization``, not mii's name of it), else mii's."""
    field = getattr(err, "field", None)
    if not field or "(flag " in str(err):
        return ""
    for action in _subcommands(parser)[command]._actions:
        if action.dest == field and action.option_strings:
            typed = [
                flag
                for flag in action.option_strings
                if any(arg == flag or arg.startswith(flag + "=") for arg in argv)
            ]
            if not typed and field == "prompt":  # (the prompts given as arguments)
                return ""
            return f" (flag {(typed or action.option_strings)[0]})"
    return ""


def _cache_hint(err: Exception) -> str:
    """What to change when an OSError is about mii's cache directory (a bare "[Errno 2]
    No such file or directory: '/proc/nope'" did not say where that path came from)."""
    from pathlib import Path

    from mii.cache import cache_dir

    if not isinstance(err, OSError) or not isinstance(err.filename, (str, bytes, os.PathLike)):
        return ""
    root = cache_dir().expanduser().absolute()
    path = Path(os.fsdecode(err.filename)).expanduser().absolute()
    if path != root and root not in path.parents:
        return ""
    return f" (mii's cache directory is {root}: set MII_CACHE_DIR to a writable directory)"
