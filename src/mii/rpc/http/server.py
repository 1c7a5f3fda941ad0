"""Running the gateway: bind its port, serve the app with uvicorn inside the
deployment's event loop, and stop it again.

``start_gateway`` binds the port before anything else, so that a taken port
fails fast with a GatewayError that names it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
import time
from dataclasses import dataclass

import uvicorn
from fastapi import FastAPI

from mii.errors import MiiError
from mii.rpc import mii_pb2
from mii.rpc.deployment_config import DeploymentConfig
from mii.rpc.http.app import build_app
from mii.rpc.http.auth import AccessPolicy
from mii.rpc.http.connections import close_unstarted, uvicorn_options
from mii.rpc.http.sampling_defaults import gateway_sampling_defaults
from mii.rpc.http.state import GatewayState
from mii.rpc.listen import host_port
from mii.rpc.pool import ReplicaPool

log = logging.getLogger(__name__)

GRACEFUL_SHUTDOWN_S = 2.0  # open streams get this long to finish when the deployment stops
START_TIMEOUT_S = 30


class GatewayError(MiiError, RuntimeError):
    """The REST gateway could not start (for example: its port is taken)."""


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the deployment process
    (uvicorn would otherwise take over SIGINT/SIGTERM from the event loop)."""

    def capture_signals(self):
        return contextlib.nullcontext()


@dataclass(eq=False)
class Gateway:
    """A running gateway; ``await stop()`` shuts it down."""

    app: FastAPI
    server: uvicorn.Server
    task: asyncio.Task
    host: str
    port: int

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
        # No handler may be left waiting for a body that will never come: uvicorn
        # would cancel it at the end of its grace period (a 500 and a traceback).
        close_unstarted(self.server.server_state.connections)
        self.server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(self.task), GRACEFUL_SHUTDOWN_S + 5)
        except asyncio.TimeoutError:
            self.server.force_exit = True
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        except Exception as err:  # the server already failed; nothing left to stop
            log.warning("REST gateway ended with %s: %s", type(err).__name__, err)


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port, or a GatewayError that names the port."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except OSError as err:
        raise GatewayError(f"cannot resolve the REST API host {host!r}: {err}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise GatewayError(
            f"cannot listen on {host_port(host, port)} for the HTTP API "
            f"(is restful_api_port {port} in use? mii serve: --port): {err.strerror or err}"
        ) from None
    sock.setblocking(False)
    return sock


def load_gateway_tokenizer(config: DeploymentConfig):
    """The deployment model's tokenizer (chat templates), without its weights; with the
    deployment's ``chat_template``, when it has one, in place of the tokenizer's own
    (every route that applies a chat template uses it)."""
    from mii.rpc.deployment_tokenizer import load_chat_tokenizer

    return load_chat_tokenizer(config.engine_config(), config.chat_template)


async def start_gateway(
    pool: ReplicaPool,
    info: mii_pb2.ModelInfoReply,
    config: DeploymentConfig,
    sock: socket.socket | None = None,
) -> Gateway:
    """Serve the REST API on the deployment's host and ``restful_api_port`` inside
    the running event loop; return once it accepts connections. Raises
    GatewayError (naming the port) if it cannot listen."""
    host, port = config.host, config.restful_api_port
    if sock is None:  # the deployment binds it before loading the model; else bind first here
        sock = bind_socket(host, port)
    try:
        tokenizer = await asyncio.to_thread(load_gateway_tokenizer, config)
        defaults = await asyncio.to_thread(gateway_sampling_defaults, config)
        state = GatewayState(
            pool=pool,
            deployment_name=info.deployment_name or config.deployment_name,
            model=info.model or config.model,
            served_model_names=list(config.served_model_name or ()),
            tool_call_parser=config.tool_call_parser,
            sampling_defaults=defaults,
            max_length=info.max_length,
            tokenizer=tokenizer,
            created=int(time.time()),
            access=AccessPolicy.of(config),
            max_request_bytes=config.max_request_bytes,
            max_queued_requests=config.max_queued_requests,
            replicas=config.replica_num,
        )
        app = build_app(state)
        server = _Server(
            uvicorn.Config(
                app,
                log_config=None,  # leave the process's logging alone (see _show_uvicorn_logs)
                log_level=config.uvicorn_log_level,
                access_log=config.log_requests,
                lifespan="off",
                timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
                **uvicorn_options(
                    config.http_header_timeout,
                    config.http_keep_alive_timeout,
                    config.http_max_connections,
                    on_refused=pool.metrics.rejected.labels("connections").inc,
                ),
            )
        )
        _show_uvicorn_logs(config.log_requests)  # after uvicorn.Config has set its levels
        task = asyncio.create_task(server.serve(sockets=[sock]), name="mii-rest-gateway")
        await _until_started(server, task, f"{host}:{port}")
    except BaseException:
        sock.close()
        raise
    log.info("REST gateway serving on %s:%d", host, port)
    return Gateway(app, server, task, host, port)


def _show_uvicorn_logs(access_log: bool) -> None:
    """Send uvicorn's log lines to standard error (the process's logging has no
    handler of its own, under which Python prints only warnings and worse), the
    access log's too when asked, whatever the level of the others."""
    if access_log:
        logging.getLogger("uvicorn.access").setLevel(logging.INFO)
    logger = logging.getLogger("uvicorn")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("[mii http] %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False


async def _until_started(server: uvicorn.Server, task: asyncio.Task, where: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while not server.started:
        if task.done():
            err = task.exception() if not task.cancelled() else None
            raise GatewayError(f"the REST gateway on {where} failed to start: {err!r}")
        if time.monotonic() > deadline:
            task.cancel()
            raise GatewayError(f"the REST gateway on {where} did not start in {START_TIMEOUT_S} s")
        await asyncio.sleep(0.01)
