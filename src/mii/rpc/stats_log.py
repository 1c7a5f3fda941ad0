"""The deployment's log lines about its load (on its stderr: the terminal of
``mii serve``, the log file of ``mii.serve``):

- once ready, the KV cache's capacity and the concurrency it allows::

    [mii] KV cache: 2048 blocks x 16 tokens = 32768 tokens (1 replica); maximum
    concurrency at 4096 tokens per request: 8.00x; quantization=none,
    kv_cache_dtype=bfloat16

- then every ``stats_log_interval_s`` seconds while the deployment is busy (and
  once more after), as ``vllm serve`` logs it::

    [mii] prompt throughput: 812.4 tok/s, generation throughput: 95.1 tok/s,
    running: 3 reqs, waiting: 0 reqs, KV cache usage: 12.5%

  (each one line).

Throughput is the replicas' token counters (``StatsReply.prompt_tokens``,
``generation_tokens``) over the interval; a replica that restarted counts from 0.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from typing import Any

from mii.rpc import mii_pb2


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def capacity_line(stats: mii_pb2.StatsReply, replicas: int) -> str:
    """The KV cache's capacity (``stats``: the deployment's), the maximum
    concurrency (how many requests of the longest length, ``max_length``, fit at
    once), and how weights and cache are stored (a deployment run with
    ``--quantization fp8 --kv-cache-dtype fp8`` says so, not only by its capacity)."""
    tokens = stats.kv_blocks * stats.kv_block_size
    concurrency = tokens / stats.max_length if stats.max_length else 0.0
    line = (
        f"[mii] KV cache: {stats.kv_blocks} blocks x {stats.kv_block_size} tokens = {tokens} "
        f"tokens ({replicas} replica{'' if replicas == 1 else 's'}); maximum concurrency at "
        f"{stats.max_length} tokens per request: {concurrency:.2f}x"
    )
    if stats.quantization or stats.kv_cache_dtype:
        line += f"; quantization={stats.quantization}, kv_cache_dtype={stats.kv_cache_dtype}"
    per_replica = tokens // max(replicas, 1)
    if stats.max_length and per_replica < stats.max_length:  # (was said in the replica log only)
        line += (
            f"\n[mii] warning: a replica's KV cache holds {per_replica} tokens, fewer than "
            f"max_length {stats.max_length}: a longer request is refused, and an answer stops "
            f"there; raise --num-kv-blocks (or --kv-cache-memory-fraction) or lower --max-length"
        )
    return line


class ThroughputLog:
    """Turns successive readings of the pool's replicas into log lines."""

    def __init__(self, pool: Any) -> None:
        self.pool = pool  # mii.rpc.pool.ReplicaPool
        self.counts = self._counts()
        self.at = time.monotonic()
        self.was_busy = False

    def _counts(self) -> dict[Any, tuple[int, int]]:
        # By replica: a local one's slot, a Ray one's id (Serve adds, removes and replaces
        # replicas, and the list shifts: paired by position, counters of different replicas
        # were subtracted and an idle cluster showed throughput).
        return {
            getattr(r, "replica_id", index): (
                r.last_stats.prompt_tokens,
                r.last_stats.generation_tokens,
            )
            for index, r in enumerate(self.pool.replicas)
        }

    def line(self) -> str | None:
        """The line for the time since the last call; None when idle then and before."""
        counts, now = self._counts(), time.monotonic()
        prompt = generation = 0
        for key, (p, g) in counts.items():
            p0, g0 = self.counts.get(key, (p, g))  # a replica new since: from its first reading
            prompt += p - p0 if p >= p0 else p  # fewer than before: the replica restarted
            generation += g - g0 if g >= g0 else g
        elapsed = max(now - self.at, 1e-9)
        self.counts, self.at = counts, now
        stats = self.pool.stats()
        busy = bool(prompt or generation or stats.running or stats.waiting)
        if not (busy or self.was_busy):
            return None
        self.was_busy = busy
        return (
            f"[mii] prompt throughput: {prompt / elapsed:.1f} tok/s, generation throughput: "
            f"{generation / elapsed:.1f} tok/s, running: {stats.running} reqs, waiting: "
            f"{stats.waiting} reqs, KV cache usage: {100 * stats.kv_cache_usage:.1f}%"
        )


async def log_stats(pool: Any, interval_s: float, write: Callable[[str], None] = _stderr) -> None:
    """Write a throughput line every ``interval_s`` seconds while the deployment is busy."""
    log = ThroughputLog(pool)
    while True:
        await asyncio.sleep(interval_s)
        line = log.line()
        if line is not None:
            write(line)
