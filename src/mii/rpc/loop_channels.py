"""A client's grpc.aio channels, one per event loop (a grpc.aio channel belongs to the
loop it was made on).

A channel whose loop has ended is dropped when the next one is made: a service that
bridges with ``asyncio.run(client.agenerate(...))`` per request piled up one channel,
and its closed loop, per call. Closing the client closes every channel on its own
loop, so that calls in flight there end too (they ran on to their end before).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc

# Close tasks in flight (the loop keeps only weak references to its tasks).
_closing: set[asyncio.Future] = set()


class LoopChannels:
    """``stub(loop)``: the stub of this client's channel on ``loop``, made on first use
    by ``make()`` (a ``grpc.aio.Channel``)."""

    def __init__(self, make: Callable[[], grpc.aio.Channel], stub_class: Callable) -> None:
        self._make = make
        self._stub_class = stub_class
        # id(loop) -> (loop, channel, stub); the loop kept, so that its id is not reused
        self._by_loop: dict[int, tuple[asyncio.AbstractEventLoop, grpc.aio.Channel, Any]] = {}

    def __len__(self) -> int:
        return len(self._by_loop)

    def stub(self, loop: asyncio.AbstractEventLoop) -> Any:
        entry = self._by_loop.get(id(loop))
        if entry is None:
            self._by_loop = {k: v for k, v in self._by_loop.items() if not v[0].is_closed()}
            channel = self._make()
            entry = self._by_loop[id(loop)] = (loop, channel, self._stub_class(channel))
        return entry[2]

    def close(self) -> None:
        """Close every channel on its loop: at once where that loop runs in this
        thread or another; a loop that ended or does not run has no call in flight."""
        entries, self._by_loop = list(self._by_loop.values()), {}
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        for loop, channel, _ in entries:
            if loop.is_closed() or not loop.is_running():
                continue
            if loop is here:
                task = loop.create_task(channel.close())
            else:
                task = asyncio.run_coroutine_threadsafe(channel.close(), loop)
            _closing.add(task)
            task.add_done_callback(_closing.discard)
