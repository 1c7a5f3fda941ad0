"""Watching the calls the pool has in flight on its replicas: a call on a replica
that stopped making progress fails with UNAVAILABLE, and so does every call still
running when a shutdown's grace period ends.

What counts as progress: a replica's process is alive when it answers the pool's
health probe (every 0.5 s, each with a 1 s deadline: :meth:`ReplicaPool.check`);
a call progresses when a piece of its answer arrives. A call fails as *frozen*
only when both have been silent for ``progress_timeout_s``: a long prefill on a
busy but healthy replica sends no piece, yet its replica answers its probes, so it
is left alone; a replica stopped with SIGSTOP (or wedged in any other way) answers
nothing, so its calls fail and the replica leaves rotation (it rejoins once it
answers its probes again). A unary ``Generate`` call has no pieces: only its
replica's silence decides.

One monitor task per pool looks at every watched call a few times per second,
instead of one timer per call or per piece.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from typing import Any, Protocol, TypeVar

from mii.errors import NoReplicaError

T = TypeVar("T")

CHECK_INTERVAL_S = 0.25  # how often the monitor looks at the watched calls
DEFAULT_PROGRESS_TIMEOUT_S = 30.0


class CutWhileServingError(NoReplicaError):
    """A request the deployment ended while a replica was serving it: a failure of
    the deployment's (metrics count it as ``finish_reason="error"``), not a refusal
    before it started."""


class ReplicaUnresponsiveError(CutWhileServingError):
    """The replica serving a request stopped making progress (no piece, no answer
    to its health probes) for longer than the deployment's ``replica_timeout_s``.
    Answered as UNAVAILABLE / HTTP 503: a retry goes to another replica."""


class ShuttingDownError(NoReplicaError):
    """The deployment is shutting down: it takes no new request (UNAVAILABLE / HTTP
    503), and ends the requests still running when its grace period is over."""


class ShutDownWhileServingError(ShuttingDownError, CutWhileServingError):
    """A request still running when a shutdown's grace period ended."""


class _Probed(Protocol):
    """What the guard reads of a replica (``mii.rpc.pool.Replica``)."""

    address: str
    healthy: bool
    unanswered_since: float | None  # when its probes started failing; None if it answers


class Watch:
    """One call in flight on one replica."""

    def __init__(self, guard: CallGuard, replica: _Probed, call: Any) -> None:
        self.guard = guard
        self.replica = replica
        self.call = call
        self.last_progress = time.monotonic()
        self.reason: NoReplicaError | None = None  # set when the guard cut the call

    def progress(self) -> None:
        """A piece arrived."""
        self.last_progress = time.monotonic()

    def cut(self, reason: NoReplicaError) -> None:
        if self.reason is None:
            self.reason = reason
            self.call.cancel()

    def raise_reason(self) -> None:
        """Raise why the guard cut the call (after its ``CancelledError``), if it did."""
        if self.reason is not None:
            raise self.reason from None

    def close(self) -> None:
        self.guard._watches.discard(self)


class CallGuard:
    """The pool's watch over its calls in flight, and its shutdown switches.

    ``progress_timeout_s``: how long a call and its replica may both stay silent
    before the call fails (the deployment's ``replica_timeout_s``).
    ``draining``: new calls are refused (set when a shutdown begins).
    """

    def __init__(self, progress_timeout_s: float = DEFAULT_PROGRESS_TIMEOUT_S) -> None:
        self.progress_timeout_s = progress_timeout_s
        self.draining = False
        self.cut_all_calls = False
        self._watches: set[Watch] = set()
        self._monitor: asyncio.Task | None = None

    def watch(self, replica: _Probed, call: Any) -> Watch:
        """Start watching ``call`` (a grpc.aio call) on ``replica``; ``close()`` the
        watch when the call ends. A call the guard cuts is cancelled: its reader
        gets ``CancelledError``, then calls :meth:`Watch.raise_reason`."""
        watch = Watch(self, replica, call)
        self._watches.add(watch)
        if self.cut_all_calls:
            watch.cut(ShuttingDownError("the deployment is shutting down"))
        elif self._monitor is None or self._monitor.done():
            self._monitor = asyncio.get_running_loop().create_task(self._run())
        return watch

    async def result(self, replica: _Probed, call: Awaitable[T]) -> T:
        """The answer of a unary call, watched like a stream without pieces."""
        watch = self.watch(replica, call)
        try:
            return await call
        except (asyncio.CancelledError, Exception):
            # (a cut Ray call raises Ray's RequestCancelledError, not CancelledError)
            watch.raise_reason()
            raise
        finally:
            watch.close()

    def in_flight(self) -> int:
        return len(self._watches)

    def cut_all(self) -> None:
        """End every call in flight, and any started from now on, with
        ShuttingDownError (a shutdown's grace period is over)."""
        self.cut_all_calls = True
        for watch in list(self._watches):
            watch.cut(
                ShutDownWhileServingError("the deployment shut down before the request finished")
            )

    def frozen(self, watch: Watch, now: float) -> bool:
        """Neither the call nor its replica made progress for ``progress_timeout_s``."""
        silent_since = watch.replica.unanswered_since
        limit = self.progress_timeout_s
        return (
            silent_since is not None
            and now - silent_since >= limit
            and now - watch.last_progress >= limit
        )

    async def _run(self) -> None:
        # Ends when nothing is watched (it restarts with the next call), so that a
        # pool leaves no task behind.
        while self._watches:
            await asyncio.sleep(CHECK_INTERVAL_S)
            now = time.monotonic()
            for watch in list(self._watches):
                if watch.reason is None and self.frozen(watch, now):
                    watch.replica.healthy = False  # out of rotation until it answers again
                    watch.cut(
                        ReplicaUnresponsiveError(
                            f"replica {watch.replica.address} stopped responding: no answer "
                            f"for {self.progress_timeout_s:g} s (replica_timeout_s)"
                        )
                    )

    async def close(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
