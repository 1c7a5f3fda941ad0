"""How much of a request the gateway reads, and where it parses it.

- **Size**: a body longer than the deployment's ``max_request_bytes`` is refused
  with 413 (and the connection closed) before it is read: at once when its
  ``Content-Length`` says so, else as soon as the bytes received pass the limit
  (chunked bodies). Nothing beyond the limit is buffered. One exception: a declared
  length of at most ``DRAIN_FACTOR`` times the limit is read and dropped first,
  since clients that send a whole body before reading the answer (httpx's async
  client, the openai SDK's AsyncOpenAI) saw a reset connection instead of the 413.
- **Off the event loop**: a body of at least OFFLOAD_BYTES is parsed (JSON) and
  validated (the route's pydantic model) in a worker thread, so that a large
  body does not stall the deployment's other requests, gRPC included (they
  share one event loop). Smaller bodies are parsed in place, where a thread
  would cost more than it saves.

Both live in :class:`LimitedRoute`, the route class of the gateway's routers
(FastAPI's documented way to give routes a custom ``Request``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException

from mii.rpc.http.state import get_state

OFFLOAD_BYTES = 64 * 1024  # bodies at least this long are parsed in a worker thread
DRAIN_FACTOR = 2  # declared lengths up to this many limits are read (and dropped) for the 413

T = TypeVar("T")


class BodyRefused(HTTPException):
    """A body the gateway does not read on: too large (413) or invalid (400).
    ``param`` names the offending field, when there is one."""

    def __init__(
        self, status: int, message: str, param: str | None = None, close: bool = False
    ) -> None:
        super().__init__(status, message, headers={"connection": "close"} if close else None)
        self.param = param


def too_large(limit: int, close: bool = True) -> BodyRefused:
    # close: the rest of the body is never read, so the connection cannot go on
    return BodyRefused(
        413,
        f"the request body is larger than the limit of {limit} bytes "
        "(the deployment's max_request_bytes)",
        close=close,
    )


async def run_off_loop(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a worker thread (a seam tests use to see where work runs)."""
    return await asyncio.to_thread(fn, *args)


def parse_body(body: bytes, model: type[BaseModel] | None) -> Any:
    """``body`` as JSON, validated against ``model`` when there is one. A JSON
    error propagates (FastAPI answers it as invalid JSON); a validation error is
    a 400 naming the field, worded as FastAPI's own check would word it."""
    data = json.loads(body)
    if model is None:
        return data
    try:
        return model.model_validate(data)
    except ValidationError as err:
        from mii.rpc.http.errors import describe_validation_error

        errors = [{**e, "loc": ("body", *e["loc"])} for e in err.errors(include_url=False)]
        message, field = describe_validation_error(RequestValidationError(errors))
        raise BodyRefused(400, message, field) from None


class LimitedRequest(Request):
    """A request whose body is read up to the deployment's limit, and parsed off the
    event loop when large. ``body_model``: the route's body model (or None)."""

    body_model: type[BaseModel] | None = None

    async def body(self) -> bytes:
        if not hasattr(self, "_body"):
            limit = get_state(self).max_request_bytes
            declared = self.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > limit:
                # (not when the client waits for "100 Continue" before sending: the
                # first read would ask it for the body the 413 refuses)
                expects = self.headers.get("expect", "").lower() == "100-continue"
                if int(declared) <= DRAIN_FACTOR * limit and not expects:
                    async for _ in self.stream():
                        pass  # dropped as it comes: the client then reads its 413
                    raise too_large(limit, close=False)
                raise too_large(limit)  # before reading a byte of it
            chunks, size = [], 0
            async for chunk in self.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large(limit)
                chunks.append(chunk)
            self._body = b"".join(chunks)
        return self._body

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            if len(body) < OFFLOAD_BYTES:
                self._json = json.loads(body)  # FastAPI validates it in place
            else:
                # FastAPI's own validation accepts the model instance as it is.
                self._json = await run_off_loop(parse_body, body, self.body_model)
        return self._json


class LimitedRoute(APIRoute):
    """A route that reads its body through :class:`LimitedRequest`."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        model = _body_model(self)
        request_class = type("LimitedRequest", (LimitedRequest,), {"body_model": model})

        async def limited_handler(request: Request) -> Response:
            return await handler(request_class(_json_scope(request.scope), request.receive))

        return limited_handler


def _json_scope(scope: dict) -> dict:
    """``scope`` with its body declared JSON: every body of these routes is JSON,
    whatever the client says (``curl -d`` sends form-urlencoded, and FastAPI would
    then refuse a JSON object as "not a valid dictionary")."""
    headers = scope.get("headers") or []
    for key, value in headers:
        if key == b"content-type":
            kind = value.split(b";")[0].strip().lower()
            if kind == b"application/json" or kind.endswith(b"+json"):
                return scope
    kept = [(k, v) for k, v in headers if k != b"content-type"]
    return {**scope, "headers": [*kept, (b"content-type", b"application/json")]}


def _body_model(route: APIRoute) -> type[BaseModel] | None:
    """The pydantic model of the route's body parameter, if it has one."""
    field = getattr(route, "body_field", None)
    annotation = getattr(getattr(field, "field_info", None), "annotation", None)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None
