"""One streamed request's pieces, from the moment the engine queued it.

``AsyncEngine.open_stream`` checks and queues a request and returns its
``AnswerStream``: the caller then knows the request was accepted (its options
and prompt passed every check, admission let it in) before any token exists.
A replica tells its gateway so (gRPC initial metadata), and the gateway then
answers a streamed request of several prompts with 200 only once every prompt
was accepted: a refusal of any of them is the request's 400, never an error
after the stream began (``rpc/http/sse.py``).
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable

from mii.response import Response

DONE = object()  # put on a request's queue when the engine aborted it


class _Ends:
    """What an AnswerStream's finalizer needs to know (not the stream: it must not
    keep the stream alive)."""

    finished = False
    closed = False


def _release_dropped(
    loop: asyncio.AbstractEventLoop, release: Callable[[bool], None], ends: _Ends
) -> None:
    """A stream dropped without ``close()``: release its request on its event loop
    (the garbage collector may run this on any thread)."""
    if not ends.closed and not loop.is_closed():
        loop.call_soon_threadsafe(release, ends.finished)


class AnswerStream:
    """Iterate it for the pieces; ``close()`` aborts the request when it has not
    finished. Whoever opened it should close it (or use it as ``async with``). The
    request is forgotten once its last piece is read; a stream dropped unclosed
    before that aborts its request when it is garbage-collected (a server's client
    that left before the response began), rather than holding its place (and its
    admission slot) for ever."""

    def __init__(
        self,
        request_id: str,
        queue: asyncio.Queue,
        prompt_length: int,
        release: Callable[[bool], None],
    ) -> None:
        self.request_id = request_id
        self._queue = queue
        self._prompt_length = prompt_length  # read at open: the engine thread owns seq
        self._release = release  # (finished) -> abort the request, or forget it
        self._generated = 0  # tokens delivered so far, for the final piece of an abort
        self._ends = _Ends()
        loop = asyncio.get_running_loop()
        self._finalizer = weakref.finalize(self, _release_dropped, loop, release, self._ends)

    def __aiter__(self) -> AnswerStream:
        return self

    async def __anext__(self) -> Response:
        if self._ends.finished or (self._ends.closed and self._queue.empty()):
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is DONE:  # aborted: the same end generate() reports
            self._end()
            return Response("", self._prompt_length, self._generated, "abort", self.request_id)
        if isinstance(item, BaseException):
            self._end()
            raise item
        self._generated = item.generated_length
        if item.finish_reason is not None:
            self._end()
        return item

    def _end(self) -> None:
        """The last piece was read: the engine forgets the request now (a caller that
        never closes the stream must not keep it counted as held)."""
        self._ends.finished = True
        self.close()

    def close(self) -> None:
        """Abort the request if it has not finished; idempotent. A reader waiting for
        a piece meanwhile gets the abort's empty piece."""
        if not self._ends.closed:
            self._ends.closed = True
            self._finalizer.detach()
            finished = self._ends.finished
            self._release(finished)
            if not finished:  # the engine no longer writes to this queue
                self._queue.put_nowait(DONE)

    async def __aenter__(self) -> AnswerStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
