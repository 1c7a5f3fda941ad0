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
import collections
import contextlib
import weakref
from collections.abc import Callable
from typing import Any

from mii.response import Response

DONE = object()  # put on a request's queue when the engine aborted it


class _Ends:
    """What an AnswerStream's finalizer needs to know (not the stream: it must not
    keep the stream alive)."""

    finished = False
    closed = False


def _dropped(on_drop: Callable[[bool], None], ends: _Ends) -> None:
    """A stream garbage-collected unclosed: hand its request back (``on_drop`` must be
    safe on any thread: the collector may run this anywhere, after its loop ended)."""
    if not ends.closed:
        on_drop(ends.finished)


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
        on_drop: Callable[[bool], None],
    ) -> None:
        self.request_id = request_id
        self._queue = queue
        self._prompt_length = prompt_length  # read at open: the engine thread owns seq
        self._release = release  # (finished) -> abort the request, or forget it
        self._generated = 0  # tokens delivered so far, for the final piece of an abort
        self._ends = _Ends()
        # (finished) -> the same as release, from whatever thread collects the stream
        self._finalizer = weakref.finalize(self, _dropped, on_drop, self._ends)

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


class StreamReleases:
    """How an engine lets go of its streams' requests: at their end (``release``, on
    its event loop's thread: abort one that did not finish, else forget it) or when
    one is collected unclosed (``dropped``, from whatever thread collects it, perhaps
    after its event loop ended; the engine loop applies those: ``apply_dropped``)."""

    def __init__(
        self,
        queues: dict[str, Any],
        request_abort: Callable[[str, object], None],
        loop_and_wakeup: Callable[[], tuple[asyncio.AbstractEventLoop | None, Any]],
    ) -> None:
        self._queues = queues  # the engine's: request id -> its consumer's queue
        self._request_abort = request_abort  # (request id, owner)
        self._loop_and_wakeup = loop_and_wakeup  # the engine loop's, now
        self._dropped: collections.deque = collections.deque()  # (id, queue, finished)

    def __bool__(self) -> bool:
        """Whether dropped streams wait for the engine loop."""
        return bool(self._dropped)

    def release(self, request_id: str, queue: object, finished: bool) -> None:
        if not finished:
            self._request_abort(request_id, queue)
        elif self._queues.get(request_id) is queue:
            del self._queues[request_id]

    def dropped(self, request_id: str, queue: object, finished: bool) -> None:
        self._dropped.append((request_id, queue, finished))  # (a deque: thread-safe)
        loop, wakeup = self._loop_and_wakeup()
        if loop is not None and wakeup is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # (closed meanwhile: the next loop's)
                loop.call_soon_threadsafe(wakeup.set)

    def apply_dropped(self) -> None:
        while self._dropped:
            self.release(*self._dropped.popleft())
