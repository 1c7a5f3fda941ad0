"""A client's ``X-Request-Id`` header, echoed on the gateway's answer.

Tracing proxies and clients set ``X-Request-Id`` to follow one call through
their logs; vLLM echoes it on its answers (``--enable-request-id-headers``). The
gateway does so always, on every route and status (a streamed answer carries it
from its first byte, a refusal too), as ASGI middleware around everything else.
A value longer than ``MAX_LENGTH`` or with characters outside printable ASCII is
not echoed: it is a client's, copied into our answer. It also names the OpenAI
answer (``"id": "cmpl-<it>"``), as vLLM's.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = b"x-request-id"
MAX_LENGTH = 256


def echoed_id(scope: Scope) -> bytes | None:
    """The request's ``X-Request-Id`` value to echo, or None (absent or unfit)."""
    value = next((v for k, v in scope.get("headers", ()) if k.lower() == HEADER), None)
    if value is None or not 0 < len(value) <= MAX_LENGTH:
        return None
    return value if all(0x21 <= b <= 0x7E for b in value) else None


def client_request_id(request: Request) -> str | None:
    """The request's ``X-Request-Id`` (when fit to echo), which names its OpenAI
    answer (``cmpl-<it>``), as vLLM's do; None without one."""
    value = echoed_id(request.scope)
    return None if value is None else value.decode("ascii")


class EchoRequestId:
    """ASGI middleware: the answer's start gets the request's ``X-Request-Id``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        value = echoed_id(scope) if scope["type"] == "http" else None
        if value is None:
            await self.app(scope, receive, send)
            return

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", ()) if h[0].lower() != HEADER]
                message = {**message, "headers": [*headers, (HEADER, value)]}
            await send(message)

        await self.app(scope, receive, send_with_id)
