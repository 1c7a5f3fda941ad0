"""A Ray deployment notices its cluster is gone (mii.ray_backend.cluster_watch): after
`ray stop` it said nothing, stayed half alive and was ended a minute later by Ray's own
client, its record left behind (user trial). Checked by hand end to end: `ray stop` under
`mii serve --ray-address` ends it with exit status 1, the reason on its last line; `kill
-TERM -- -PGID` of `mii serve --backend ray` (its own Ray instance in its process group)
ends it with exit status 0 in ~10 s, serving or still starting (it took 60 s and exit
status 1: Ray's abort), and SIGTERM to mii alone still drains and deletes the app (7 s)."""

from __future__ import annotations

import asyncio
import socket

import pytest

from mii.ray_backend import cluster_watch


@pytest.fixture(autouse=True)
def quick(monkeypatch):
    monkeypatch.setattr(cluster_watch, "CHECK_INTERVAL_S", 0.05)
    monkeypatch.setenv("RAY_gcs_rpc_server_reconnect_timeout_s", "15.5")  # lost after 0.5 s


def test_the_deployment_stops_before_ray_gives_up_and_rides_out_what_ray_rides_out(monkeypatch):
    assert cluster_watch.lost_after_s() == 0.5
    monkeypatch.setenv("RAY_gcs_rpc_server_reconnect_timeout_s", "")
    assert cluster_watch.lost_after_s() == 45.0  # Ray's default 60 s, less the margin


def test_a_gcs_that_takes_no_connection_is_lost_after_a_while():
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
    reason = asyncio.run(asyncio.wait_for(cluster_watch.until_cluster_lost(address), 30))
    assert address in reason and "refused" in reason


def test_a_listening_gcs_is_not_lost_and_short_refusals_are_ridden_out(monkeypatch):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        address = f"127.0.0.1:{server.getsockname()[1]}"
        tries = []
        connect = cluster_watch._connect

        def refusing_now_and_then(host, port):
            tries.append(port)
            if len(tries) % 3:  # two refusals, then an answer, again and again
                raise ConnectionRefusedError(111, "Connection refused")
            connect(host, port)

        monkeypatch.setattr(cluster_watch, "_connect", refusing_now_and_then)
        monkeypatch.setenv("RAY_gcs_rpc_server_reconnect_timeout_s", "1015")  # 1,000 s

        async def watch_a_while():
            task = asyncio.create_task(cluster_watch.until_cluster_lost(address))
            while len(tries) < 12:
                await asyncio.sleep(0.05)
                assert not task.done(), task.result()
            task.cancel()

        asyncio.run(asyncio.wait_for(watch_a_while(), 60))


def test_a_cluster_stopped_with_the_deployment_is_taken_for_gone_at_once(monkeypatch):
    """A stop sent to the whole process group reached the Ray instance the deployment
    had started: draining there waited 60 s and ended in Ray's abort (a user trial).
    After a stop the GCS is asked once; one that answers is not gone."""
    monkeypatch.setattr(cluster_watch, "GONE_CHECK_DELAY_S", 0.01)
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{sock.getsockname()[1]}"
    reason = asyncio.run(cluster_watch.gone_with_the_stop(closed))
    assert closed in reason and "refused" in reason
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        listening = f"127.0.0.1:{server.getsockname()[1]}"
        assert asyncio.run(cluster_watch.gone_with_the_stop(listening)) is None
    assert asyncio.run(cluster_watch.gone_with_the_stop(None)) is None  # (Ray Client)
