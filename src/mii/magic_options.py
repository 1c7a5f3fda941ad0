"""What a ``%mii`` / ``%%mii`` line says: its commands' and generation options'
parsers (argparse, errors as IPython usage errors), and the options as request
parameters."""

from __future__ import annotations

import argparse
import re
from typing import Any

from IPython.core.error import UsageError

from mii import magic_line
from mii.cli.errors import nearest_option
from mii.cli.options import add_engine_options, add_generation_options, generation_params
from mii.config import MAGIC_MAX_NEW_TOKENS
from mii.errors import MiiError

USAGE = """\
%mii load MODEL [engine options]   load a model into this kernel (e.g. --max-length 2048)
%mii attach NAME [--api-key KEY]   use a running deployment (deployment name or host:port
                                   of its gRPC port)
%mii PROMPT                        generate; options before or after it: %mii --greedy -- PROMPT
%%mii [generation options]         the cell body is the prompt
%mii unload                        free the model, or detach from the deployment
%mii --help                        every generation option; %mii load --help: engine options
generation options: --max-new-tokens N --greedy --seed S --temperature T --top-p P --top-k K
--stop TEXT (\\n: a line break) --min-new-tokens N --ignore-eos --max-length N (prompt + answer)
--return-full-text; --chat: the prompt as a user turn of the chat template (instruct models
answer a raw question with nothing). A prompt that starts with a command's word or with --:
%mii -- unload the truck. As in any line magic, IPython fills in {expression} and $name
from the notebook's variables (%mii Summarize: {text}); {{ }} and $$ are literal braces and
dollars, and a %%mii cell's body is taken as typed."""

COMMANDS = ("load", "attach", "unload", "detach", "help")


class Parser(argparse.ArgumentParser):
    """argparse that reports errors as IPython usage errors instead of exiting."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message}{nearest_option(self, message)}")

    def exit(self, status: int = 0, message: str | None = None):
        if message:
            raise UsageError(message)
        raise HelpShown


class HelpShown(Exception):
    """``--help`` was printed; nothing else to do."""


def generation_parser(prog: str) -> Parser:
    parser = Parser(prog=prog, description="Generate text with the model in use.")
    parser.add_argument(
        "--chat",
        action="store_true",
        help="the prompt as one user turn of the model's chat template (instruct models; "
        "the model loaded in this kernel or the attached deployment's)",
    )
    add_generation_options(parser, max_new_tokens=MAGIC_MAX_NEW_TOKENS)
    for action in parser._actions:
        if action.dest == "stop":  # (the CLI's help speaks of the shell's quoting)
            action.help = (
                "stop at this text (repeat for several); \\n, \\t, \\r and \\\\ are read as "
                "escapes: --stop '\\n' stops at the end of a line"
            )
    # The request options of MISSION.md's table that mii generate has as other flags
    # (--max-length: the engine's there, a request's cap here).
    parser.add_argument(
        "--max-length", type=int, help="cap on prompt + response tokens of this request"
    )
    parser.add_argument(
        "--return-full-text", action="store_true", help="prefix the answer with the prompt"
    )
    return parser


def load_parser() -> Parser:
    parser = Parser(prog="%mii load", description="Load a model into this kernel.")
    parser.add_argument("model", help="hub id, local checkpoint directory or .gguf file")
    add_engine_options(parser)
    return parser


def attach_parser() -> Parser:
    parser = Parser(prog="%mii attach", description="Use a running deployment.")
    parser.add_argument("name", help="deployment name (mii list), or host:port of its gRPC port")
    parser.add_argument(
        "--api-key",
        help="the deployment's API key (default: its record on this machine, else $MII_API_KEY)",
    )
    return parser


def _takes_value(parser: argparse.ArgumentParser) -> dict[str, bool]:
    """Each option of ``parser`` (but --help), and whether it takes a value."""
    return {
        option: action.nargs != 0
        for action in parser._actions
        if action.dest != "help"
        for option in action.option_strings
    }


# Options a line magic accepts before (or after) its prompt (the generation options;
# --help before it only: mii.magic_line), and whether each takes a value.
LINE_OPTIONS = _takes_value(generation_parser("%mii"))


def split_line(line: str) -> tuple[list[str], str]:
    """``%mii [options] [--] PROMPT`` as option tokens and the prompt
    (:func:`mii.magic_line.split_line` with the line magic's options)."""
    return magic_line.split_line(line, LINE_OPTIONS)


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
_ESCAPE = re.compile(r"\\([ntr\\])")


def magic_params(args: argparse.Namespace) -> dict[str, Any]:
    """The generation options of a magic's line. A magic's line cannot hold a line
    break, so ``--stop`` reads ``\\n``, ``\\t``, ``\\r`` and ``\\\\`` as escapes
    (``--stop '\\n'`` stops at the end of a line)."""
    try:
        params = generation_params(args)
    except MiiError as err:
        raise UsageError(f"%mii: {err}") from None
    if args.max_length is not None:
        params["max_length"] = args.max_length
    if args.return_full_text:
        params["return_full_text"] = True
    stop = params.get("stop")
    if isinstance(stop, str):
        params["stop"] = _unescape(stop)
    elif stop is not None:
        params["stop"] = [_unescape(text) for text in stop]
    return params


def _unescape(text: str) -> str:
    return _ESCAPE.sub(lambda match: _ESCAPES[match.group(1)], text)
