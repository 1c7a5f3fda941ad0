"""The deployment's view of its replicas: least-loaded routing, health tracking,
stream pass-through, and the request metrics that /metrics exports.

Both the gRPC load balancer and the REST gateway route through one
``ReplicaPool``; neither schedules anything (each replica's engine does).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mii.errors import NoReplicaError, ReplicaError, UnavailableError
from mii.response import Response
from mii.rpc import auth, mii_pb2, mii_pb2_grpc
from mii.rpc.call_guard import CallGuard, ReplicaUnresponsiveError, ShuttingDownError
from mii.rpc.convert import (
    ACCEPTED_METADATA,
    QUICK_RECONNECT,
    UNLIMITED_MESSAGES,
    Prompt,
    piece_from_proto,
    request_for,
)
from mii.rpc.metrics import Metrics
from mii.rpc.outcomes import Outcome, counted_stream
from mii.rpc.status import error_from_grpc, is_overload

log = logging.getLogger(__name__)

HEALTH_INTERVAL_S = 0.5
HEALTH_PROBE_TIMEOUT_S = 1.0  # a probe not answered within this is missed
OLD_CHANNEL_GRACE_S = 30.0  # a restarted replica's old channel, before its calls are cancelled


@dataclass(eq=False)
class Replica:
    address: str
    token: str | None = None  # presented on every call (the replica's port requires it)
    channel: grpc.aio.Channel = field(init=False)
    stub: mii_pb2_grpc.MiiStub = field(init=False)
    # Old channels closing (move_to), by the task that closes each.
    _retiring: dict[asyncio.Task, grpc.aio.Channel] = field(
        default_factory=dict, init=False, repr=False
    )
    in_flight: int = 0
    healthy: bool = False
    last_stats: mii_pb2.StatsReply = field(default_factory=mii_pb2.StatsReply)
    # When its health probes began to go unanswered (None while it answers): see call_guard.
    unanswered_since: float | None = None
    # Kept by the deployment's supervisor (mii.rpc.supervisor); None when unsupervised.
    state: str | None = None
    restarts: int = 0
    pid: int | None = None

    def __post_init__(self) -> None:
        self._connect()

    def _connect(self) -> None:
        # Any size: the gateway passes on requests up to its own limit, and replies
        # (token ids, return_full_text) can exceed grpc's 4 MiB default.
        self.channel = auth.aio_channel(
            self.address, self.token, (*UNLIMITED_MESSAGES, *QUICK_RECONNECT), proof=True
        )
        self.stub = mii_pb2_grpc.MiiStub(self.channel)

    def move_to(self, address: str) -> None:
        """Talk to this replica at ``address`` from now on (its restarted process
        listens there). Call it once the old process has exited: the old channel
        closes after its calls end, and one still running after
        ``OLD_CHANNEL_GRACE_S`` is cancelled (its awaiter gets CancelledError)."""
        if address == self.address:
            return
        old = self.channel
        self.address = address
        self._connect()
        # With a grace: closing cancels the calls still on it, and a cancelled call
        # raises CancelledError into whoever awaits it (a health probe of a Stats
        # call, which then never answered). Its calls end sooner anyway: probes by
        # their deadline, calls to the exited process at once.
        closing = asyncio.get_running_loop().create_task(old.close(grace=OLD_CHANNEL_GRACE_S))
        self._retiring[closing] = old
        closing.add_done_callback(lambda done: self._retiring.pop(done, None))

    async def close(self) -> None:
        """Close its channels: the current one and any old one still closing."""
        await asyncio.gather(self.channel.close(), *(c.close() for c in self._retiring.values()))


def stats_reply(stats: dict[str, Any], in_flight: int) -> mii_pb2.StatsReply:
    """A replica's ``Stats`` answer from its engine's ``stats()`` (a Ray replica's
    posted figures hold the same keys)."""
    return mii_pb2.StatsReply(
        running=int(stats["running"]),
        waiting=int(stats["waiting"]),
        kv_cache_usage=float(stats["kv_cache_usage"]),
        preemptions=int(stats["preemptions"]),
        in_flight=in_flight,
        prompt_tokens=int(stats["prompt_tokens"]),
        generation_tokens=int(stats["generation_tokens"]),
        kv_blocks=int(stats["num_kv_blocks"]),
        kv_block_size=int(stats["kv_block_size"]),
        max_length=int(stats["max_length"]),
        quantization=str(stats.get("quantization", "")),
        kv_cache_dtype=str(stats.get("kv_cache_dtype", "")),
        prefix_cache_queries=int(stats.get("prefix_cache_queries", 0)),
        prefix_cache_hits=int(stats.get("prefix_cache_hits", 0)),
    )


def summed_stats(
    live: list[mii_pb2.StatsReply], every: list[mii_pb2.StatsReply]
) -> mii_pb2.StatsReply:
    """A deployment's figures from its replicas' last readings: the load and the KV
    cache of the ``live`` ones (those in rotation), the tokens processed and the
    preemptions of ``every`` one (counts: a replica that misses a health check must not
    leave the sum and come back as new ones). ``in_flight`` is the caller's (it counts
    calls, not readings)."""
    total = mii_pb2.StatsReply()
    for s in live:
        total.running += s.running
        total.waiting += s.waiting
        total.kv_blocks += s.kv_blocks
        total.kv_block_size = s.kv_block_size
        total.max_length = max(total.max_length, s.max_length)
        total.quantization = total.quantization or s.quantization
        total.kv_cache_dtype = total.kv_cache_dtype or s.kv_cache_dtype
    for s in every:
        total.preemptions += s.preemptions
        total.prompt_tokens += s.prompt_tokens
        total.generation_tokens += s.generation_tokens
        total.prefix_cache_queries += s.prefix_cache_queries
        total.prefix_cache_hits += s.prefix_cache_hits
    total.kv_cache_usage = sum(s.kv_cache_usage for s in live) / len(live) if live else 0.0
    return total


def _none_left(refusal: UnavailableError) -> NoReplicaError:
    """The error of a call that every replica refused, the last as unavailable: the
    deployment's own (no_replica_available), saying why in words; gRPC's transport
    details ("failed to connect to all addresses; ipv4:...") go to the log."""
    detail = str(refusal).removeprefix("UNAVAILABLE: ")
    if "failed to connect" in detail or "Socket closed" in detail:
        # (debug: every call fails so while a replica restarts, which is logged anyway)
        log.debug("no replica left to try; the last one: %s", detail)
        detail = "it is unreachable (a restart may be under way)"
    return NoReplicaError(
        f"no replica of this deployment is available: the last one tried refused the call "
        f"({detail}); retry shortly"
    )


class ReplicaPool:
    def __init__(self, addresses: list[str], token: str | None = None) -> None:
        """Replicas at ``addresses``; every call presents ``token`` (the deployment's
        internal token, never a client's API key)."""
        self.token = token  # for replicas added later (Replica(address, pool.token))
        self.replicas = [Replica(a, token) for a in addresses]
        self.metrics = Metrics()
        self.guard = CallGuard()  # frozen replicas, shutdown (mii.rpc.call_guard)

    # ----- routing ------------------------------------------------------------

    def _pick(self, exclude: set[int], refusal: Exception | None = None) -> Replica:
        """The least-loaded replica in rotation not in ``exclude``; when none is left,
        ``refusal`` (why the last one refused: overloaded, unavailable) is raised."""
        if self.guard.draining:
            raise ShuttingDownError("the deployment is shutting down; it takes no new request")
        candidates = [r for r in self.replicas if r.healthy and id(r) not in exclude]
        if not candidates:
            if isinstance(refusal, UnavailableError) and not isinstance(refusal, NoReplicaError):
                raise _none_left(refusal)
            if refusal is not None:
                raise refusal
            raise NoReplicaError("no replica of this deployment is available")
        return min(candidates, key=lambda r: r.in_flight)

    async def generate(
        self, prompts: list[Prompt], params: dict[str, Any], timeout: float | None = None
    ) -> list[Response]:
        """Whole answers from the least-loaded replica (retried elsewhere if it is
        down, full, or froze while answering: replica_timeout_s). Prompts are texts
        or token-id prompts (passed on as they are)."""
        with Outcome(self.metrics, len(prompts)):
            return await self._generate(prompts, params, timeout)

    async def _generate(
        self, prompts: list[Prompt], params: dict[str, Any], timeout: float | None
    ) -> list[Response]:
        request = request_for(prompts, params)
        tried: set[int] = set()
        refusal: Exception | None = None
        start = time.perf_counter()
        while True:
            replica = self._pick(tried, refusal)
            replica.in_flight += 1
            try:
                reply = await self.guard.result(
                    replica, replica.stub.Generate(request, timeout=timeout)
                )
            except ReplicaUnresponsiveError as err:
                # Its replica froze: nothing of a whole answer reached anyone, so another
                # replica may take it (it failed, though one was serving: a user trial).
                tried.add(id(replica))
                refusal = err
                continue
            except grpc.aio.AioRpcError as err:
                if self._out_of_rotation(replica, err) or is_overload(err):
                    tried.add(id(replica))
                    refusal = error_from_grpc(err, ReplicaError)
                    continue
                raise error_from_grpc(err, ReplicaError) from None
            finally:
                replica.in_flight -= 1
            responses = [piece_from_proto(p) for p in reply.responses]
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
        """Pieces of one answer. Closing the iterator cancels the replica's call,
        which aborts the request there. ``announce``: first a ``None`` as soon as the
        replica's engine accepted the request (before any token)."""
        return counted_stream(self._stream(prompt, params, timeout, announce), self.metrics)

    async def _stream(
        self, prompt: Prompt, params: dict[str, Any], timeout: float | None, announce: bool
    ) -> AsyncIterator[Response | None]:
        request = request_for([prompt], params)
        tried: set[int] = set()
        refusal: Exception | None = None
        start = time.perf_counter()
        while True:
            replica = self._pick(tried, refusal)
            replica.in_flight += 1
            call = replica.stub.GenerateStream(request, timeout=timeout)
            watch = self.guard.watch(replica, call)
            received = 0
            timing = self.metrics.stream_timing(start)
            try:
                if announce:
                    # (empty when the call failed first: its error comes from the pieces)
                    metadata = await call.initial_metadata()
                    if metadata and tuple(ACCEPTED_METADATA[0]) in tuple(metadata):
                        announce = False  # once, whatever replica ends up serving it
                        yield None
                async for piece in call:
                    watch.progress()
                    response = piece_from_proto(piece)
                    received += 1
                    timing.observe(response)
                    yield response
                return
            except grpc.aio.AioRpcError as err:
                if received == 0 and (self._out_of_rotation(replica, err) or is_overload(err)):
                    tried.add(id(replica))
                    refusal = error_from_grpc(err, ReplicaError)
                    continue
                if received and err.code() == grpc.StatusCode.UNAVAILABLE:
                    # (gRPC says "Stream removed (Socket closed)": say what happened)
                    raise UnavailableError(
                        "UNAVAILABLE: the replica serving this request stopped mid-answer "
                        f"({err.details()}); the deployment restarts it: send the request "
                        "again"
                    ) from None
                raise error_from_grpc(err, ReplicaError) from None
            except asyncio.CancelledError:
                watch.raise_reason()  # the guard cut it: frozen replica, or shutdown
                raise
            finally:
                watch.close()
                call.cancel()
                replica.in_flight -= 1

    def _out_of_rotation(self, replica: Replica, err: grpc.aio.AioRpcError) -> bool:
        """Take a replica that stopped answering out of rotation; True if the call may
        be retried on another."""
        if err.code() == grpc.StatusCode.UNAVAILABLE:
            replica.healthy = False
            return True
        return False

    # ----- health and stats -----------------------------------------------------

    async def check(self, replica: Replica, timeout: float = HEALTH_PROBE_TIMEOUT_S) -> bool:
        started = time.monotonic()
        try:
            stub = health_pb2_grpc.HealthStub(replica.channel)
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=timeout)
            replica.unanswered_since = None  # any answer shows the process is alive
            replica.healthy = reply.status == health_pb2.HealthCheckResponse.SERVING
            if replica.healthy:
                replica.last_stats = await replica.stub.Stats(
                    mii_pb2.StatsRequest(), timeout=timeout
                )
        except (grpc.aio.AioRpcError, asyncio.TimeoutError):
            replica.healthy = False
            if replica.unanswered_since is None:
                replica.unanswered_since = started
        return replica.healthy

    async def check_all(self) -> int:
        await asyncio.gather(*(self.check(r) for r in self.replicas))
        self._export()
        return sum(r.healthy for r in self.replicas)

    async def watch(self) -> None:
        """Keep health and stats fresh; replicas leave and rejoin rotation as they answer."""
        while True:
            await self.check_all()
            await asyncio.sleep(HEALTH_INTERVAL_S)

    def stats(self) -> mii_pb2.StatsReply:
        total = summed_stats(
            [r.last_stats for r in self.replicas if r.healthy],
            [r.last_stats for r in self.replicas],
        )
        total.in_flight = sum(r.in_flight for r in self.replicas)
        return total

    def _export(self) -> None:
        self.metrics.export_pool(self.stats(), sum(r.healthy for r in self.replicas))

    async def terminate_all(self) -> None:
        async def stop(replica: Replica) -> None:
            with contextlib.suppress(grpc.aio.AioRpcError):
                await replica.stub.Terminate(mii_pb2.TerminateRequest(), timeout=2.0)

        await asyncio.gather(*(stop(r) for r in self.replicas))

    async def close(self) -> None:
        await self.guard.close()
        await asyncio.gather(*(r.close() for r in self.replicas))
