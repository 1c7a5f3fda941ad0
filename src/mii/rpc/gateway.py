"""The REST gateway of a deployment, served by uvicorn on the deployment's event loop.

Routes (every request goes through the same ``ReplicaPool`` as the gRPC balancer):

- ``POST /mii/{deployment_name}`` with ``{"prompts": [...] or "...", <generation options>}``
  returns a JSON list of responses (``generated_text``, ``prompt_length``,
  ``generated_length``, ``finish_reason``, ``token_ids``).
- ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions``: the
  OpenAI-compatible API (see :mod:`mii.rpc.openai_routes`).
- ``GET /health``: 200 ``{"status": "ok", ...}`` while a replica is healthy, else 503.
- ``GET /metrics``: the pool's Prometheus metrics.

A bad request is answered 4xx with a JSON error naming the problem, never 500:
``{"error": {"message", "field"}}`` on mii's routes, OpenAI's
``{"error": {"message", "type", "param", "code"}}`` under ``/v1``. No healthy
replica gives 503, a request that timed out 504.

A client that disconnects aborts its request: a stream's generator closes the
pool's stream (which cancels the replica's call), and a whole-answer request is
cancelled as soon as ``request.is_disconnected()`` turns true.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from mii.config import GenerateParams
from mii.errors import InvalidRequestError, MiiError
from mii.rpc import mii_pb2
from mii.rpc.pool import NoReplicaError, ReplicaPool

log = logging.getLogger(__name__)

T = TypeVar("T")

GRACEFUL_SHUTDOWN_S = 2.0  # open streams get this long to finish when the deployment stops
DISCONNECT_POLL_S = 0.25


class GatewayError(MiiError, RuntimeError):
    """The REST gateway could not start (for example: its port is taken)."""


# ----- errors ------------------------------------------------------------------


class ApiError(Exception):
    """An error answered with ``status`` and the route's error shape.

    ``param`` names the offending field (``field`` in mii's shape); ``code`` is
    OpenAI's machine-readable code (for example ``model_not_found``).
    """

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code


class ClientDisconnected(Exception):
    """The client left before its answer was ready; the generation was cancelled."""


def is_openai_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/")


def openai_error_body(
    message: str, status: int, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(request: Request, err: ApiError) -> JSONResponse:
    if is_openai_path(request.url.path):
        body = openai_error_body(err.message, err.status, err.param, err.code)
    else:
        body = {"error": {"message": err.message, "field": err.param}}
    return JSONResponse(body, status_code=err.status)


_UNION_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "null"}


def describe_validation_error(exc: RequestValidationError) -> tuple[str, str | None]:
    """One message (and the offending field, dotted) from FastAPI's error list."""
    first = exc.errors()[0]
    kind = first.get("type", "")
    loc = list(first.get("loc", ()))
    if loc and loc[0] in ("body", "path", "query", "header"):
        loc = loc[1:]
    if kind == "json_invalid":
        detail = (first.get("ctx") or {}).get("error") or first.get("msg", "")
        return f"the request body is not valid JSON: {detail}", None
    # Drop the tags pydantic adds for union members ("str", "list[str]", ...).
    parts = [
        str(p)
        for p in loc
        if isinstance(p, int) or ("[" not in p and "(" not in p and p.lower() not in _UNION_TAGS)
    ]
    field = ".".join(parts) or None
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if kind == "missing":
        return (f"missing required field {field!r}" if field else "the request body is missing"), (
            field
        )
    if kind == "extra_forbidden":
        return f"unknown field {field!r}", field
    if field is None:
        return f"the request body must be a JSON object ({msg})", None
    if "input" in first and kind != "value_error":
        msg = f"{msg} (got {first['input']!r})"
    return f"invalid value for {field!r}: {msg}", field


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return error_response(request, err)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, field = describe_validation_error(exc)
        return error_response(request, ApiError(400, message, field))

    @app.exception_handler(InvalidRequestError)
    async def _invalid(request: Request, err: InvalidRequestError):
        return error_response(request, ApiError(400, str(err), err.field))

    @app.exception_handler(NoReplicaError)
    async def _no_replica(request: Request, err: NoReplicaError):
        return error_response(request, ApiError(503, str(err), code="no_replica_available"))

    @app.exception_handler(TimeoutError)
    async def _timeout(request: Request, err: TimeoutError):
        return error_response(request, ApiError(504, f"the request timed out: {err}"))

    @app.exception_handler(MiiError)
    async def _mii_error(request: Request, err: MiiError):
        log.error("request failed: %s: %s", type(err).__name__, err)
        return error_response(request, ApiError(500, f"{type(err).__name__}: {err}"))

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, err: ClientDisconnected):
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path} on this server"
        return error_response(request, ApiError(exc.status_code, message))


# ----- helpers shared by the routes ----------------------------------------------


async def until_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """Await ``awaitable``, cancelling it (which aborts its generation) and raising
    ClientDisconnected if the client goes away first."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientDisconnected()
    finally:
        task.cancel()  # no-op once done; aborts the request when we leave early


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that always closes its body generator, so that its
    ``finally`` (which closes the pool's stream) runs at once when the client
    leaves, rather than whenever the generator is garbage-collected."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()


@dataclass
class GatewayState:
    """What every route needs, stored as ``app.state.mii``."""

    pool: ReplicaPool
    deployment_name: str
    model: str
    max_length: int
    tokenizer: Any  # a transformers tokenizer (chat templates)
    created: int  # start time, reported as the model's ``created``


def get_state(request: Request) -> GatewayState:
    return request.app.state.mii


# ----- mii's own route, health and metrics -------------------------------------------


class MiiRequest(BaseModel):
    """``prompts`` plus any generation options (validated by GenerateParams)."""

    model_config = ConfigDict(extra="allow")

    prompts: str | list[str]

    @field_validator("prompts", mode="before")
    @classmethod
    def _prompts_are_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value and all(isinstance(p, str) for p in value):
            return value
        raise ValueError("prompts must be a string or a non-empty list of strings")


def response_dict(response) -> dict[str, Any]:
    return {
        "generated_text": response.generated_text,
        "prompt_length": response.prompt_length,
        "generated_length": response.generated_length,
        "finish_reason": response.finish_reason,
        "token_ids": list(response.token_ids),
    }


def build_app(state: GatewayState) -> FastAPI:
    from mii.rpc import openai_routes  # imports this module's helpers

    app = FastAPI(title=f"mii: {state.deployment_name}", docs_url=None, redoc_url=None)
    app.state.mii = state
    install_error_handlers(app)

    @app.post("/mii/{deployment_name}")
    async def generate(deployment_name: str, body: MiiRequest, request: Request):
        if deployment_name != state.deployment_name:
            raise ApiError(
                404,
                f"no deployment named {deployment_name!r} here "
                f"(this server runs {state.deployment_name!r})",
                "deployment_name",
            )
        options = dict(body.model_extra or {})
        GenerateParams.parse(**options)  # InvalidRequestError -> 400 naming the field
        prompts = [body.prompts] if isinstance(body.prompts, str) else list(body.prompts)
        responses = await until_disconnected(request, state.pool.generate(prompts, options))
        return [response_dict(r) for r in responses]

    @app.get("/health")
    async def health():
        healthy = sum(r.healthy for r in state.pool.replicas)
        body = {
            "status": "ok" if healthy else "unavailable",
            "deployment": state.deployment_name,
            "model": state.model,
            "replicas": len(state.pool.replicas),
            "healthy_replicas": healthy,
        }
        return JSONResponse(body, status_code=200 if healthy else 503)

    @app.get("/metrics")
    async def metrics():
        return Response(
            generate_latest(state.pool.metrics.registry),
            headers={"Content-Type": CONTENT_TYPE_LATEST},
        )

    app.include_router(openai_routes.router)
    return app


# ----- server lifecycle ------------------------------------------------------------


class _Server(uvicorn.Server):
    """A uvicorn server that leaves signal handling to the deployment process
    (uvicorn would otherwise take over SIGINT/SIGTERM from the event loop)."""

    def capture_signals(self):
        return contextlib.nullcontext()


class Gateway:
    """A running gateway; ``await stop()`` shuts it down."""

    def __init__(self, app: FastAPI, server: uvicorn.Server, task: asyncio.Task, host, port):
        self.app = app
        self.server = server
        self.task = task
        self.host = host
        self.port = port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    async def stop(self) -> None:
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
            f"cannot listen on {host}:{port} for the REST API "
            f"(is restful_api_port {port} in use?): {err.strerror or err}"
        ) from None
    sock.setblocking(False)
    return sock


def load_gateway_tokenizer(config: dict[str, Any]):
    """The deployment model's tokenizer (chat templates), without its weights."""
    from mii.models.loader import load_tokenizer, resolve_model_dir

    options = config.get("engine_options") or {}
    model_dir = resolve_model_dir(config["model"], options.get("revision"), weights=False)
    return load_tokenizer(
        model_dir, options.get("tokenizer"), bool(options.get("trust_remote_code", False))
    )


async def start_gateway(
    pool: ReplicaPool, info: mii_pb2.ModelInfoReply, config: dict[str, Any]
) -> Gateway:
    """Serve the REST API on ``restful_api_host`` (default: the deployment's host)
    and ``restful_api_port`` inside the running event loop; return once it accepts
    connections. Raises GatewayError (naming the port) if it cannot listen."""
    host = config.get("restful_api_host") or config["host"]
    port = int(config["restful_api_port"])
    sock = bind_socket(host, port)  # first, so that a taken port fails fast
    try:
        tokenizer = await asyncio.to_thread(load_gateway_tokenizer, config)
        state = GatewayState(
            pool=pool,
            deployment_name=info.deployment_name or config["deployment_name"],
            model=info.model or config["model"],
            max_length=info.max_length,
            tokenizer=tokenizer,
            created=int(time.time()),
        )
        app = build_app(state)
        uv_config = uvicorn.Config(
            app,
            log_config=None,  # leave the process's logging alone
            log_level="warning",
            access_log=False,
            lifespan="off",
            timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
        )
        server = _Server(uv_config)
        task = asyncio.create_task(server.serve(sockets=[sock]), name="mii-rest-gateway")
        deadline = time.monotonic() + 30
        while not server.started:
            if task.done():
                err = task.exception() if not task.cancelled() else None
                raise GatewayError(f"the REST gateway on {host}:{port} failed to start: {err!r}")
            if time.monotonic() > deadline:
                task.cancel()
                raise GatewayError(f"the REST gateway on {host}:{port} did not start in 30 s")
            await asyncio.sleep(0.01)
    except BaseException:
        sock.close()
        raise
    log.info("REST gateway serving on %s:%d", host, port)
    return Gateway(app, server, task, host, port)
