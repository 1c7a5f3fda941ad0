"""Where the engine loop hands a request's pieces: besides a stream's queue, a
``generate`` call's collector, and the placeholder of a request being aborted."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from mii.engine.answer_stream import DONE
from mii.errors import EngineClosedError
from mii.response import Response, join_pieces


class Aborting:
    """Holds a request id in ``_queues`` from the moment its abort is queued until
    the engine loop applies it, so that the id cannot be reused in between (the
    queued abort would otherwise hit the new request, or its outputs leak into it)."""

    def __init__(self) -> None:
        self.applied = asyncio.Event()  # set once the id is free again

    def put_nowait(self, item: object) -> None:
        pass  # late output of an aborted request goes nowhere


class Collector:
    """Gathers one request's pieces for ``generate`` as they are delivered, without
    waking a task for every token (at hundreds of requests per pass, that matters)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.pieces: list[Response] = []
        self.done: asyncio.Future = loop.create_future()
        self.finished = False

    def put_nowait(self, item: object) -> None:
        if self.done.done():
            return
        if self.done.get_loop().is_closed():
            # (its caller's loop ended without cancelling it: nobody will read the
            # answer, so its request is aborted now, not generated to its end)
            raise RuntimeError("Event loop is closed")
        if isinstance(item, BaseException):
            self.finished = True
            self.done.set_exception(item)
            return
        if item is not DONE:
            self.pieces.append(item)
        if item is DONE or item.finish_reason is not None:
            self.finished = item is not DONE
            self.done.set_result(join_pieces(self.pieces, "abort" if item is DONE else None))


def put(sink: Any, item: object) -> bool:
    """Hand ``item`` to a request's consumer; False when the event loop its reader
    waits in was closed (a stream left open in a loop that ended without ending it)."""
    try:
        sink.put_nowait(item)
    except RuntimeError:  # "Event loop is closed", from waking that reader
        return False
    return True


def end_every_request(sinks: list[Any], why: str) -> None:
    """EngineClosedError(``why``) to every request's consumer (the engine stops)."""
    for sink in sinks:
        put(sink, EngineClosedError(why))
        if isinstance(sink, Aborting):
            with contextlib.suppress(RuntimeError):  # (its waiter's loop was closed)
                sink.applied.set()  # nobody waits for an abort the loop will not apply
