"""How errors cross the wire: one table from exception class to HTTP status,
gRPC status code and OpenAI error code, and the way back from a gRPC status to
the exception that a caller raises.

Every surface answers from this table: the REST gateway's error handlers
(:mod:`mii.rpc.http.errors`), the balancer and the replicas (:func:`abort`), and
the pool and the client (:func:`error_from_grpc`). What each surface writes as
the message is its own business; the codes are decided here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NoReturn

import grpc

from mii.errors import (
    AuthenticationError,
    InvalidRequestError,
    MiiError,
    NoReplicaError,
    RequestTimeoutError,
    ServerOverloadedError,
    UnavailableError,
)

# Trailing metadata of an INVALID_ARGUMENT status: the option that was refused.
FIELD_METADATA = "mii-field"
CODE_METADATA = "mii-code"  # (OpenAI's code for it: InvalidRequestError.code)
# Trailing metadata of a RESOURCE_EXHAUSTED refusal (an overloaded server): when to
# retry, in whole seconds as HTTP's Retry-After says it, and in milliseconds under
# the name gRPC's own retry policies read (server pushback).
RETRY_AFTER_METADATA = "retry-after"
PUSHBACK_METADATA = "grpc-retry-pushback-ms"
# Trailing metadata of an UNAVAILABLE status when no replica of the deployment is
# left to serve (NoReplicaError), rather than one replica failing the call.
NO_REPLICA_METADATA = "mii-no-replica"


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
    # Refused at once for overload: retry after the Retry-After the answer carries.
    ServerOverloadedError: Status(429, grpc.StatusCode.RESOURCE_EXHAUSTED, "rate_limit_exceeded"),
    NoReplicaError: Status(503, grpc.StatusCode.UNAVAILABLE, "no_replica_available"),
    # A replica crashed, became unreachable or lost a rank: a retry can succeed.
    UnavailableError: Status(503, grpc.StatusCode.UNAVAILABLE, "service_unavailable"),
    # Before MiiError: a RequestTimeoutError is both, and answers as a timeout.
    RequestTimeoutError: Status(504, grpc.StatusCode.DEADLINE_EXCEEDED),
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


def retry_after_seconds(err: ServerOverloadedError) -> int:
    """``err.retry_after`` in whole seconds (at least 1), as HTTP's Retry-After takes it."""
    return max(1, math.ceil(err.retry_after))


async def abort(context: grpc.aio.ServicerContext, err: Exception) -> NoReturn:
    """End a gRPC call with ``err``'s status code and ``str(err)`` as details; an
    INVALID_ARGUMENT carries the offending field in the trailing metadata, a
    RESOURCE_EXHAUSTED (overload) when to retry."""
    metadata: tuple[tuple[str, str], ...] = ()
    if isinstance(err, InvalidRequestError):
        metadata = ((FIELD_METADATA, err.field or ""), (CODE_METADATA, err.code or ""))
    elif isinstance(err, ServerOverloadedError):
        seconds = retry_after_seconds(err)
        metadata = ((RETRY_AFTER_METADATA, str(seconds)), (PUSHBACK_METADATA, str(seconds * 1000)))
    elif isinstance(err, NoReplicaError):
        metadata = ((NO_REPLICA_METADATA, "1"),)
    await context.abort(status_of(err).grpc, str(err), trailing_metadata=metadata)


def is_overload(err: grpc.RpcError) -> bool:
    """True for mii's own refusal of an overloaded server (RESOURCE_EXHAUSTED with a
    retry-after), not for gRPC's RESOURCE_EXHAUSTED about message sizes."""
    if err.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
        return False
    return RETRY_AFTER_METADATA in dict(err.trailing_metadata() or ())


def error_from_grpc(err: grpc.RpcError, fallback: type[MiiError] = MiiError) -> Exception:
    """The exception a caller raises for a failed gRPC call: the caller's own
    mistakes, deadlines and a refused API key come back as InvalidRequestError
    (with the field), RequestTimeoutError and AuthenticationError, an overloaded server
    as ServerOverloadedError (with its retry_after), an unavailable one (or one
    that cancelled the call) as UnavailableError (NoReplicaError when the deployment
    said none of its replicas is left to serve); any other status as
    ``fallback("CODE: details")``."""
    code, details = err.code(), err.details()
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        metadata = dict(err.trailing_metadata() or ())
        field, code = metadata.get(FIELD_METADATA) or None, metadata.get(CODE_METADATA) or None
        return InvalidRequestError(details or "invalid request", field, code)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return RequestTimeoutError(details or "deadline exceeded")
    if code == grpc.StatusCode.UNAUTHENTICATED:
        return AuthenticationError(details or "missing or wrong API key")
    if is_overload(err):
        retry_after = dict(err.trailing_metadata())[RETRY_AFTER_METADATA]
        try:
            seconds = float(retry_after)
        except ValueError:
            seconds = 1.0
        if not 0 <= seconds < math.inf:
            seconds = 1.0
        return ServerOverloadedError(details or "the server is overloaded", seconds)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:  # grpc's own: a message over the limit
        return InvalidRequestError(
            f"the request is larger than the server accepts (max_request_bytes): {details}",
            "prompts",
        )
    # A caller's own cancellation raises CancelledError, never an RpcError: a
    # CANCELLED status means the server side gave the call up (e.g. a replica
    # stopping), which a retry can overcome, as it can UNAVAILABLE.
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        # a balancer's details already name the code
        prefix = "" if (details or "").startswith(f"{code.name}: ") else f"{code.name}: "
        none_left = NO_REPLICA_METADATA in dict(err.trailing_metadata() or ())
        return (NoReplicaError if none_left else UnavailableError)(f"{prefix}{details}")
    return fallback(f"{code.name}: {details}")
