"""How the gateway answers errors: the two JSON error shapes, the exception
handlers, and plain-words descriptions of FastAPI's validation errors.

Every error body has OpenAI's shape, ``{"error": {"message", "type", "param",
"code"}}``, so that any client reads it; outside the OpenAI routes (under ``/v1``)
it also names mii's ``field`` (the same as ``param``). Which status an exception
gets is decided by :mod:`mii.rpc.status`.
"""

from __future__ import annotations

import difflib
import logging
import re
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from mii.errors import InvalidRequestError, ServerOverloadedError, UnavailableError
from mii.rpc.call_guard import ShuttingDownError
from mii.rpc.http.disconnect import ClientDisconnected
from mii.rpc.status import INTERNAL, STATUSES, retry_after_seconds, status_of

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered with ``status`` and the route's error shape.

    ``param`` names the offending field (``field`` in mii's shape); ``code`` is
    OpenAI's machine-readable code (for example ``model_not_found``);
    ``retry_after`` (seconds) becomes a Retry-After header.
    """

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after


# What the gateway answers with a JSON error; any other exception is a bug,
# answered by the server's plain 500.
ANSWERED_ERRORS: tuple[type[BaseException], ...] = (ApiError, *STATUSES)


def api_error(err: BaseException) -> ApiError:
    """The answer to an exception of the table in :mod:`mii.rpc.status`."""
    status = status_of(err)
    if isinstance(err, InvalidRequestError):
        return ApiError(status.http, str(err), err.field, err.code)
    if status is INTERNAL:  # a failure, not the caller's doing: name its class
        message = f"{type(err).__name__}: {err}"
    elif isinstance(err, TimeoutError):
        message = f"the request timed out: {err}"
    else:
        message = str(err)
    retry_after = None
    if isinstance(err, ServerOverloadedError):
        retry_after = retry_after_seconds(err)
    elif isinstance(err, ShuttingDownError):
        pass  # no Retry-After: this deployment is going away, not coming back in a second
    elif isinstance(err, UnavailableError):  # a replica restarts, rejoins, or another serves
        retry_after = 1
    return ApiError(status.http, message, code=status.openai_code, retry_after=retry_after)


# vLLM's routes outside /v1 (mii.rpc.http.tokenize_routes): OpenAI's error shape too.
OPENAI_STYLE_PATHS = ("/tokenize", "/detokenize", "/tokenizer_info")


def is_openai_path(path: str) -> bool:
    return path == "/v1" or path.startswith("/v1/") or path in OPENAI_STYLE_PATHS


def openai_error_body(
    message: str, status: int, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    """OpenAI's error object; its ``type`` says whose fault it is."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    if status == 429:  # as OpenAI's own 429 for a limit on requests
        kind = "requests"
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(request: Request, err: ApiError) -> JSONResponse:
    """``err`` in the error shape of the route that was asked."""
    body = openai_error_body(err.message, err.status, err.param, err.code)
    if not is_openai_path(request.url.path):  # mii's routes name the field too (as they did)
        body["error"]["field"] = err.param
    headers = {"Retry-After": str(err.retry_after)} if err.retry_after is not None else None
    return JSONResponse(body, status_code=err.status, headers=headers)


@contextmanager
def openai_errors(renames: dict[str, str]) -> Iterator[None]:
    """Report mii's InvalidRequestError with OpenAI's names for the fields."""
    try:
        yield
    except InvalidRequestError as err:
        raise ApiError(400, *renamed(err, renames), code=err.code) from None


def renamed(err: InvalidRequestError, renames: dict[str, str]) -> tuple[str, str | None]:
    """The message and field of ``err``, with the fields under their OpenAI names:
    the field itself, and any option the message names ("must be at least
    min_new_tokens" reads "min_tokens" on the OpenAI routes)."""
    field = err.field
    # What the caller sent, echoed after our text's first " (got ", stays as sent.
    text, got, sent = str(err).partition(" (got ")
    for name, openai_name in renames.items():
        text = text.replace(f"'{name}'", f"'{openai_name}'")
        if "_" in name:  # option names, not words such as "prompt" in prose
            text = re.sub(rf"\b{re.escape(name)}\b", lambda _, new=openai_name: new, text)
    return text + got + sent, renames.get(field, field)


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
        if field is None:
            return "the request body is missing", None
        return f"missing required field {field!r}" + _sent_instead(field, first.get("input")), field
    if kind == "extra_forbidden":
        return f"unknown field {field!r}", field
    if field is None:
        return f"the request body must be a JSON object ({msg})", None
    if "input" in first and kind != "value_error":
        msg = f"{msg} (got {first['input']!r})"
    return f"invalid value for {field!r}: {msg}", field


# DeepSpeed-MII's REST body names: what mii's route calls them.
_LEGACY_FIELDS = {"query": "prompts"}


def _sent_instead(field: str, body: Any) -> str:
    """A hint after "missing required field": the key of ``body`` that was probably
    meant (``prompt`` for ``prompts``, DeepSpeed-MII's legacy ``query``), or ''."""
    if not isinstance(body, dict):
        return ""
    name = field.rsplit(".", 1)[-1]  # (``body`` is the object that lacks it)
    keys = [key for key in body if isinstance(key, str)]
    legacy = [key for key in keys if _LEGACY_FIELDS.get(key) == name]
    near = legacy or difflib.get_close_matches(name, keys, n=1, cutoff=0.75)
    return f" (it has {near[0]!r}: the field is {name!r})" if near else ""


def _unparsed_body(cause: BaseException, message: str) -> str:
    """Why FastAPI could not read a body as JSON, in words (its own message, "There
    was an error parsing the body", says nothing of what to change)."""
    if isinstance(cause, UnicodeDecodeError):
        return (
            f"the request body is not valid UTF-8 (byte {cause.start}): send JSON encoded as UTF-8"
        )
    if isinstance(cause, RecursionError):
        return "the request body nests arrays or objects too deeply to read"
    return f"{message}: send one JSON object with 'Content-Type: application/json'"


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error the gateway knows in the asked route's JSON shape."""

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return error_response(request, err)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        message, field = describe_validation_error(exc)
        return error_response(request, ApiError(400, message, field))

    async def _known_error(request: Request, err: Exception):
        answer = api_error(err)
        if answer.status == INTERNAL.http:
            log.error("request failed: %s: %s", type(err).__name__, err)
        return error_response(request, answer)

    for cls in STATUSES:
        app.add_exception_handler(cls, _known_error)

    @app.exception_handler(ClientDisconnected)
    async def _gone(request: Request, err: ClientDisconnected):
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 400 and exc.__cause__ is not None:
            message = _unparsed_body(exc.__cause__, message)
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path} on this server"
        answer = error_response(
            request, ApiError(exc.status_code, message, getattr(exc, "param", None))
        )
        answer.headers.update(exc.headers or {})  # e.g. connection: close after a 413
        return answer
