"""Counting, in a deployment's metrics, the requests that end without an answer.

The pool counts each answer's ``finish_reason`` ("stop", "length", "abort") where
it arrives. A request can also end with none:

- its client left: cancelled the call, closed the stream, disconnected, or its
  deadline passed. ``mii_requests_total{finish_reason="abort"}`` and
  ``mii_requests_cancelled_total`` count it (the replica aborted it).
- it was refused before it started: ``mii_requests_rejected_total{reason}``,
  ``reason`` "overloaded" (max_queued_requests reached: 429 / RESOURCE_EXHAUSTED)
  or "unavailable" (no replica in rotation: 503 / UNAVAILABLE).
- it failed (a replica failed, crashed, became unreachable or stopped answering
  while serving it, or a shutdown's grace period ended first):
  ``mii_requests_total{finish_reason="error"}``.

A request refused as invalid (400) is the caller's mistake, not a served
request: it is not counted, also when found invalid while generating (a
structured-output constraint that admits no further text). The sibling choices of
a request that failed or was refused as a whole (``n`` > 1, or several prompts
streamed) end as it did: the gateway withdraws those still running
(:func:`withdraw`: not counted as their client leaving) and counts them with the
request's own ending, so that a refused ``n=3`` request adds 3 refusals.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any

from mii.errors import InvalidRequestError, NoReplicaError, ServerOverloadedError
from mii.response import Response
from mii.rpc.call_guard import CutWhileServingError

# Labels every deployment exports from the start (at 0), so that dashboards and
# alerts find the series before the first refusal.
# overloaded: the queue is full (429); unavailable: no replica serves (503);
# connections: the gateway's HTTP connection cap (503, counted per connection).
REJECT_REASONS = ("overloaded", "unavailable", "connections")
# The tasks of choices withdrawn because their request failed. (A set of tasks, not
# a cancellation message: a library between here and the awaited call, gRPC's, may
# raise a CancelledError of its own.)
_withdrawn: weakref.WeakSet[asyncio.Future] = weakref.WeakSet()


def withdraw(task: asyncio.Future) -> None:
    """Cancel a sibling choice of a request that failed or was refused: its
    ending is not counted (the request's own refusal or failure is)."""
    _withdrawn.add(task)
    task.cancel()


class Outcome:
    """Counts how the ``n`` requests of one call ended, when they end with an
    exception rather than an answer. ``finished`` (set once the answer's last
    piece went out) keeps a client that leaves after that from counting twice."""

    def __init__(self, metrics: Any, n: int = 1) -> None:
        self.metrics = metrics  # mii.rpc.pool.Metrics
        self.n = n
        self.finished = False

    def __enter__(self) -> Outcome:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        err: BaseException | None,
        traceback: TracebackType | None,
    ) -> bool:
        if err is not None and not self.finished:
            count_ending(self.metrics, err, self.n)
        return False  # the exception goes on


def count_ending(metrics: Any, err: BaseException, n: int = 1) -> None:
    """Count ``n`` requests that ended with ``err`` instead of an answer."""
    m = metrics
    if asyncio.current_task() in _withdrawn:
        return
    if isinstance(err, (asyncio.CancelledError, GeneratorExit, TimeoutError)):
        m.requests.labels("abort").inc(n)
        m.cancelled.inc(n)
    elif isinstance(err, CutWhileServingError):  # (a NoReplicaError, but it had started)
        m.requests.labels("error").inc(n)
    elif isinstance(err, ServerOverloadedError):
        m.rejected.labels("overloaded").inc(n)
    elif isinstance(err, NoReplicaError):
        m.rejected.labels("unavailable").inc(n)
    elif not isinstance(err, InvalidRequestError):
        m.requests.labels("error").inc(n)


async def counted_stream(
    pieces: AsyncIterator[Response | None], metrics: Any
) -> AsyncIterator[Response | None]:
    """A pool's stream of one answer, its ending counted (:class:`Outcome`); closing
    it closes ``pieces`` (which aborts the request on its replica). A ``None`` (the
    replica's acceptance) passes through uncounted."""
    try:
        with Outcome(metrics) as outcome:
            async for piece in pieces:
                outcome.finished = piece is not None and piece.finish_reason is not None
                yield piece
    finally:
        await pieces.aclose()
