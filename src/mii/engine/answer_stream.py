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
from collections.abc import Callable

from mii.response import Response

DONE = object()  # put on a request's queue when the engine aborted it


class AnswerStream:
    """Iterate it for the pieces; ``close()`` aborts the request when it has not
    finished (and forgets it when it has). Whoever opened it must close it (or use
    it as ``async with``): one dropped unclosed runs to its end."""

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
        self._finished = False
        self._closed = False

    def __aiter__(self) -> AnswerStream:
        return self

    async def __anext__(self) -> Response:
        if self._finished or (self._closed and self._queue.empty()):
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is DONE:  # aborted: the same end generate() reports
            self._finished = True
            return Response("", self._prompt_length, self._generated, "abort", self.request_id)
        if isinstance(item, BaseException):
            self._finished = True
            raise item
        self._finished = item.finish_reason is not None
        self._generated = item.generated_length
        return item

    def close(self) -> None:
        """Abort the request if it has not finished; idempotent. A reader waiting for
        a piece meanwhile gets the abort's empty piece."""
        if not self._closed:
            self._closed = True
            finished = self._finished
            self._release(finished)
            if not finished:  # the engine no longer writes to this queue
                self._queue.put_nowait(DONE)

    async def __aenter__(self) -> AnswerStream:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()
