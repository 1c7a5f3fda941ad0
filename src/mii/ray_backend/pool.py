"""A Ray deployment's view of its replicas, with the interface of
:class:`mii.rpc.pool.ReplicaPool`, so that the gRPC front (``BalancerServicer``),
the HTTP routes, the drain and the log lines work on it unchanged.

Ray Serve picks the replica of each request (its handle routes on queue lengths);
this pool only passes requests on, retries one whose replica died before it
answered anything, keeps the deployment's metrics, and reads the replicas' figures
from the deployment's board (:mod:`mii.ray_backend.board`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from mii.errors import ReplicaError, UnavailableError
from mii.prompts import Prompt
from mii.ray_backend.board import NAMESPACE
from mii.ray_backend.wire import piece_from_wire, raise_if_error
from mii.response import Response
from mii.rpc import mii_pb2
from mii.rpc.call_guard import CallGuard, ShuttingDownError
from mii.rpc.convert import validated
from mii.rpc.metrics import Metrics
from mii.rpc.outcomes import Outcome, counted_stream
from mii.rpc.pool import stats_reply, summed_stats

HEALTH_INTERVAL_S = 0.5
# A request whose replica died before answering is sent again (Ray Serve routes it to
# a live replica once it has noticed the death) for at most this long.
RETRY_FOR_S = 30.0
RETRY_PAUSE_S = 0.2


@dataclass(eq=False)
class RayReplicaView:
    """One Serve replica as the deployment's health and stats see it."""

    replica_id: str
    address: str = ""  # its node's IP address
    pid: int | None = None
    in_flight: int = 0
    healthy: bool = True
    state: str = "serving"
    restarts: int = 0
    unanswered_since: float | None = None  # Ray's health checks watch replicas, not the guard
    last_stats: mii_pb2.StatsReply = field(default_factory=mii_pb2.StatsReply)


class _Route:
    """What the call guard needs of "the replica" of a call: Ray picks it, so none."""

    address = "ray-serve"
    healthy = True
    unanswered_since = None


def _replica_died(err: BaseException) -> bool:
    """Whether ``err`` says the replica went away (a retry elsewhere can succeed)."""
    import ray.exceptions as rex

    return isinstance(err, (rex.RayActorError, rex.ActorUnavailableError))


def _as_mii_error(err: Exception) -> Exception:
    """Ray's own errors (a replica that died, a failed task) as mii's kinds, so that
    every surface answers them from the one table of :mod:`mii.rpc.status`;
    mii's errors (from :mod:`mii.ray_backend.wire`) as they are."""
    import ray.exceptions as rex

    if _replica_died(err):
        return UnavailableError(f"the replica serving this request died: {err}")
    if isinstance(err, rex.RayError):
        return ReplicaError(f"{type(err).__name__}: {err}")
    return err


class RayPool:
    """Requests through a Serve deployment handle of ``MiiReplica``; figures from
    the board actor named ``board_name``."""

    def __init__(self, handle: Any, board_name: str) -> None:
        import ray

        self.handle = handle
        self.board = ray.get_actor(board_name, namespace=NAMESPACE)
        self.metrics = Metrics()
        self.guard = CallGuard()
        self.replicas: list[RayReplicaView] = []
        self._route = _Route()

    # ----- requests ------------------------------------------------------------

    def _check_open(self) -> None:
        if self.guard.draining:
            raise ShuttingDownError("the deployment is shutting down; it takes no new request")

    async def generate(
        self, prompts: list[Prompt], params: dict[str, Any], timeout: float | None = None
    ) -> list[Response]:
        """Whole answers, from the replica Ray Serve picks."""
        with Outcome(self.metrics, len(prompts)):
            start = time.perf_counter()
            deadline = time.monotonic() + RETRY_FOR_S
            params = validated(params)  # mistakes answer here, before any replica is asked
            while True:
                self._check_open()
                call = self.handle.generate.remote(list(prompts), params)
                try:
                    reply = raise_if_error(await self.guard.result(self._route, call))
                except asyncio.CancelledError:  # the caller left: abort it on the replica
                    call.cancel()
                    raise
                except Exception as err:
                    if _replica_died(err) and time.monotonic() < deadline:
                        await asyncio.sleep(RETRY_PAUSE_S)
                        continue
                    raise _as_mii_error(err) from None
                responses = [piece_from_wire(p) for p in reply["pieces"]]
                elapsed = time.perf_counter() - start
                for r in responses:
                    self.metrics.observe_answer(r, elapsed)
                return responses

    def stream(
        self,
        prompt: Prompt,
        params: dict[str, Any],
        timeout: float | None = None,
        announce: bool = False,
    ) -> AsyncIterator[Response | None]:
        """Pieces of one answer. Closing the iterator cancels the replica's
        generator, which aborts the request there. ``announce``: first a ``None``
        as soon as the replica's engine accepted the request (before any token)."""
        return counted_stream(self._stream(prompt, params, announce), self.metrics)

    async def _stream(
        self, prompt: Prompt, params: dict[str, Any], announce: bool
    ) -> AsyncIterator[Response | None]:
        start = time.perf_counter()
        deadline = time.monotonic() + RETRY_FOR_S
        params = validated(params)
        stream = self.handle.options(method_name="stream", stream=True)
        while True:
            self._check_open()
            call = stream.remote(prompt, params)
            watch = self.guard.watch(self._route, call)
            timing = self.metrics.stream_timing(start)
            received = 0
            try:
                async for item in call:
                    watch.progress()
                    if "accepted" in item:  # said once, before any piece
                        if announce:
                            announce = False
                            yield None
                        continue
                    piece = piece_from_wire(raise_if_error(item)["piece"])
                    received += 1
                    timing.observe(piece)
                    yield piece
                return
            except asyncio.CancelledError:
                watch.raise_reason()  # cut by the guard: the shutdown's grace period ended
                raise
            except Exception as err:
                # Cut by the guard, Ray's call raises RequestCancelledError: the reason
                # (ShuttingDownError: UNAVAILABLE) rather than an INTERNAL error.
                watch.raise_reason()
                if _replica_died(err) and received == 0 and time.monotonic() < deadline:
                    await asyncio.sleep(RETRY_PAUSE_S)
                    continue
                raise _as_mii_error(err) from None
            finally:
                watch.close()
                call.cancel()

    # ----- health and stats -----------------------------------------------------

    async def check_all(self) -> int:
        """Read the board; return how many replicas serve."""
        posts = await self.board.read.remote()
        known = {r.replica_id: r for r in self.replicas}
        self.replicas = [self._view(known.get(p["replica_id"]), p) for p in posts]
        self._export()
        return len(self.replicas)

    @staticmethod
    def _view(view: RayReplicaView | None, post: dict[str, Any]) -> RayReplicaView:
        view = view or RayReplicaView(post["replica_id"])
        view.address, view.pid, view.in_flight = post["node"], post["pid"], post["in_flight"]
        view.last_stats = stats_reply(post, int(post["in_flight"]))
        return view

    async def watch(self) -> None:
        """Keep the replicas' figures fresh."""
        while True:
            with contextlib.suppress(Exception):  # the board is gone: the deployment stops
                await self.check_all()
            await asyncio.sleep(HEALTH_INTERVAL_S)

    def stats(self) -> mii_pb2.StatsReply:
        readings = [r.last_stats for r in self.replicas]  # the board lists replicas alive
        total = summed_stats(readings, readings)
        total.in_flight = self.guard.in_flight()
        return total

    def _export(self) -> None:
        self.metrics.export_pool(self.stats(), len(self.replicas))

    async def close(self) -> None:
        await self.guard.close()
