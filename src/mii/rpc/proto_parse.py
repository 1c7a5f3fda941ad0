"""Registering mii's gRPC service so that malformed request bytes are the
caller's error (INVALID_ARGUMENT), not the server's (UNKNOWN).

The generated ``add_MiiServicer_to_server`` deserializes each request before the
handler runs; bytes that are not a valid message (or carry a string that is not
UTF-8) make grpc answer UNKNOWN with an internal exception name. Here each
method's deserializer keeps such bytes as a :class:`Malformed` marker instead,
and the handler answers INVALID_ARGUMENT naming the message type. Every method of
the service (from its descriptor) is registered, with the servicer's own
handlers; the generated module stays untouched (``test_stubs_are_up_to_date``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError

from mii.rpc import mii_pb2

SERVICE = mii_pb2.DESCRIPTOR.services_by_name["Mii"]


@dataclass(frozen=True)
class Malformed:
    """Request bytes that are not a valid ``message_type`` message."""

    message_type: str
    reason: str

    def describe(self) -> str:
        return f"the request is not a valid {self.message_type} message: {self.reason}"


def _parser(message_class: type) -> Callable[[bytes], Any]:
    def parse(data: bytes) -> Any:
        try:
            return message_class.FromString(data)
        except (DecodeError, UnicodeDecodeError, ValueError) as err:
            return Malformed(message_class.DESCRIPTOR.full_name, str(err) or type(err).__name__)

    return parse


def _unary(method: Callable) -> Callable:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> Any:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.describe())
        return await method(request, context)

    return handler


def _streaming(method: Callable) -> Callable:
    async def handler(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        if isinstance(request, Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.describe())
        # aclosing: a cancelled call closes the servicer's stream (its finally runs now).
        async with contextlib.aclosing(method(request, context)) as pieces:
            async for piece in pieces:
                yield piece

    return handler


def add_mii_servicer(servicer: Any, server: grpc.aio.Server) -> None:
    """Serve ``servicer`` (a ``MiiServicer``) on ``server``, malformed requests
    answered INVALID_ARGUMENT."""
    handlers = {}
    for method in SERVICE.methods:
        request_class = getattr(mii_pb2, method.input_type.name)
        reply_class = getattr(mii_pb2, method.output_type.name)
        implementation = getattr(servicer, method.name)
        make = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else grpc.unary_unary_rpc_method_handler
        )
        wrap = _streaming if method.server_streaming else _unary
        handlers[method.name] = make(
            wrap(implementation),
            request_deserializer=_parser(request_class),
            response_serializer=reply_class.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),)
    )
    server.add_registered_method_handlers(SERVICE.full_name, handlers)
