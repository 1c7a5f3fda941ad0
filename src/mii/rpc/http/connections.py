"""Bounds on the gateway's HTTP connections, which uvicorn does not set itself.

- **Header timeout**: a connection must deliver a request's headers within
  ``header_timeout`` seconds of opening (or of its first byte after a response);
  otherwise it is closed (with a 408 if it had sent part of a request). uvicorn
  alone waits forever for a connection that sends nothing or half a request.
- **Body timeout**: while a request's body is still arriving, each piece of it
  must follow the last within ``header_timeout`` seconds, or the connection is
  answered 408 and closed (a client that sends its headers and then stalls the
  body would otherwise hold a connection, and a slot of the cap, for ever).
- **Shutdown**: :func:`close_unstarted` closes the connections that have no
  request being answered (idle, or still sending a body), so that shutting the
  gateway down never has to cancel a handler that waits for a body.
- **Keep-alive**: an idle connection between requests is closed after uvicorn's
  ``timeout_keep_alive`` (the deployment's ``http_keep_alive_timeout``).
- **Connection cap**: at most ``max_connections`` open at once. A new connection
  beyond it closes the connection that has been idle (waiting for a request's
  headers, or between requests) the longest; when every connection is busy with
  a request, the new one is answered 503 and closed at once. Either way the
  gateway never holds more descriptors than the cap, so the gRPC server of the
  same process keeps descriptors for its clients.

:func:`guarded_protocol` wraps uvicorn's HTTP protocol class (h11 or httptools:
both keep a ``cycle`` per request and share ``server_state.connections``).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any


def _raw_response(status: str, body: bytes, *headers: bytes) -> bytes:
    head = [b"HTTP/1.1 " + status.encode(), *headers, b"connection: close"]
    head.append(b"content-length: %d" % len(body))
    return b"\r\n".join(head) + b"\r\n\r\n" + body


REFUSED = _raw_response(
    "503 Service Unavailable",
    b'{"error": {"message": "too many open HTTP connections; retry later", '
    b'"type": "server_error", "param": null, "code": null, "field": null}}',
    b"content-type: application/json",
    b"retry-after: 1",
)
TIMED_OUT = _raw_response("408 Request Timeout", b"")


@dataclass(frozen=True)
class ConnectionLimits:
    """``header_timeout`` in seconds; ``max_connections`` open at once."""

    header_timeout: float
    max_connections: int


def guarded_protocol(base: type[asyncio.Protocol], limits: ConnectionLimits) -> type:
    """``base`` (uvicorn's HTTP protocol class) with the header timeout and the
    connection cap of ``limits``."""

    class GuardedProtocol(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.mii_refused = False
            self.mii_idle_since = time.monotonic()
            self.mii_header_timer: asyncio.TimerHandle | None = None
            self.mii_body_timer: asyncio.TimerHandle | None = None
            self.mii_partial = False  # bytes of a request arrived, its headers not yet

        # ----- asyncio.Protocol -----------------------------------------------

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            connections = self.server_state.connections
            if len(connections) >= limits.max_connections and not _close_longest_idle(connections):
                self.mii_refused = True  # never joins the connections set
                transport.write(REFUSED)  # type: ignore[attr-defined]
                transport.close()
                return
            super().connection_made(transport)
            self.mii_wait_for_headers()

        def data_received(self, data: bytes) -> None:
            if self.mii_refused:
                return
            if self.mii_header_timer is None and self.mii_idle():
                self.mii_wait_for_headers()  # the next request started arriving
            self.mii_partial = True
            cycle = self.cycle
            super().data_received(data)
            if self.cycle is not cycle:  # its headers are complete: a request began
                self.mii_stop_waiting()
                self.mii_idle_since = time.monotonic()
            self.mii_watch_body()

        def on_response_complete(self) -> None:
            # Idle from here: the cap closes the connection idle the longest, and one
            # that has just finished a long stream is the one its client reuses next.
            self.mii_idle_since = time.monotonic()
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self.mii_stop_waiting()
            self.mii_stop_body_timer()
            if not self.mii_refused:
                super().connection_lost(exc)

        # ----- the guard ------------------------------------------------------

        def mii_idle(self) -> bool:
            """Waiting for a request's headers, or between requests."""
            return self.cycle is None or self.cycle.response_complete

        def mii_wait_for_headers(self) -> None:
            self.mii_partial = False
            self.mii_header_timer = self.loop.call_later(
                limits.header_timeout, self.mii_headers_timed_out
            )

        def mii_stop_waiting(self) -> None:
            if self.mii_header_timer is not None:
                self.mii_header_timer.cancel()
                self.mii_header_timer = None

        def mii_headers_timed_out(self) -> None:
            self.mii_header_timer = None
            if self.transport.is_closing() or not self.mii_idle():
                return
            if self.mii_partial:
                self.transport.write(TIMED_OUT)
            self.mii_close()

        def mii_receiving_body(self) -> bool:
            """A request began and its body is still arriving (nothing answered yet)."""
            cycle = self.cycle
            return (
                cycle is not None
                and not cycle.response_started
                and getattr(cycle, "more_body", False)
            )

        def mii_watch_body(self) -> None:
            """(Re)start the body timer while a body arrives; stop it once it is whole."""
            self.mii_stop_body_timer()
            if self.mii_receiving_body():
                self.mii_body_timer = self.loop.call_later(
                    limits.header_timeout, self.mii_body_timed_out
                )

        def mii_stop_body_timer(self) -> None:
            if self.mii_body_timer is not None:
                self.mii_body_timer.cancel()
                self.mii_body_timer = None

        def mii_body_timed_out(self) -> None:
            self.mii_body_timer = None
            if self.transport.is_closing() or not self.mii_receiving_body():
                return
            self.transport.write(TIMED_OUT)
            self.mii_close()

        def mii_close(self) -> None:
            """Close now, and stop counting against the cap at once (asyncio reports
            the loss only on the next loop iteration)."""
            self.server_state.connections.discard(self)
            self.transport.close()

    GuardedProtocol.__name__ = GuardedProtocol.__qualname__ = f"Guarded{base.__name__}"
    return GuardedProtocol


def close_unstarted(connections: set) -> int:
    """Close every connection that has no request being answered: idle ones, and
    ones still sending a request's body (answered 408). Returns how many."""
    closing = [
        c
        for c in list(connections)
        if getattr(c, "mii_idle", None) and (c.mii_idle() or c.mii_receiving_body())
    ]
    for c in closing:
        if not c.mii_idle():
            c.transport.write(TIMED_OUT)
        c.mii_close()
    return len(closing)


def _close_longest_idle(connections: set) -> bool:
    """Close the open connection idle the longest; False if every one is busy."""
    idle = [c for c in connections if getattr(c, "mii_idle", None) and c.mii_idle()]
    if not idle:
        return False
    min(idle, key=lambda c: c.mii_idle_since).mii_close()
    return True


def uvicorn_options(header_timeout: float, keep_alive: float, max_connections: int) -> dict:
    """uvicorn.Config keyword options that apply these bounds (``max_connections``
    is cut to what the open-files limit allows: see :mod:`mii.rpc.fd_limit`)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    from mii.rpc.fd_limit import http_accept_backlog, http_connection_budget

    limits = ConnectionLimits(header_timeout, http_connection_budget(max_connections))
    return {
        "http": guarded_protocol(AutoHTTPProtocol, limits),
        "timeout_keep_alive": keep_alive,
        "backlog": http_accept_backlog(),
    }
