"""The Prometheus metrics of a deployment (``GET /metrics``), in a registry of its own.

Names follow the project's ``mii_`` convention and, where the meaning is the
same, vLLM's (``vllm:prompt_tokens_total`` -> ``mii_prompt_tokens_total``).
The pool (:mod:`mii.rpc.pool`) observes every answer, whole or streamed;
:mod:`mii.rpc.outcomes` counts the requests that end without one.

Where the times come from:

- ``mii_e2e_request_latency_seconds``: measured by the deployment, from the
  request reaching its pool to the answer's last piece.
- ``mii_time_to_first_token_seconds``: a streamed request's, measured by the
  deployment (request to first piece); a whole answer's, by the engine (its
  arrival to its first token), which is all a whole answer can tell.
- ``mii_request_queue_time_seconds``: by the engine, from a request's arrival
  to its first forward pass.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from mii.response import Response
from mii.rpc.outcomes import REJECT_REASONS

if TYPE_CHECKING:  # the generated message classes, for annotations only
    from mii.rpc import mii_pb2

# Labels every deployment exports from the start (at 0), so that dashboards and
# alerts find the series before the first such request.
FINISH_REASONS = ("stop", "length", "abort", "error")
# Up to an hour: a long prompt on a CPU, or a long answer, takes minutes (a 2,048-
# token request took 117 s on 2 cores), and +Inf alone would hide how many.
_LATENCY_BUCKETS = (
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1,
    2.5,
    5,
    10,
    30,
    60,
    120,
    300,
    600,
    1800,
    3600,
)


class _WithoutCreated:
    """A registry's families without their ``*_created`` samples: prometheus_client
    adds one per counter and histogram series (its creation time: under
    ``mii_requests_created{finish_reason=...}`` a timestamp that reads as a count),
    which doubled the series and which vLLM does not export."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self):  # (what generate_latest reads)
        for family in self._registry.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


class Metrics:
    """Prometheus metrics of one deployment, in a registry of its own."""

    def exported(self) -> _WithoutCreated:
        """What ``GET /metrics`` exports: the registry without ``*_created`` series."""
        return _WithoutCreated(self.registry)

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("mii_requests_running", "Requests being generated", registry=r)
        self.waiting = Gauge("mii_requests_waiting", "Requests queued in the engines", registry=r)
        self.kv_usage = Gauge("mii_kv_cache_usage", "KV cache blocks in use, 0..1", registry=r)
        # A counter (rate() works on it), fed with the replicas' summed count as it grows:
        # a restarted replica starts again from 0, which must not make it go down.
        self.preemptions = Counter(
            "mii_preemptions", "Sequences preempted (recomputed later)", registry=r
        )
        self._preemptions_seen = 0
        self.healthy = Gauge("mii_replicas_healthy", "Replicas in rotation", registry=r)
        self.requests = Counter("mii_requests", "Finished requests", ["finish_reason"], registry=r)
        for reason in FINISH_REASONS:
            self.requests.labels(reason)
        # How requests that got no answer ended: see mii.rpc.outcomes.
        self.cancelled = Counter(
            "mii_requests_cancelled",
            "Requests ended by their client: call cancelled, stream closed, client "
            "disconnected or deadline passed (also counted as finish_reason abort)",
            registry=r,
        )
        self.rejected = Counter(
            "mii_requests_rejected",
            "Requests refused before they started: overloaded (429), unavailable (503), "
            "connections (503: the HTTP connection cap)",
            ["reason"],
            registry=r,
        )
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        self.prompt_tokens = Counter(
            "mii_prompt_tokens",
            "Prompt tokens of the requests answered (each one's usage.prompt_tokens)",
            registry=r,
        )
        self.generation_tokens = Counter(
            "mii_generation_tokens",
            "Tokens generated and delivered (streams cut short included, up to their last "
            "piece; a whole answer its client left before it was ready is not counted: its "
            "tokens never reach the gateway)",
            registry=r,
        )
        self.prefix_queries = Counter(
            "mii_prefix_cache_queries",
            "Prompt tokens looked up in the prefix cache (those of the requests answered)",
            registry=r,
        )
        self.prefix_hits = Counter(
            "mii_prefix_cache_hits",
            "Prompt tokens found in the prefix cache (usage.prompt_tokens_details.cached_tokens)",
            registry=r,
        )
        self.prefix_hit_rate = Gauge(
            "mii_prefix_cache_hit_rate",
            "Prefix cache hits / queries, in tokens, since the deployment started",
            registry=r,
        )
        self.ttft = Histogram(
            "mii_time_to_first_token_seconds",
            "Time to first token (streamed: request to first piece; whole answers: "
            "the engine's, arrival to first token)",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=r,
        )
        self.tpot = Histogram(
            "mii_time_per_output_token_seconds",
            "Time per output token after the first",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
            registry=r,
        )
        self.queue_time = Histogram(
            "mii_request_queue_time_seconds",
            "Time a request waited in its engine before its first forward pass",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e_latency = Histogram(
            "mii_e2e_request_latency_seconds",
            "Time from a request's arrival at the deployment to its answer's last piece",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

    def export_pool(self, stats: mii_pb2.StatsReply, healthy: int) -> None:
        """The gauges of a replica pool: its summed ``stats`` and ``healthy`` replicas."""
        self.running.set(stats.running)
        self.waiting.set(stats.waiting)
        self.kv_usage.set(stats.kv_cache_usage)
        if stats.preemptions > self._preemptions_seen:
            self.preemptions.inc(stats.preemptions - self._preemptions_seen)
        self._preemptions_seen = stats.preemptions
        self.healthy.set(healthy)

    def observe_prompt(self, response: Response) -> None:
        """A request's prompt: its tokens, and how many of them were cached (one asking
        for prompt logprobs is computed whole, never looked up: not a query, as the
        engine's own counters have it)."""
        self.prompt_tokens.inc(response.prompt_length)
        if response.prompt_logprobs is not None:
            return
        self.prefix_queries.inc(response.prompt_length)
        self.prefix_hits.inc(response.cached_tokens)
        queries = self.prefix_queries._value.get()
        if queries:
            self.prefix_hit_rate.set(self.prefix_hits._value.get() / queries)

    def observe_answer(self, response: Response, elapsed: float) -> None:
        """A whole answer that took ``elapsed`` seconds."""
        self.observe_prompt(response)
        self.generation_tokens.inc(response.generated_length)
        if response.first_token_time_s is not None:
            self.ttft.observe(response.first_token_time_s)
            if response.generated_length > 1:
                rest = max(0.0, elapsed - response.first_token_time_s)
                self.tpot.observe(rest / (response.generated_length - 1))
        self.observe_end(response, elapsed)

    def observe_end(self, response: Response, elapsed: float) -> None:
        """The end of an answer (whole or streamed) that took ``elapsed`` seconds."""
        self.requests.labels(response.finish_reason or "unknown").inc()
        self.e2e_latency.observe(elapsed)
        if response.queue_time_s is not None:
            self.queue_time.observe(response.queue_time_s)

    def stream_timing(self, start: float) -> StreamTiming:
        """What observes a stream's pieces; ``start``: ``time.perf_counter()`` of its request."""
        return StreamTiming(self, start)


class StreamTiming:
    """Observes one stream's pieces as they pass: time to first piece, tokens as
    they come (so a stream cut short counts what it got), the end."""

    def __init__(self, metrics: Metrics, start: float) -> None:
        self.metrics = metrics
        self.start = start
        self.first_at: float | None = None
        self.generated = 0

    def observe(self, piece: Response) -> None:
        m = self.metrics
        now = time.perf_counter()
        if self.first_at is None:
            self.first_at = now
            m.ttft.observe(now - self.start)
            m.observe_prompt(piece)
        if piece.generated_length > self.generated:
            m.generation_tokens.inc(piece.generated_length - self.generated)
            self.generated = piece.generated_length
        if piece.finish_reason is None:
            return
        if piece.generated_length > 1:
            m.tpot.observe((now - self.first_at) / (piece.generated_length - 1))
        m.observe_end(piece, now - self.start)
