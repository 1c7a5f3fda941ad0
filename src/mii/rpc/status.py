"""How errors cross the wire: one table from exception class to HTTP status,
gRPC status code and OpenAI error code, and the way back from a gRPC status to
the exception that a caller raises.

Every surface answers from this table: the REST gateway's error handlers
(:mod:`mii.rpc.http.errors`), the balancer and the replicas (:func:`abort`), and
the pool and the client (:func:`error_from_grpc`). What each surface writes as
the message is its own business; the codes are decided here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NoReturn

import grpc

from mii.errors import AuthenticationError, InvalidRequestError, MiiError, NoReplicaError

# Trailing metadata of an INVALID_ARGUMENT status: the option that was refused.
FIELD_METADATA = "mii-field"


@dataclass(frozen=True)
class Status:
    """How one kind of error is answered on each protocol."""

    http: int
    grpc: grpc.StatusCode
    openai_code: str | None = None  # OpenAI's machine-readable ``error.code``


# Looked up along the exception's class hierarchy (its MRO): the most specific
# class listed wins, so RequestTooLargeError answers as InvalidRequestError.
# The REST gateway answers exactly these classes with JSON; anything else is a
# bug, left to the server's plain 500.
STATUSES: dict[type[BaseException], Status] = {
    InvalidRequestError: Status(400, grpc.StatusCode.INVALID_ARGUMENT),
    AuthenticationError: Status(401, grpc.StatusCode.UNAUTHENTICATED, "invalid_api_key"),
    NoReplicaError: Status(503, grpc.StatusCode.UNAVAILABLE, "no_replica_available"),
    TimeoutError: Status(504, grpc.StatusCode.DEADLINE_EXCEEDED),
    MiiError: Status(500, grpc.StatusCode.INTERNAL),
}
INTERNAL = STATUSES[MiiError]  # for errors the table does not list


def status_of(err: BaseException) -> Status:
    """The table's row for ``err``: its most specific listed class, else INTERNAL."""
    for cls in type(err).__mro__:
        if cls in STATUSES:
            return STATUSES[cls]
    return INTERNAL


async def abort(context: grpc.aio.ServicerContext, err: Exception) -> NoReturn:
    """End a gRPC call with ``err``'s status code and ``str(err)`` as details; an
    INVALID_ARGUMENT carries the offending field in the trailing metadata."""
    metadata: tuple[tuple[str, str], ...] = ()
    if isinstance(err, InvalidRequestError):
        metadata = ((FIELD_METADATA, err.field or ""),)
    await context.abort(status_of(err).grpc, str(err), trailing_metadata=metadata)


def error_from_grpc(err: grpc.RpcError, fallback: type[MiiError] = MiiError) -> Exception:
    """The exception a caller raises for a failed gRPC call: the caller's own
    mistakes, deadlines and a refused API key come back as InvalidRequestError
    (with the field), TimeoutError and AuthenticationError; any other status as
    ``fallback("CODE: details")``."""
    code, details = err.code(), err.details()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        field = dict(err.trailing_metadata() or ()).get(FIELD_METADATA) or None
        return InvalidRequestError(details or "invalid request", field)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return TimeoutError(details or "deadline exceeded")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return AuthenticationError(details or "missing or wrong API key")
    return fallback(f"{code.name}: {details}")
