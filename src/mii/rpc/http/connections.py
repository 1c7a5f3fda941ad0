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
- **Header size**: a request's line and headers may take ``max_header_bytes``
  (counted from the parser's start of a message to its end of headers, so a
  request pipelined behind a running one counts too, and the rest of a body
  that an early answer left unread does not); past that it is answered 431 and
  closed. uvicorn's httptools parser sets no bound: one connection sending a
  128 MB header stalled the event loop for seconds, long enough for the health
  probes to take a healthy replica out of rotation. (h11, uvicorn's parser where
  httptools is not installed, refuses past its own 16 KiB with 400.)
- **Connection cap**: at most ``max_connections`` open at once. A new connection
  beyond it closes the connection that has been idle (waiting for a request's
  headers, or between requests) the longest; when every connection is busy with
  a request, the new one is answered 503 (``Retry-After``). A connection counts
  as idle only ``idle_grace`` seconds (1 s) after it opened or its last response
  ended, without a request begun since (a client trickling a request's bytes
  stays evictable), and once the event
  loop has looked for its bytes since it opened. Without the grace the cap
  closed connections that clients were about to use: an async client opens all
  its connections before writing any request, a keep-alive pool sends its next
  request just after a response, and asyncio accepts a burst of connections
  before reading any; each time the cap closed connections whose requests were
  on their way (clients saw resets, httpx ``ReadError``, uncounted) instead of
  answering the newcomer 503.
- **Lingering answers**: a connection answered 503 by the cap or 431 is
  half-closed after its answer, and what its client still sends is read and
  dropped until it closes, for at most ``LINGER_S``, at most an eighth of the
  descriptors left of them at once (a quarter of the largest cap the open-files
  limit allows: with the cap, half of them, and the accept burst, a quarter, an
  eighth stays for gRPC), whatever smaller cap the user chose: closing a
  socket with unread bytes resets it, and the client then saw a reset instead
  of the answer.

:func:`guarded_protocol` wraps uvicorn's HTTP protocol class (h11 or httptools:
both keep a ``cycle`` per request and share ``server_state.connections``).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
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
HEADERS_TOO_LARGE = _raw_response("431 Request Header Fields Too Large", b"")

# A request's line and headers: nginx allows 32 KiB by default, Node.js 16 KiB.
MAX_HEADER_BYTES = 64 << 10
# How long a connection answered 503 or 431 is drained for its client to read it.
LINGER_S = 2.0
# Time after a connection opened or its last answer ended before the cap may close
# it (idle) to make room for a new one.
IDLE_GRACE_S = 1.0
UNLIMITED_CONNECTIONS = 1 << 30  # (what the open-files limit alone allows)


@dataclass(frozen=True)
class ConnectionLimits:
    """``header_timeout`` in seconds; ``max_connections`` open at once; a request's
    line and headers in at most ``max_header_bytes``; ``on_refused`` is called
    for each connection refused at the cap (the metrics count it)."""

    header_timeout: float
    max_connections: int
    max_header_bytes: int = MAX_HEADER_BYTES
    on_refused: Callable[[], None] | None = None
    idle_grace: float = IDLE_GRACE_S
    lingering_limit: int | None = None  # None: a quarter of max_connections

    @property
    def max_lingering(self) -> int:
        """Answered connections drained at once."""
        if self.lingering_limit is not None:
            return self.lingering_limit
        return max(1, self.max_connections // 4)


def guarded_protocol(base: type[asyncio.Protocol], limits: ConnectionLimits) -> type:
    """``base`` (uvicorn's HTTP protocol class) with the header timeout and the
    connection cap of ``limits``."""

    lingering: set[asyncio.BaseTransport] = set()  # answered, drained until their clients close

    class GuardedProtocol(base):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.mii_refused = False  # by the cap: never joined the connections set
            self.mii_draining = False  # answered: what arrives now is dropped
            self.mii_polled = False  # the loop has looked for this connection's bytes
            self.mii_idle_since = time.monotonic()
            self.mii_header_timer: asyncio.TimerHandle | None = None
            self.mii_body_timer: asyncio.TimerHandle | None = None
            self.mii_partial = False  # bytes of a request arrived, its headers not yet
            self.mii_in_headers = False  # the parser is inside a request's line and headers
            self.mii_header_bytes = 0  # read since the parser began the current message

        # ----- asyncio.Protocol -----------------------------------------------

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            connections = self.server_state.connections
            if len(connections) >= limits.max_connections and not _close_longest_idle(connections):
                self.mii_refuse(transport)
                return
            super().connection_made(transport)
            self.mii_wait_for_headers()
            # Reading starts after connection_made: bytes already waiting are read
            # within the loop's next pass, so two hops on are after it (asyncio and uvloop).
            self.loop.call_soon(self.loop.call_soon, self.mii_mark_polled)

        def data_received(self, data: bytes) -> None:
            if self.mii_draining:
                return  # dropped: the answer is on its way
            if self.mii_header_timer is None and self.mii_idle():
                self.mii_wait_for_headers()  # the next request started arriving
            self.mii_partial = True
            cycle = self.cycle
            super().data_received(data)
            if self.cycle is not cycle:  # its headers are complete: a request began
                self.mii_stop_waiting()
                self.mii_idle_since = time.monotonic()
            if self.mii_in_headers and not self.transport.is_closing():
                self.mii_header_bytes += len(data)
                if self.mii_header_bytes > limits.max_header_bytes:
                    self.mii_headers_too_large()
                    return
            self.mii_watch_body()

        # ----- httptools' parser callbacks (h11 has none: it bounds headers itself)

        def on_message_begin(self) -> None:
            self.mii_in_headers, self.mii_header_bytes = True, 0
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            self.mii_in_headers = False
            super().on_headers_complete()

        def eof_received(self) -> bool | None:
            if self.mii_draining:
                self.transport.close()  # its client read the answer and closed
                return None
            return super().eof_received()

        def on_response_complete(self) -> None:
            # Idle from here: the cap closes the connection idle the longest, and one
            # that has just finished a long stream is the one its client reuses next.
            self.mii_idle_since = time.monotonic()
            super().on_response_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self.mii_stop_waiting()
            self.mii_stop_body_timer()
            lingering.discard(self.transport)
            if not self.mii_refused:
                super().connection_lost(exc)

        # ----- the guard ------------------------------------------------------

        def mii_refuse(self, transport: asyncio.BaseTransport) -> None:
            """Answer 503 and close (it never joins the connections set)."""
            self.mii_refused = True
            self.transport = transport
            if limits.on_refused is not None:
                limits.on_refused()
            self.mii_linger(REFUSED)

        def mii_linger(self, answer: bytes) -> None:
            """Send ``answer``, then drop what the client still sends until it
            closes (at most LINGER_S), so that its answer is not lost to a reset."""
            self.mii_draining = True
            transport = self.transport
            transport.write(answer)
            if len(lingering) >= limits.max_lingering or not transport.can_write_eof():
                transport.close()
                return
            transport.write_eof()
            lingering.add(transport)
            self.loop.call_later(LINGER_S, transport.close)

        def mii_headers_too_large(self) -> None:
            """431 and close; only close when pipelined behind an answer still being
            written (a 431 would land inside it)."""
            self.mii_stop_waiting()
            if not self.mii_idle():
                self.mii_close()
                return
            self.server_state.connections.discard(self)
            self.mii_linger(HEADERS_TOO_LARGE)

        def mii_mark_polled(self) -> None:
            self.mii_polled = True

        def mii_evictable(self) -> bool:
            """Idle for the grace since it opened or its last answer ended, and not a
            connection whose first request may still be unread."""
            silent = time.monotonic() - self.mii_idle_since >= limits.idle_grace
            return self.mii_polled and silent and self.mii_idle()

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

    GuardedProtocol.mii_limits = limits
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
    idle = [c for c in connections if getattr(c, "mii_evictable", None) and c.mii_evictable()]
    if not idle:
        return False
    min(idle, key=lambda c: c.mii_idle_since).mii_close()
    return True


def uvicorn_options(
    header_timeout: float,
    keep_alive: float,
    max_connections: int,
    on_refused: Callable[[], None] | None = None,
) -> dict:
    """uvicorn.Config keyword options that apply these bounds (``max_connections``
    is cut to what the open-files limit allows: see :mod:`mii.rpc.fd_limit`)."""
    from uvicorn.protocols.http.auto import AutoHTTPProtocol

    from mii.rpc.fd_limit import http_accept_backlog, http_connection_budget

    budget = http_connection_budget(max_connections)
    # Lingering answers are bounded by the descriptors, not by the cap the user chose:
    # a quarter of the most connections the open-files limit allows (at a cap of 8,
    # a quarter of it, 2, left 10 of 12 refused clients a reset instead of the 503).
    lingering = max(1, http_connection_budget(UNLIMITED_CONNECTIONS) // 4)
    limits = ConnectionLimits(
        header_timeout, budget, on_refused=on_refused, lingering_limit=lingering
    )
    return {
        "http": guarded_protocol(AutoHTTPProtocol, limits),
        "timeout_keep_alive": keep_alive,
        "backlog": http_accept_backlog(),
    }
