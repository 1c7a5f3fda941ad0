"""Shutting a deployment down without cutting its clients off mid-answer.

On SIGTERM, SIGINT, SIGHUP (its terminal closed; unless ignored, as nohup does)
or a Terminate call the deployment drains:

1. it refuses new requests (HTTP 503, gRPC UNAVAILABLE; ``/health`` says
   ``draining``, gRPC health NOT_SERVING);
2. it lets the requests in flight finish, for up to ``shutdown_grace_s``;
3. it ends those still running: an SSE stream with an error event and
   ``data: [DONE]``, a gRPC call with UNAVAILABLE, a whole-answer HTTP request
   with 503; then it stops its servers and replicas.

A second signal during the grace period ends it at once (step 3).
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time

from mii.rpc.pool import ReplicaPool

CUT_WAIT_S = 5.0  # for the cut calls to deliver their error before the servers stop
_POLL_S = 0.05


def stop_signals() -> list[signal.Signals]:
    """The signals that drain a deployment: SIGINT, SIGTERM, and SIGHUP (a closed
    terminal or SSH session ended ``mii serve`` at once, cutting its streams) unless
    this process ignores it (``nohup``: a handler would undo what nohup asked)."""
    signals = [signal.SIGINT, signal.SIGTERM]
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signals.append(signal.SIGHUP)
    return signals


class ShutdownRequest:
    """The deployment's stop switches: ``stop`` starts the drain, ``hurry`` ends
    its grace period early. ``request()`` (a signal handler) sets the first, then
    the second."""

    def __init__(self) -> None:
        self.stop = asyncio.Event()
        self.hurry = asyncio.Event()

    def request(self) -> None:
        if self.stop.is_set():
            self.hurry.set()
        else:
            self.stop.set()


async def drain(pool: ReplicaPool, grace_s: float, hurry: asyncio.Event | None = None) -> bool:
    """Refuse new requests, wait up to ``grace_s`` for those in flight, then cut
    the rest. True if every request finished within the grace period."""
    pool.guard.draining = True
    deadline = time.monotonic() + grace_s
    in_flight = pool.guard.in_flight()
    if in_flight:
        _say(f"draining: {in_flight} request(s) in flight, waiting up to {grace_s:g} s")
    while pool.guard.in_flight() and time.monotonic() < deadline:
        if hurry is not None and hurry.is_set():
            break
        await asyncio.sleep(_POLL_S)
    left = pool.guard.in_flight()
    pool.guard.cut_all()
    if left:
        _say(f"ending {left} request(s) still in flight (shutdown_grace_s={grace_s:g})")
    cut_deadline = time.monotonic() + CUT_WAIT_S
    while pool.guard.in_flight() and time.monotonic() < cut_deadline:
        await asyncio.sleep(_POLL_S)
    # The error events and statuses are written after the pool's calls end.
    await asyncio.sleep(0.1)
    return left == 0


def _say(message: str) -> None:
    print(f"[mii] {message}", file=sys.stderr, flush=True)
