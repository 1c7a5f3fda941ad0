"""What the HTTP port answers while the deployment's replicas load the model.

The port is bound (and listening) before any model loads, so that a busy port
fails at once; the gateway starts only once every replica serves. In between,
a connection was accepted by the kernel and then left unanswered: ``curl
/health`` hung for as long as the load took (minutes for a large model). Here
each request gets ``503`` at once, ``{"status": "starting", "error": {...}}``
(a health probe reads the status, an OpenAI client the error) with
``Retry-After``, on a second descriptor of the same socket, closed when the
gateway takes over (the socket itself stays open and listening).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket

RETRY_AFTER_S = 5
_HEAD_LIMIT = 64 * 1024  # bytes of a request head read before answering anyway
_READ_TIMEOUT_S = 5.0

_BODY = json.dumps(
    {
        "status": "starting",
        "error": {
            "message": "the deployment is starting: its replicas are loading the model; "
            "retry once /health answers 200",
            "type": "server_error",
            "param": None,
            "code": "service_unavailable",
        },
    }
).encode()
_ANSWER = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json\r\n"
    + f"Content-Length: {len(_BODY)}\r\nRetry-After: {RETRY_AFTER_S}\r\n".encode()
    + b"Connection: close\r\n\r\n"
    + _BODY
)


async def _answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):  # (a client that leaves: nothing to answer)
        # The head first: a client that is still sending when its connection closes
        # gets a reset, not the answer.
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT_S)
    with contextlib.suppress(Exception):
        writer.write(_ANSWER)
        await writer.drain()
    writer.close()


async def answer_while_starting(sock: socket.socket) -> asyncio.Server:
    """Answer 503 "starting" on ``sock`` (a listening socket) until the returned
    server is closed (:func:`stop_answering`); ``sock`` stays open."""
    return await asyncio.start_server(_answer, sock=sock.dup(), limit=_HEAD_LIMIT)


async def stop_answering(server: asyncio.Server | None) -> None:
    """Stop answering "starting" (the gateway answers from now on)."""
    if server is not None:
        server.close()
        await server.wait_closed()
