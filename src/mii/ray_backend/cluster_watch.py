"""Noticing that a Ray deployment's cluster is gone (``ray stop``, its head node lost).

Without this the deployment said nothing: its HTTP front (Ray Serve's proxy) went
at once, its gRPC calls failed, and a minute later Ray's own client ended the
process with a C++ log line ("Failed to connect to GCS within 60 seconds"),
leaving its record behind. The watch asks the cluster's GCS (its head's control
store, which every Ray call needs) for a TCP connection every second: a few
refusals or timeouts in a row mean it is gone, and the deployment stops saying
so (exit status 1, so that a process supervisor restarts it), without the Ray
calls that would wait for a cluster that no longer answers.
"""

from __future__ import annotations

import asyncio
import socket

CHECK_INTERVAL_S = 1.0
CONNECT_TIMEOUT_S = 5.0
# Consecutive failed checks: one refusal can be a head restarting its listener.
FAILURES_TO_LOSE = 3


def gcs_address() -> str | None:
    """The connected cluster's GCS as ``host:port`` (None where Ray does not say)."""
    import ray

    return getattr(ray.get_runtime_context(), "gcs_address", None)


async def until_cluster_lost(address: str) -> str:
    """Return why the GCS at ``address`` (``host:port``) is taken for gone, once
    ``FAILURES_TO_LOSE`` checks in a row could not connect to it."""
    host, _, port = address.rpartition(":")
    failures = 0
    while True:
        try:
            await asyncio.to_thread(_connect, host.strip("[]"), int(port))
            failures = 0
        except OSError as err:
            failures += 1
            if failures >= FAILURES_TO_LOSE:
                return f"its GCS at {address} takes no connection: {err.strerror or err}"
        await asyncio.sleep(CHECK_INTERVAL_S)


def _connect(host: str, port: int) -> None:
    socket.create_connection((host, port), CONNECT_TIMEOUT_S).close()
