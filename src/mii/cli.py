"""The ``mii`` command line (also ``python -m mii``).

    mii serve MODEL [options]            run a deployment in the foreground (Ctrl-C stops it)
    mii generate [MODEL|DEPLOYMENT] ...  stream text from a deployment, or from a model in-process
    mii list                             running deployments on this machine
    mii terminate NAME                   stop a running deployment
    mii demo                             the built-in demo model, end to end

Every subcommand documents its options under ``--help``. The option helpers
(:func:`add_engine_options`, :func:`add_generation_options`) are shared with the
Jupyter magics in :mod:`mii.magic`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from collections.abc import Iterable
from typing import Any

DEFAULT_PROMPTS = ["DeepSpeed is", "Seattle is"]
DEFAULT_MAX_NEW_TOKENS = 48

# Engine options exposed on the command line: flag name -> EngineConfig field.
ENGINE_OPTIONS = (
    "dtype",
    "device",
    "max_length",
    "kv_block_size",
    "kv_cache_dtype",
    "num_kv_blocks",
    "token_budget",
    "max_num_seqs",
    "load_format",
    "trust_remote_code",
)


class CliError(Exception):
    """A user-facing failure: printed as one ``mii <command>: error: ...`` line."""


# ----- shared option groups -------------------------------------------------------


def add_engine_options(parser: argparse.ArgumentParser) -> None:
    """Engine options (validated by ``mii.EngineConfig``); unset ones keep its defaults."""
    group = parser.add_argument_group("engine options")
    group.add_argument(
        "--dtype",
        choices=["auto", "float32", "float16", "bfloat16"],
        default=None,
        help="weight and activation dtype (default: auto, the checkpoint's)",
    )
    group.add_argument(
        "--device",
        default=None,
        metavar="DEVICE",
        help="torch device: cuda, cuda:1, cpu... (default: cuda if any)",
    )
    group.add_argument(
        "--max-length",
        type=int,
        metavar="N",
        default=None,
        help="engine-wide cap on prompt + response tokens (default: the model config's)",
    )
    group.add_argument(
        "--kv-block-size",
        type=int,
        metavar="N",
        default=None,
        help="tokens per KV cache block (default: 16)",
    )
    group.add_argument(
        "--kv-cache-dtype",
        choices=["auto", "fp8"],
        default=None,
        help="KV cache dtype: auto (the activations') or fp8 (e4m3, half the memory)",
    )
    group.add_argument(
        "--num-kv-blocks",
        type=int,
        metavar="N",
        default=None,
        help="size of the KV block pool (default: sized from free memory)",
    )
    group.add_argument(
        "--token-budget",
        type=int,
        metavar="N",
        default=None,
        help="tokens per forward pass, Dynamic SplitFuse (default: 1024)",
    )
    group.add_argument(
        "--max-num-seqs",
        type=int,
        metavar="N",
        default=None,
        help="sequences per forward pass (default: 128)",
    )
    group.add_argument(
        "--load-format",
        choices=["auto", "safetensors", "pt", "dummy"],
        default=None,
        help="checkpoint format; dummy = random weights of the real shapes (default: auto)",
    )
    group.add_argument(
        "--trust-remote-code",
        action="store_true",
        default=None,
        help="allow the checkpoint's own Python code, as in transformers",
    )


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    """The engine options given on the command line (unset ones are left out)."""
    return {k: getattr(args, k) for k in ENGINE_OPTIONS if getattr(args, k, None) is not None}


def add_generation_options(
    parser: argparse.ArgumentParser, max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
) -> None:
    """Per-request generation options (validated by ``mii.GenerateParams``)."""
    group = parser.add_argument_group("generation options")
    group.add_argument(
        "--max-new-tokens",
        type=int,
        metavar="N",
        default=max_new_tokens,
        help=f"maximum tokens to generate per prompt (default: {max_new_tokens})",
    )
    group.add_argument(
        "--min-new-tokens",
        type=int,
        metavar="N",
        default=None,
        help="generate at least N tokens before end-of-sequence may stop",
    )
    group.add_argument(
        "--ignore-eos",
        action="store_true",
        help="keep generating past end-of-sequence (always max-new-tokens tokens)",
    )
    group.add_argument(
        "--greedy",
        action="store_true",
        help="greedy decoding (most likely token) instead of sampling",
    )
    group.add_argument(
        "--seed",
        type=int,
        metavar="N",
        default=None,
        help="seed for reproducible sampling (default: random)",
    )
    group.add_argument(
        "--temperature",
        type=float,
        metavar="T",
        default=None,
        help="rescale logits; 0 means greedy",
    )
    group.add_argument(
        "--top-p",
        type=float,
        metavar="P",
        default=None,
        help="nucleus sampling threshold in (0, 1] (default: 0.9)",
    )
    group.add_argument(
        "--top-k",
        type=int,
        metavar="K",
        default=None,
        help="sample only among the k most likely tokens",
    )
    group.add_argument(
        "--stop",
        action="append",
        default=None,
        metavar="TEXT",
        help="stop string; the text ends before it (repeatable)",
    )


def generation_params(args: argparse.Namespace) -> dict[str, Any]:
    """Generation options as keyword arguments of ``stream``/``generate``."""
    params: dict[str, Any] = {"max_new_tokens": args.max_new_tokens}
    if args.greedy:
        params["do_sample"] = False
    if args.ignore_eos:
        params["ignore_eos"] = True
    for name in ("min_new_tokens", "seed", "temperature", "top_p", "top_k", "stop"):
        value = getattr(args, name, None)
        if value is not None:
            params[name] = value
    return params


# ----- mii serve ------------------------------------------------------------------


def _serve(args: argparse.Namespace) -> int:
    from mii.rpc.deployment import run_deployment
    from mii.rpc.deployment_config import DeploymentConfig
    from mii.rpc.event_loop import run_event_loop

    try:
        config = DeploymentConfig.parse(
            args.model,
            deployment_name=args.deployment_name,
            tensor_parallel=args.tensor_parallel,
            device_map=args.device_map,
            replica_num=args.replica_num,
            enable_restful_api=args.enable_restful_api,
            restful_api_port=args.restful_api_port,
            port=args.port,
            host=args.host,
            startup_timeout=args.startup_timeout,
            **engine_options(args),
        )
    except (ValueError, NotImplementedError, RuntimeError) as err:
        raise CliError(str(err)) from None
    name = config.deployment_name
    print(
        f"[mii] starting deployment {name!r}: {config.model}, "
        f"{config.replica_num} replica(s) (Ctrl-C stops it)",
        file=sys.stderr,
        flush=True,
    )

    # Until the event loop takes the signals over, SIGTERM stops like Ctrl-C.
    def interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    try:
        stopped_by_signal = _run_returning(run_event_loop, _foreground(config, run_deployment))
    except KeyboardInterrupt:
        stopped_by_signal = True
    except Exception as err:
        lines = str(err).strip().splitlines() or [type(err).__name__]
        message = lines[0]
        if len(lines) > 1:
            from mii.rpc import registry

            message += f" (details in {registry.registry_dir()})"
        raise CliError(message) from None
    why = "on a signal" if stopped_by_signal else "by a terminate request"
    print(f"[mii] deployment {name!r} stopped {why}", file=sys.stderr, flush=True)
    return 0


def _run_returning(runner, coro) -> Any:
    """``runner(coro)`` (which returns nothing), returning the coroutine's result."""
    box: list[Any] = [None]

    async def keep() -> None:
        box[0] = await coro

    runner(keep())
    return box[0]


async def _foreground(config, run_deployment) -> bool:
    """Run the deployment until SIGINT/SIGTERM (returns True) or a Terminate RPC
    (returns False). A signal during start-up stops the start at once; once
    serving, it drains (in-flight calls get a grace period) and stops everything."""
    loop = asyncio.get_running_loop()
    task = asyncio.create_task(run_deployment(config))
    # Let the deployment install its own handlers first, then take them over: a
    # cancelled start-up also stops the replicas already started, where the
    # deployment's own handler would wait for them to finish loading.
    await asyncio.sleep(0)
    signalled = False

    def on_signal() -> None:
        nonlocal signalled
        if signalled:
            print("[mii] already stopping...", file=sys.stderr, flush=True)
            return
        signalled = True
        print("\n[mii] stopping...", file=sys.stderr, flush=True)
        task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    announcer = asyncio.create_task(_announce(config.deployment_name))
    try:
        await task
    except asyncio.CancelledError:
        if not signalled:
            raise
    finally:
        announcer.cancel()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return signalled


async def _announce(name: str) -> None:
    """Print where the deployment serves, once it is recorded as ready."""
    from mii.rpc import registry

    while True:
        info = registry.lookup(name)
        if info is not None and info.get("pid") == os.getpid():
            break
        await asyncio.sleep(0.1)
    address = f"{info['host']}:{info['port']}"
    print(f"[mii] gRPC: {address}  (mii.client({name!r}), mii generate {name!r})", flush=True)
    if info.get("restful_api_port"):
        base = f"http://{info['host']}:{info['restful_api_port']}"
        print(f"[mii] REST: {base}/mii/{name}  (OpenAI API: {base}/v1)", flush=True)
    print("[mii] ready; press Ctrl-C to stop", flush=True)


# ----- mii generate / mii demo ----------------------------------------------------


def _find_deployment(target: str):
    """A client when ``target`` names a running deployment (registry name, model
    name with the default deployment name, or a ``host:port`` that answers)."""
    from mii.rpc import registry
    from mii.rpc.client import MiiClient

    for name in (target, f"{target}-mii-deployment"):
        info = registry.lookup(name)
        if info is not None:
            return MiiClient(f"{info['host']}:{info['port']}", name)
    host, sep, port = target.rpartition(":")
    if sep and host and port.isdigit() and not os.path.exists(target):
        client = MiiClient(target)
        if client.is_healthy(timeout=5.0):
            return client
        client.close()
        raise CliError(f"no mii deployment answers at {target}")
    return None


def _generate(args: argparse.Namespace) -> int:
    from mii.config import GenerateParams

    prompts = [*args.prompt_args, *(args.prompt or [])] or DEFAULT_PROMPTS
    params = generation_params(args)
    GenerateParams.parse(**params)  # bad options fail before any loading
    client = _find_deployment(args.model) if args.model else None
    if client is not None:
        if engine_options(args):
            print("[mii] engine options are ignored for a running deployment", file=sys.stderr)
        where = client.deployment_name or client.address
        print(f"[mii] generating with deployment {where!r} ({client.address})", file=sys.stderr)
        try:
            for prompt in prompts:
                _print_stream(prompt, client.stream(prompt, **params))
        finally:
            client.close()
        return 0
    model = args.model
    if model is None:
        from mii.demo import demo_model_path

        model = str(demo_model_path())
        print(f"[mii] no model given: using the built-in demo model ({model}).", file=sys.stderr)
        print("[mii] its weights are random, so its text is random too.", file=sys.stderr)
    return _generate_in_process(model, engine_options(args), prompts, params)


def _generate_in_process(
    model: str, options: dict[str, Any], prompts: list[str], params: dict[str, Any]
) -> int:
    import mii

    engine = mii.AsyncEngine(model, **options)

    async def run() -> None:
        try:
            for prompt in prompts:
                start, count = _start(prompt)
                async for piece in engine.stream(prompt, **params):
                    count = _emit(piece)
                _report(count, start)
        finally:
            await engine.aclose()

    asyncio.run(run())
    return 0


def _start(prompt: str) -> tuple[float, int]:
    print(prompt, end="", flush=True)
    return time.perf_counter(), 0


def _emit(piece) -> int:
    print(piece.generated_text, end="", flush=True)
    return piece.generated_length


def _report(count: int, start: float) -> None:
    elapsed = time.perf_counter() - start
    print(flush=True)
    print(f"[mii] {count} tokens in {elapsed:.2f} s", file=sys.stderr, flush=True)


def _print_stream(prompt: str, pieces: Iterable) -> None:
    start, count = _start(prompt)
    for piece in pieces:
        count = _emit(piece)
    _report(count, start)


def _demo(args: argparse.Namespace) -> int:
    args.model = None
    args.prompt_args = []
    return _generate(args)


# ----- mii list / mii terminate ---------------------------------------------------


def _list(args: argparse.Namespace) -> int:
    from mii.rpc import registry

    deployments = registry.list_deployments()
    if args.json:
        print(json.dumps(deployments, indent=2))
        return 0
    if not deployments:
        print("no running deployments (start one with: mii serve MODEL)")
        return 0
    rows = [("NAME", "ADDRESS", "MODEL", "REPLICAS", "REST")]
    for d in deployments:
        rest = f"http://{d['host']}:{d['restful_api_port']}" if d.get("restful_api_port") else "-"
        rows.append(
            (
                d["deployment_name"],
                f"{d['host']}:{d['port']}",
                str(d.get("model", "?")),
                str(d.get("replica_num", "?")),
                rest,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1])
    return 0


def _terminate(args: argparse.Namespace) -> int:
    from mii.rpc.client import DeploymentNotFoundError, client

    try:
        target = client(args.name)
    except DeploymentNotFoundError:
        raise CliError(f"no running deployment named {args.name!r} (see: mii list)") from None
    if target.deployment_name is None and not target.is_healthy(timeout=5.0):
        raise CliError(f"no mii deployment answers at {args.name}")
    try:
        target.terminate_server(timeout=args.timeout)
    except TimeoutError as err:
        raise CliError(str(err)) from None
    finally:
        target.close()
    print(f"terminated {target.deployment_name or target.address}")
    return 0


# ----- parser ---------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from mii import __version__

    parser = argparse.ArgumentParser(
        prog="mii",
        description="Fast LLM inference: serve models, generate text, manage deployments.",
    )
    parser.add_argument("--version", action="version", version=f"mii {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "serve",
        help="run a deployment in the foreground (Ctrl-C stops it)",
        description="Run a persistent deployment (gRPC load balancer, replicas and optionally "
        "the REST/OpenAI gateway) in the foreground until Ctrl-C, SIGTERM or mii terminate.",
    )
    p.add_argument(
        "model", metavar="MODEL", help="Hugging Face hub id or local checkpoint directory"
    )
    p.add_argument(
        "--deployment-name",
        default=None,
        metavar="NAME",
        help="name clients use to find it (default: MODEL-mii-deployment)",
    )
    p.add_argument(
        "--port", type=int, default=50050, metavar="PORT", help="gRPC port (default: 50050)"
    )
    p.add_argument(
        "--host",
        default="127.0.0.1",
        metavar="HOST",
        help="address to listen on (default: 127.0.0.1)",
    )
    p.add_argument(
        "--replica-num",
        type=int,
        default=1,
        metavar="N",
        help="copies of the model, load-balanced (default: 1)",
    )
    p.add_argument(
        "--tensor-parallel",
        type=int,
        default=1,
        metavar="N",
        help="ranks (GPUs) each replica's model is split over (default: 1)",
    )
    p.add_argument(
        "--device-map",
        type=lambda text: [int(x) for x in text.split(",")],
        default=None,
        metavar="GPUS",
        help="comma-separated GPU indices the deployment uses, replica after replica "
        "(default: 0, 1, ...)",
    )
    p.add_argument(
        "--enable-restful-api",
        action="store_true",
        help="also serve the REST API (/mii/NAME) and the OpenAI-compatible API (/v1)",
    )
    p.add_argument(
        "--restful-api-port",
        type=int,
        default=28080,
        metavar="PORT",
        help="REST API port (default: 28080)",
    )
    p.add_argument(
        "--startup-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="seconds to wait for the replicas to load (default: 600)",
    )
    add_engine_options(p)
    p.set_defaults(func=_serve)

    p = sub.add_parser(
        "generate",
        help="stream generated text to the terminal",
        description="Stream text from a running deployment when MODEL names one (deployment "
        "name, model name or host:port), else load MODEL in this process. Without MODEL: "
        "the built-in demo model (random weights, random text).",
    )
    p.add_argument(
        "model",
        nargs="?",
        default=None,
        metavar="MODEL_OR_DEPLOYMENT",
        help="deployment name, host:port, hub id or local path (default: the demo model)",
    )
    p.add_argument(
        "prompt_args",
        nargs="*",
        default=[],
        metavar="PROMPT",
        help="prompt text (each one a separate request)",
    )
    p.add_argument(
        "--prompt",
        action="append",
        default=None,
        metavar="TEXT",
        help=f"prompt text, repeatable (default: {' / '.join(DEFAULT_PROMPTS)})",
    )
    add_generation_options(p)
    add_engine_options(p)
    p.set_defaults(func=_generate)

    p = sub.add_parser(
        "list",
        help="list the running deployments on this machine",
        description="List running deployments: name, gRPC address, model, replicas, REST URL.",
    )
    p.add_argument("--json", action="store_true", help="print the records as JSON")
    p.set_defaults(func=_list)

    p = sub.add_parser(
        "terminate",
        help="stop a running deployment",
        description="Stop every process of a running deployment and wait until they are gone.",
    )
    p.add_argument("name", help="deployment name (see mii list), model name, or host:port")
    p.add_argument(
        "--timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="seconds to wait for its processes to exit (default: 60)",
    )
    p.set_defaults(func=_terminate)

    p = sub.add_parser(
        "demo",
        help="run the built-in demo model end to end",
        description="Stream text from the built-in demo model (a tiny Llama with random "
        "weights, built and cached on first use: its text is random).",
    )
    p.add_argument(
        "--prompt",
        action="append",
        default=None,
        metavar="TEXT",
        help=f"prompt text, repeatable (default: {' / '.join(DEFAULT_PROMPTS)})",
    )
    add_generation_options(p)
    add_engine_options(p)
    p.set_defaults(func=_demo)
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


if __name__ == "__main__":
    sys.exit(main())
