"""Jupyter / IPython magics: stream generated text into the notebook.

    %load_ext mii
    %mii load MODEL [--max-length N ...]   load a model into this kernel (engine options)
    %mii attach NAME                       use a running deployment (name or host:port)
    %mii DeepSpeed is                      generate; the text streams into the cell output
    %mii --max-new-tokens 16 --greedy -- DeepSpeed is
    %mii --chat What is the capital of France?   a user turn of the chat template
    %%mii [--max-new-tokens N] [--temperature T] [--greedy] [--seed S] ...
    ...the cell body is the prompt...
    %mii unload                            free the model (or detach from the deployment)
    %mii                                   what is in use, and this help

The kernel already runs an event loop, so nothing here calls ``asyncio.run``:
an in-process model runs on an event loop in a private thread, and a deployment
is reached through the synchronous gRPC client.
"""

from __future__ import annotations

import argparse
import difflib
import re
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class

from mii import magic_line
from mii.cli.errors import nearest_option
from mii.cli.options import (
    add_engine_options,
    add_generation_options,
    engine_options,
    generation_params,
)
from mii.config import MAGIC_MAX_NEW_TOKENS, EngineConfig
from mii.engine_thread import EngineThread
from mii.errors import MiiError
from mii.magic_line import split_args as _split_args

NO_MODEL = (
    "no model in use: run `%mii load MODEL` (a hub id or local path, loaded in this kernel) "
    "or `%mii attach NAME` (a running deployment) first"
)
USAGE = """\
%mii load MODEL [engine options]   load a model into this kernel (e.g. --max-length 2048)
%mii attach NAME                   use a running deployment (deployment name or host:port)
%mii PROMPT                        generate; options before or after it: %mii --greedy -- PROMPT
%%mii [generation options]         the cell body is the prompt
%mii unload                        free the model, or detach from the deployment
generation options: --max-new-tokens N --greedy --seed S --temperature T --top-p P --top-k K
--stop TEXT (\\n: a line break) --min-new-tokens N --ignore-eos --max-length N (prompt + answer)
--return-full-text; --chat: the prompt as a user turn of the chat template (instruct models
answer a raw question with nothing)"""


_COMMANDS = ("load", "attach", "unload", "detach", "help")


class _Parser(argparse.ArgumentParser):
    """argparse that reports errors as IPython usage errors instead of exiting."""

    def error(self, message: str):
        raise UsageError(f"{self.prog}: {message}{nearest_option(self, message)}")

    def exit(self, status: int = 0, message: str | None = None):
        if message:
            raise UsageError(message)
        raise _HelpShown


class _HelpShown(Exception):
    """``--help`` was printed; nothing else to do."""


def _generation_parser(prog: str) -> _Parser:
    parser = _Parser(prog=prog, description="Generate text with the model in use.")
    parser.add_argument(
        "--chat",
        action="store_true",
        help="the prompt as one user turn of the model's chat template (instruct models; "
        "the model loaded in this kernel or the attached deployment's)",
    )
    add_generation_options(parser, max_new_tokens=MAGIC_MAX_NEW_TOKENS)
    # The request options of MISSION.md's table that mii generate has as other flags
    # (--max-length: the engine's there, a request's cap here).
    parser.add_argument(
        "--max-length", type=int, help="cap on prompt + response tokens of this request"
    )
    parser.add_argument(
        "--return-full-text", action="store_true", help="prefix the answer with the prompt"
    )
    return parser


def _load_parser() -> _Parser:
    parser = _Parser(prog="%mii load", description="Load a model into this kernel.")
    parser.add_argument("model", help="hub id, local checkpoint directory or .gguf file")
    add_engine_options(parser)
    return parser


def _takes_value(parser: argparse.ArgumentParser) -> dict[str, bool]:
    """Each option of ``parser`` (but --help), and whether it takes a value."""
    return {
        option: action.nargs != 0
        for action in parser._actions
        if action.dest != "help"
        for option in action.option_strings
    }


# Options a line magic accepts before its prompt (the generation options), and
# whether each takes a value.
_LINE_OPTIONS = _takes_value(_generation_parser("%mii"))


def split_line(line: str) -> tuple[list[str], str]:
    """``%mii [options] [--] PROMPT`` as option tokens and the prompt
    (:func:`mii.magic_line.split_line` with the line magic's options)."""
    return magic_line.split_line(line, _LINE_OPTIONS)


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
_ESCAPE = re.compile(r"\\([ntr\\])")


def _magic_params(args: argparse.Namespace) -> dict[str, Any]:
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


class LocalModel(EngineThread):
    """A model loaded in this kernel: an AsyncEngine on an event loop of its own, so
    that the kernel's thread can stream from it while the kernel's own loop runs."""

    def __init__(self, model: str, **options: Any) -> None:
        from mii.engine.async_engine import AsyncEngine

        super().__init__(AsyncEngine(model, **options), name="mii-magic")  # loads (blocks) here
        self.name = model


@magics_class
class MiiMagics(Magics):
    """``%mii`` / ``%%mii``. ``model`` (a :class:`LocalModel`, whose ``engine`` is the
    AsyncEngine) or ``client`` (a deployment's MiiClient) is the one in use."""

    def __init__(self, shell=None) -> None:
        super().__init__(shell)
        self.model: LocalModel | None = None
        self.client = None
        self.attached_name: str | None = None  # what `%mii attach` named (its record)
        self._deployment_tokenizer = None  # loaded by the first --chat with a deployment
        self.last_text: str | None = None

    # ----- the magic ------------------------------------------------------------

    @line_cell_magic
    def mii(self, line: str, cell: str | None = None) -> None:
        """Load a model or attach to a deployment, then stream generated text.

        %mii load MODEL [engine options] / %mii attach NAME / %mii PROMPT /
        %%mii [generation options] (the cell is the prompt) / %mii unload
        """
        try:
            if cell is not None:
                args = _generation_parser("%%mii").parse_args(_split_args(line))
                self._generate(cell.rstrip("\n"), _magic_params(args), args.chat)
                return
            command, _, rest = line.strip().partition(" ")
            if command == "load":
                self._load(rest)
            elif command == "attach":
                self._attach(rest.strip())
            elif command in ("unload", "detach"):
                self._release(verbose=True)
            elif command in ("", "help", "-h", "--help"):
                print(self._status())
                print(USAGE)
            elif not rest and (near := difflib.get_close_matches(command, _COMMANDS, 1, 0.85)):
                # "%mii unlod" generated 128 tokens from the prompt "unlod"
                raise UsageError(
                    f"%mii: did you mean `%mii {near[0]}`? (a prompt of that one word: "
                    f"%mii -- {command})"
                )
            else:
                options, prompt = split_line(line)
                args = _generation_parser("%mii").parse_args(options)
                if not prompt:
                    raise UsageError("%mii: no prompt given")
                self._generate(prompt, _magic_params(args), args.chat)
        except _HelpShown:
            pass

    # ----- commands -------------------------------------------------------------

    def _load(self, rest: str) -> None:
        from mii.models.loader import check_model

        args = _load_parser().parse_args(_split_args(rest))
        # What can be checked without loading is checked before the model in use is
        # freed (a load needs its memory): a typo in a path, a hub id, a file that is
        # not a checkpoint, an option or a device keeps it.
        try:
            config = EngineConfig.parse(args.model, **engine_options(args))
            check_model(args.model, config.revision, config.device)
        except (MiiError, OSError, ValueError) as err:  # OSError: e.g. an unwritable cache
            raise UsageError(f"%mii load: {err} (the model in use stays loaded)") from None
        self._release()
        print(f"[mii] loading {args.model} ...", flush=True)
        try:
            self.model = LocalModel(args.model, **engine_options(args))
        except (MiiError, OSError, ValueError) as err:
            raise UsageError(f"%mii load: {err}") from None
        length = self.model.engine.core.max_length
        print(f"[mii] loaded {args.model} in this kernel (max_length {length})", flush=True)

    def _attach(self, name: str) -> None:
        from mii.rpc.client import DeploymentNotFoundError, client

        if not name:
            raise UsageError("%mii attach: give a deployment name or host:port (see: mii list)")
        try:
            target = client(name)
        except DeploymentNotFoundError as err:
            raise UsageError(f"%mii attach: {err}") from None
        try:
            healthy = target.is_healthy(timeout=5.0)
            model = target.model_info().model if healthy else None
        except (MiiError, TimeoutError) as err:  # a refused key, gone, or too slow to answer
            target.close()
            raise UsageError(f"%mii attach: {err}") from None
        if not healthy:
            target.close()
            raise UsageError(f"%mii attach: the deployment at {target.address} does not answer")
        self._release()
        self.client, self.attached_name = target, name
        where = target.deployment_name or target.address
        print(f"[mii] attached to deployment {where!r} at {target.address} ({model})", flush=True)

    def _release(self, verbose: bool = False) -> None:
        """Free the in-process model, or forget the deployment (which keeps running)."""
        if self.model is not None:
            model, self.model = self.model, None
            model.close()
            if verbose:
                print(f"[mii] unloaded {model.name}", flush=True)
        elif self.client is not None:
            client, self.client = self.client, None
            self.attached_name, self._deployment_tokenizer = None, None
            # (a deployment stopped meanwhile was said to keep running)
            try:
                running = verbose and client.is_healthy(timeout=2.0)
            except MiiError:  # it answered, refusing the key: it is there
                running = True
            client.close()
            if verbose:
                where = client.deployment_name or client.address
                state = "it keeps running" if running else "it does not answer any more"
                print(f"[mii] detached from {where} ({state})", flush=True)
        elif verbose:
            print("[mii] nothing to unload", flush=True)

    def _status(self) -> str:
        if self.model is not None:
            return f"[mii] using {self.model.name}, loaded in this kernel"
        if self.client is not None:
            where = self.client.deployment_name or self.client.address
            return f"[mii] using deployment {where!r} at {self.client.address}"
        return f"[mii] {NO_MODEL}"

    def _generate(self, prompt: str, params: dict[str, Any], chat: bool = False) -> None:
        if self.model is None and self.client is None:
            raise UsageError(NO_MODEL)
        if not prompt.strip():
            raise UsageError("%%mii: the cell is empty; write the prompt in the cell")
        if chat:  # (a model without a template: the OpenAI route's fallback text)
            from mii.demo import chat_prompt_ids

            try:
                prompt = chat_prompt_ids(self._chat_tokenizer(), prompt)
            except MiiError as err:  # the template refused the turn
                raise UsageError(f"%mii --chat: {err}") from None
        source = self.model if self.model is not None else self.client
        try:  # a client checks the options at once, before the first piece
            pieces = source.stream(prompt, **params)
        except MiiError as err:
            raise UsageError(str(err)) from None
        text = []
        try:
            for piece in pieces:
                print(piece.generated_text, end="", flush=True)
                text.append(piece.generated_text)
        except MiiError as err:  # a bad option, or the deployment went away
            raise UsageError(str(err)) from None
        except KeyboardInterrupt:
            # Abort the request now (the traceback IPython keeps would hold the stream
            # open), then let the interrupt stop the cell, as it stops any other code.
            pieces.close()
            print(" [interrupted]", flush=True)
            raise
        finally:
            self.last_text = "".join(text)
        print(flush=True)

    def _chat_tokenizer(self):
        """The tokenizer whose chat template ``--chat`` applies: the loaded model's, or
        the attached deployment's (loaded here from its record, once)."""
        if self.model is not None:
            return self.model.engine.tokenizer
        if self._deployment_tokenizer is None:
            from mii.rpc.deployment_tokenizer import recorded_chat_tokenizer

            self._deployment_tokenizer = recorded_chat_tokenizer(self.attached_name or "")
        return self._deployment_tokenizer

    def close(self) -> None:
        self._release()


_LINE_MAGIC_ASKING = re.compile(r"^(\s*)%mii(\s.*\?)\s*$")


def keep_questions(lines: list[str]) -> list[str]:
    """An input transformer: ``%mii ... France?`` as a call of the magic. IPython
    reads a line ending with ``?`` as a request for help on its last word (it printed
    "Object `France` not found." and never ran the magic), and prompts are often
    questions. Only lines that start a statement with ``%mii`` change (IPython's own
    tokenizer says which: not a line inside a string), and no line of a cell magic's
    body (``%%mii``, ``%%bash``, ...)."""
    if not lines or lines[0].lstrip().startswith("%%"):
        return lines
    if not any(_LINE_MAGIC_ASKING.match(line) for line in lines):
        return lines  # (the usual cell: no tokenizing)
    from IPython.core.inputtransformer2 import make_tokens_by_line

    kept = list(lines)
    for tokens in make_tokens_by_line(lines):
        words = [t for t in tokens if t.string.strip()]
        if len(words) < 2 or (words[0].string, words[1].string) != ("%", "mii"):
            continue
        at = words[0].start[0] - 1
        body = lines[at].rstrip("\n")
        asking = _LINE_MAGIC_ASKING.match(body)
        if asking:
            indent, rest = asking.groups()
            call = f"get_ipython().run_line_magic('mii', {rest.strip()!r})"
            kept[at] = indent + call + lines[at][len(body) :]
    return kept


_magics: MiiMagics | None = None


def load_ipython_extension(ipython) -> None:
    """``%load_ext mii``: register ``%mii`` and ``%%mii``."""
    global _magics
    if _magics is None or _magics.shell is not ipython:
        _magics = MiiMagics(ipython)
    ipython.register_magics(_magics)
    # Before IPython's own transforms (help syntax among them), once.
    if keep_questions not in ipython.input_transformers_cleanup:
        ipython.input_transformers_cleanup.append(keep_questions)


def unload_ipython_extension(ipython) -> None:
    """``%unload_ext mii``: free the model (a deployment keeps running)."""
    global _magics
    if keep_questions in ipython.input_transformers_cleanup:
        ipython.input_transformers_cleanup.remove(keep_questions)
    if _magics is not None:
        _magics.close()
        _magics = None
