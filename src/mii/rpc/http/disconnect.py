"""A client that disconnects aborts its request.

A stream's body generator closes the pool's stream when it is closed (which
cancels the replica's call); :class:`ClosingStreamingResponse` closes it as soon
as the client leaves. A whole-answer request is awaited through
:func:`until_disconnected`, which cancels it once ``request.is_disconnected()``
turns true.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import TypeVar

from fastapi import Request
from fastapi.responses import StreamingResponse

T = TypeVar("T")
log = logging.getLogger(__name__)

DISCONNECT_POLL_S = 0.25
# How long a cancelled generation may take to stop before the handler goes on.
CANCEL_WAIT_S = 5.0


class ClientDisconnected(Exception):
    """The client left before its answer was ready; the generation was cancelled."""


async def until_disconnected(request: Request, awaitable: Awaitable[T]) -> T:
    """Await ``awaitable``, cancelling it (which aborts its generation) and raising
    ClientDisconnected if the client goes away first."""
    task = asyncio.ensure_future(awaitable)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientDisconnected()
    finally:
        if not task.done():
            task.cancel()  # aborts the request when we leave early
            # ... and wait until it has stopped: the caller may then close what it was
            # iterating (a stream's generator), which must not be running any more
            # ("aclose(): asynchronous generator is already running").
            await asyncio.wait({task}, timeout=CANCEL_WAIT_S)
            if task.done():
                _retrieve(task)
            else:  # still stopping after CANCEL_WAIT_S: its outcome is logged when it comes
                task.add_done_callback(_retrieve)
        elif not task.cancelled():
            task.exception()  # retrieved: the caller has its outcome, or has gone


def _retrieve(task: asyncio.Future) -> None:
    """Take a cancelled generation's outcome (never "Task exception was never
    retrieved"); an error other than the cancellation is logged."""
    if not task.cancelled() and task.exception() is not None:
        log.warning(
            "a generation cancelled for its client failed while stopping: %r", task.exception()
        )


class ClosingStreamingResponse(StreamingResponse):
    """A StreamingResponse that always closes its body generator, so that its
    ``finally`` (which closes the pool's stream) runs at once when the client
    leaves, rather than whenever the generator is garbage-collected."""

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            aclose = getattr(self.body_iterator, "aclose", None)
            if aclose is not None:
                await aclose()
