"""Jupyter / IPython magics: stream generated text into the notebook.

    %load_ext mii
    %mii load MODEL [--max-length N ...]   load a model into this kernel (engine options)
    %mii attach NAME [--api-key KEY]       use a running deployment (name or host:port)
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

import difflib
import re
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class

from mii.cli.options import engine_options
from mii.config import EngineConfig
from mii.engine_thread import EngineThread
from mii.errors import MiiError
from mii.magic_line import split_args
from mii.magic_options import (
    COMMANDS,
    USAGE,
    HelpShown,
    attach_parser,
    generation_parser,
    load_parser,
    magic_params,
    split_line,
)

NO_MODEL = (
    "no model in use: run `%mii load MODEL` (a hub id or local path, loaded in this kernel) "
    "or `%mii attach NAME` (a running deployment) first"
)


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
        try:
            if cell is not None:
                args = generation_parser("%%mii").parse_args(split_args(line))
                self._generate(cell.rstrip("\n"), magic_params(args), args.chat)
                return
            command, _, rest = line.strip().partition(" ")
            if command in ("", "help", "-h", "--help") and not rest.strip():
                print(self._status())
                print(USAGE)
                if command in ("-h", "--help"):
                    print(generation_parser("%mii").format_help())
            elif command in COMMANDS:
                self._command(command, rest.strip())
            elif not rest and (near := difflib.get_close_matches(command, COMMANDS, 1, 0.85)):
                # "%mii unlod" generated 128 tokens from the prompt "unlod"
                raise UsageError(
                    f"%mii: did you mean `%mii {near[0]}`? (a prompt of that one word: "
                    f"%mii -- {command})"
                )
            else:
                options, prompt = split_line(line)
                args = generation_parser("%mii").parse_args(options)
                if not prompt:
                    raise UsageError("%mii: no prompt given")
                self._generate(prompt, magic_params(args), args.chat)
        except HelpShown:
            pass

    mii.__doc__ = f"""Load a model or attach to a deployment, then stream generated text.

{USAGE}"""

    def _command(self, command: str, rest: str) -> None:
        if command in ("unload", "detach", "help") and rest:
            # "%mii unload the truck please" freed the model in use and said so;
            # "%mii help me write a poem" printed the usage.
            raise UsageError(
                f"%mii {command} takes nothing after it; a prompt that starts with "
                f"{command!r}: %mii -- {command} {rest}"
            )
        try:
            if command == "load":
                self._load(rest)
            elif command == "attach":
                self._attach(rest)
            else:  # unload, detach (help alone is answered by the magic itself)
                self._release(verbose=True)
        except UsageError as err:
            # (not for a misspelt option: "did you mean --max-length?" is the answer)
            unrecognized = re.search(r"unrecognized arguments: (\S+)", str(err))
            if (unrecognized and not unrecognized.group(1).startswith("-")) or (
                "no running deployment" in str(err)
            ):
                raise UsageError(
                    f"{err} (a prompt that starts with {command!r}: %mii -- {command} {rest})"
                ) from None
            raise

    # ----- commands -------------------------------------------------------------

    def _load(self, rest: str) -> None:
        from mii.models.loader import check_model

        args = load_parser().parse_args(split_args(rest))
        # What can be checked without loading is checked before the model in use is
        # freed (a load needs its memory): a typo in a path, a hub id, a file that is
        # not a checkpoint, an option or a device keeps it.
        try:
            config = EngineConfig.parse(args.model, **engine_options(args))
            check_model(args.model, config.revision, config.device, config.max_length)
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

    def _attach(self, rest: str) -> None:
        from mii.errors import AmbiguousDeploymentError
        from mii.rpc.client import DeploymentNotFoundError, client

        if not rest:
            raise UsageError("%mii attach: give a deployment name or host:port (see: mii list)")
        args = attach_parser().parse_args(split_args(rest))
        try:
            target = client(args.name, api_key=args.api_key)
        except (DeploymentNotFoundError, AmbiguousDeploymentError) as err:
            raise UsageError(f"%mii attach: {err}") from None
        try:
            healthy = target.is_healthy(timeout=5.0)
            # not healthy: why, from a call (an HTTP port, a deployment still starting)
            model = target.model_info().model
        except (MiiError, TimeoutError) as err:  # a refused key, gone, or too slow to answer
            target.close()
            raise UsageError(f"%mii attach: {err}") from None
        if not healthy:
            target.close()
            raise UsageError(f"%mii attach: the deployment at {target.address} does not answer")
        self._release()
        self.client, self.attached_name = target, args.name
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
        except KeyboardInterrupt:  # (it stops the cell, as it stops any other code)
            print(" [interrupted]", flush=True)
            raise
        finally:
            # Abort the request now if it did not end (an interrupt, an output that
            # failed): the traceback IPython keeps would hold the stream open, and the
            # model would generate the answer to its end for nobody.
            pieces.close()
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
    # Unregistered too: %mii left in place loaded models into the closed instance,
    # which a later %load_ext replaced without freeing them.
    magics = ipython.magics_manager.magics
    for kind in ("line", "cell"):
        magics[kind].pop("mii", None)
    ipython.magics_manager.registry.pop(MiiMagics.__name__, None)
    if _magics is not None:
        _magics.close()
        _magics = None
