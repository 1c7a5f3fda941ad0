"""Noticing that a Ray deployment's cluster is gone (``ray stop``, its head node lost).

Without this the deployment said nothing: its HTTP front (Ray Serve's proxy) went
at once, its gRPC calls failed, and a minute later Ray's own client ended the
process with a C++ log line ("Failed to connect to GCS within 60 seconds"),
leaving its record behind. The watch asks the cluster's GCS (its head's control
store, which every Ray call needs) for a TCP connection every second: when none
succeeded for ``lost_after_s()`` it is gone, and the deployment stops saying so
(exit status 1, so that a process supervisor restarts it), without the Ray calls
that would wait for a cluster that no longer answers. That is 15 s before Ray's
own clients give up (``RAY_gcs_rpc_server_reconnect_timeout_s``, 60 s by
default): a head that restarts within it (GCS fault tolerance) is ridden out, as
Ray rides it out. A deployment connected through Ray Client (``ray://``) is not
watched: the GCS address it is told is the head's own, often not reachable from
outside the cluster.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time

CHECK_INTERVAL_S = 1.0
CONNECT_TIMEOUT_S = 5.0
RAY_RECONNECT_S = 60.0  # Ray's gcs_rpc_server_reconnect_timeout_s default
MARGIN_S = 15.0  # how long before Ray's clients give up the deployment stops
GONE_CHECK_DELAY_S = 0.5  # after a stop: time for a Ray process given the same signal to exit


def lost_after_s() -> float:
    """How long the GCS may take no connection before the cluster counts as gone."""
    # (Ray's variable, not mii's: read where it is used, as Ray reads it)
    reconnect = os.environ.get("RAY_gcs_rpc_server_reconnect_timeout_s", "")  # noqa: SIM112
    try:
        ray_gives_up = float(reconnect) if reconnect else RAY_RECONNECT_S
    except ValueError:
        ray_gives_up = RAY_RECONNECT_S
    return max(ray_gives_up - MARGIN_S, 3 * CHECK_INTERVAL_S)


def gcs_address() -> str | None:
    """The connected cluster's GCS as ``host:port``; None through Ray Client (the
    head's own view of its address) or where Ray does not say."""
    import ray

    if ray.util.client.ray.is_connected():
        return None
    return getattr(ray.get_runtime_context(), "gcs_address", None)


async def until_cluster_lost(address: str) -> str:
    """Return why the GCS at ``address`` (``host:port``) is taken for gone, once no
    check could connect to it for ``lost_after_s()``."""
    host, _, port = address.rpartition(":")
    limit = lost_after_s()
    failing_since: float | None = None
    while True:
        try:
            await asyncio.to_thread(_connect, host.strip("[]"), int(port))
            failing_since = None
        except OSError as err:
            now = time.monotonic()
            failing_since = now if failing_since is None else failing_since
            if now - failing_since >= limit:
                return (
                    f"its GCS at {address} has taken no connection for {now - failing_since:.0f}"
                    f" s: {err.strerror or err}"
                )
        await asyncio.sleep(CHECK_INTERVAL_S)


async def gone_with_the_stop(address: str | None) -> str | None:
    """Why the cluster is taken for gone once a stop came; None while its GCS answers
    (or Ray does not say where it is). A stop sent to a whole process group (systemd's
    default KillMode, ``timeout``, a closed terminal) reaches the Ray instance the
    deployment started too: its GCS and raylet share the group. Draining and deleting
    the application there waited for Ray's reconnect timeout (60 s) and ended in Ray's
    abort (exit status 1). The GCS is asked once, after the time such a process takes
    to exit."""
    if address is None:
        return None
    await asyncio.sleep(GONE_CHECK_DELAY_S)
    host, _, port = address.rpartition(":")
    try:
        await asyncio.to_thread(_connect, host.strip("[]"), int(port))
    except OSError as err:
        return f"its GCS at {address} takes no connection: {err.strerror or err}"
    return None


def _connect(host: str, port: int) -> None:
    socket.create_connection((host, port), CONNECT_TIMEOUT_S).close()
