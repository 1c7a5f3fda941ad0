"""``mii serve``: run a deployment in the foreground until Ctrl-C, SIGTERM or a
Terminate request."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import sys
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from mii.cli.errors import CliError
from mii.cli.options import (
    SERVE_ENGINE_OPTIONS,
    add_deployment_options,
    add_engine_options,
    deployment_options,
    engine_options,
)
from mii.cli.vllm_flags import add_vllm_flags, check_vllm_flags
from mii.rpc.deployment_config import DeploymentConfig

if TYPE_CHECKING:
    from mii.demo import DemoModel


def add_serve_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "serve",
        help="run a deployment in the foreground (Ctrl-C stops it)",
        description="Run a persistent deployment in the foreground until Ctrl-C, SIGTERM or "
        "mii terminate: the OpenAI-compatible HTTP API (/v1) and mii's REST route on --port "
        "(8000), the gRPC service on --grpc-port (50050). Flags follow vllm serve where "
        "the meaning is the same (--max-model-len, --tensor-parallel-size, ...; "
        "see docs/cli.md).",
    )
    parser.add_argument(
        "model",
        metavar="MODEL",
        nargs="?",
        default=None,
        help=DeploymentConfig.model_fields["model"].description
        + " (default: the demo model, deployment name mii-demo)",
    )
    parser.add_argument(  # vllm serve's and its api_server's older form
        "--model",
        dest="model_option",
        metavar="MODEL",
        help="the same as MODEL (accepted for vllm serve's command lines)",
    )
    add_deployment_options(parser)
    parser.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help="accepted for vllm serve's command lines: tool_choice 'auto' is on whenever "
        "--tool-call-parser is given (this flag without it is an error)",
    )
    add_vllm_flags(parser)
    add_engine_options(parser, SERVE_ENGINE_OPTIONS)
    parser.set_defaults(func=serve)


def _model_argument(args: argparse.Namespace) -> str | None:
    """MODEL, given positionally or as ``--model`` (not both, unless the same)."""
    given = getattr(args, "model_option", None)
    if given is not None and args.model is not None and given != args.model:
        raise CliError(f"two models given: {args.model!r} and --model {given!r}; give one")
    return args.model if args.model is not None else given


def serve_config(args: argparse.Namespace) -> DeploymentConfig:
    """The deployment that ``mii serve``'s arguments describe (validated)."""
    model, options = _model_argument(args), deployment_options(args)
    if model is None:
        demo = _demo_model()
        model = demo.path
        options.setdefault("deployment_name", "mii-demo")
        # the model's name in the OpenAI API, not the wheel's file path (which, and
        # the deployment name, requests may still give)
        options.setdefault("served_model_name", [demo.served_name])
        if demo.real:  # its model card's sampling, as mii demo uses, for OpenAI clients
            from mii.demo import demo_generation_config_dir

            options.setdefault("generation_config", str(demo_generation_config_dir()))
    check_vllm_flags(args)
    if getattr(args, "enable_auto_tool_choice", False) and "tool_call_parser" not in options:
        raise CliError(
            "--enable-auto-tool-choice needs --tool-call-parser (hermes, llama3_json, mistral)"
        )
    try:
        return DeploymentConfig.parse(
            model, **options, **engine_options(args, SERVE_ENGINE_OPTIONS)
        )
    except (ValueError, NotImplementedError, RuntimeError) as err:
        raise _naming_the_flag(err) from None


def _naming_the_flag(err: Exception) -> CliError:
    # (mii.cli.commands names the flag as typed: --port, -dp, --data-parallel-size)
    return CliError(str(err), field=getattr(err, "field", None))


def serve(args: argparse.Namespace) -> int:
    from mii.rpc.event_loop import run_event_loop
    from mii.rpc.lasting_output import outlast_readers

    # Ctrl-C also ends `| tee`, and a closed terminal fails every write: the drain
    # that follows must not fail on its messages (it cut the streams it let finish).
    outlast_readers()
    config = serve_config(args)
    if config.on_ray:  # replicas on a Ray cluster (docs/multi_node.md)
        from mii.ray_backend import require_ray
        from mii.ray_backend.application import check_scaling
        from mii.ray_backend.deployment import run_ray_deployment as run_deployment

        try:
            require_ray()
        except Exception as err:
            raise CliError(str(err)) from None
        try:
            check_scaling(config)  # (mii.serve's launcher checks it; this path has none)
        except ValueError as err:
            raise _naming_the_flag(err) from None
    else:
        from mii.rpc.deployment import run_deployment
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


def _demo_model() -> DemoModel:
    from mii.demo import demo_model

    demo = demo_model()
    if demo.real:
        print(f"[mii] no MODEL given: serving the demo model {demo.name}", file=sys.stderr)
    else:
        print(
            f"[mii] no MODEL given and {demo.missing}; serving the {demo.name} meanwhile, "
            "whose text is random",
            file=sys.stderr,
        )
    return demo


def _run_returning(runner, coro) -> Any:
    """``runner(coro)`` (which returns nothing), returning the coroutine's result."""
    box: list[Any] = [None]

    async def keep() -> None:
        box[0] = await coro

    runner(keep())
    return box[0]


async def _foreground(config: DeploymentConfig, run_deployment) -> bool:
    """Run the deployment until SIGINT/SIGTERM/SIGHUP (returns True) or a Terminate RPC
    (returns False). A signal during start-up stops the start at once; once
    serving, it drains (in-flight calls get ``shutdown_grace_s``; a second signal
    ends them at once) and stops everything."""
    from mii.rpc.drain import ShutdownRequest, stop_signals

    loop = asyncio.get_running_loop()
    shutdown = ShutdownRequest()
    task = asyncio.create_task(run_deployment(config, shutdown))
    # Let the deployment install its own handlers first, then take them over: a
    # cancelled start-up also stops the replicas already started, where the
    # deployment's own handler would wait for them to finish loading.
    await asyncio.sleep(0)
    signalled = False

    def on_signal() -> None:
        nonlocal signalled
        serving = announcer.done() and not announcer.cancelled()
        if serving:  # drain: refuse new requests, let those in flight finish
            again = shutdown.stop.is_set()
            signalled = True
            shutdown.request()
            if again:
                _say("[mii] ending the requests in flight now...")
            else:
                grace = config.shutdown_grace_s
                _say(
                    f"\n[mii] stopping: in-flight requests get up to {grace:g} s "
                    "(Ctrl-C again ends them now)..."
                )
            return
        if signalled:
            _say("[mii] already stopping...")
            return
        signalled = True
        task.cancel()
        _say("\n[mii] stopping...")

    signals = stop_signals()
    for sig in signals:
        loop.add_signal_handler(sig, on_signal)
    announcer = asyncio.create_task(_announce(config))
    try:
        await task
    except asyncio.CancelledError:
        if not signalled:
            raise
    finally:
        announcer.cancel()
        for sig in signals:
            loop.remove_signal_handler(sig)
    return signalled


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)  # (lasting_output: whoever still reads)


async def _announce(config: DeploymentConfig) -> None:
    """Print where the deployment serves, once it is recorded as ready."""
    from mii.rpc import registry

    name = config.deployment_name
    while True:
        info = registry.lookup(name)
        if info is not None and info.get("pid") == os.getpid():
            break
        await asyncio.sleep(0.1)
    for line in banner(config, info):
        print(line, flush=True)


def banner(config: DeploymentConfig, info: dict[str, Any]) -> list[str]:
    """The lines that say where a ready deployment serves: the gRPC address, the
    OpenAI API's base URL and a request to paste into a shell."""
    from mii.rpc.listen import host_port

    name = config.deployment_name
    lines = [
        f"[mii] gRPC: {host_port(info['host'], info['port'])}  (mii.client({name!r}), "
        f"mii generate {name!r})"
    ]
    if info.get("restful_api_port"):
        host = info["host"]
        base = f"http://{host_port(host, info['restful_api_port'])}"
        model = (config.served_model_name or [config.model])[0]
        body = json.dumps({"model": model, "prompt": "San Francisco is", "max_tokens": 16})
        key = " -H 'Authorization: Bearer YOUR_API_KEY'" if info.get("api_key") else ""
        lines += [
            f"[mii] OpenAI API: {base}/v1  (model {model!r}; mii's REST route: "
            f"{base}/mii/{quote(name, safe='')})",
            f"[mii] try: curl {base}/v1/completions{key} -d {shlex.quote(body)}",
        ]
    lines.append("[mii] ready; press Ctrl-C to stop")
    return lines
