"""What crosses between a Ray deployment's processes: plain data only.

Prompts (text or token ids), generation options, answer pieces and errors travel
as dicts of strings, numbers and lists (what ``json.dumps`` takes); no tensor and
no mii object is ever pickled between nodes. An error raised in a replica comes
back as ``{"error": {...}}`` and is raised again in the caller as the same kind,
so every surface answers it from the one table of :mod:`mii.rpc.status`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mii.errors import (
    InvalidRequestError,
    MiiError,
    ReplicaError,
    ServerOverloadedError,
    UnavailableError,
)
from mii.response import Response

# The kinds of error a replica sends, and the class each is raised as again.
_KINDS: dict[str, type[MiiError]] = {
    "invalid_request": InvalidRequestError,
    "overloaded": ServerOverloadedError,
    "unavailable": UnavailableError,
    "replica": ReplicaError,
}


def piece_to_wire(piece: Response) -> dict[str, Any]:
    """A response (piece) as plain data (``Response.from_dict`` reads it back)."""
    return dataclasses.asdict(piece)


def piece_from_wire(data: dict[str, Any]) -> Response:
    return Response.from_dict(data)


def error_to_wire(err: Exception) -> dict[str, Any]:
    """``{"error": ...}`` for an exception the replica's engine raised (already
    classified by :func:`mii.rpc.replica.engine_error`)."""
    body: dict[str, Any] = {"kind": "replica", "message": str(err)}
    if isinstance(err, InvalidRequestError):
        body.update(kind="invalid_request", field=err.field, code=err.code)
    elif isinstance(err, ServerOverloadedError):
        body.update(kind="overloaded", retry_after=err.retry_after)
    elif isinstance(err, UnavailableError):
        body["kind"] = "unavailable"
    return {"error": body}


def error_from_wire(data: dict[str, Any]) -> Exception:
    """The exception that ``error_to_wire`` described."""
    body = data["error"]
    kind = _KINDS.get(body.get("kind"), ReplicaError)
    message = str(body.get("message", "replica error"))
    if kind is InvalidRequestError:
        return InvalidRequestError(message, body.get("field"), body.get("code"))
    if kind is ServerOverloadedError:
        return ServerOverloadedError(message, float(body.get("retry_after") or 1.0))
    return kind(message)


def raise_if_error(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` itself, unless it describes an error: then that error is raised."""
    if "error" in data:
        raise error_from_wire(data)
    return data
