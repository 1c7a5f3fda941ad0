"""A deployment's health as its users see it: the body of ``GET /health`` and the
``status`` and ``replicas`` fields of the balancer's Stats reply (which ``mii
list`` shows). Both are read from the pool's replicas, whose ``state`` the
supervisor keeps (:mod:`mii.rpc.supervisor`).

The deployment is ``ok`` while at least one replica serves (HTTP 200),
``unavailable`` when none does and ``draining`` while it shuts down (HTTP 503).
"""

from __future__ import annotations

from typing import Any

from mii.rpc import mii_pb2


def replica_state(replica: Any) -> str:
    """The supervisor's state of ``replica``, brought up to date by its last health
    probe, which the supervisor reads only on its next look (once a second):
    ``serving`` exactly while the replica is in rotation, so that the states agree
    with ``status`` and ``healthy_replicas`` (a replica back in rotation showed
    ``unresponsive`` beside ``"status": "ok"``). Without a supervisor, ``serving``
    or ``unresponsive`` by the probe alone."""
    state = getattr(replica, "state", None)
    if replica.healthy:
        return "serving"
    if state is None or state == "serving":  # out of rotation since the supervisor looked
        return "unresponsive"
    return state


def deployment_status(pool: Any) -> str:
    guard = getattr(pool, "guard", None)
    if guard is not None and guard.draining:
        return "draining"
    return "ok" if any(r.healthy for r in pool.replicas) else "unavailable"


def replica_list(pool: Any) -> list[dict[str, Any]]:
    """Each replica: index, address, state, restarts, pid, requests in flight."""
    return [
        {
            "index": index,
            "address": getattr(replica, "address", ""),
            "state": replica_state(replica),
            "restarts": getattr(replica, "restarts", 0),
            "pid": getattr(replica, "pid", None),
            "in_flight": getattr(replica, "in_flight", 0),
        }
        for index, replica in enumerate(pool.replicas)
    ]


def health_body(pool: Any) -> tuple[dict[str, Any], int]:
    """The JSON of ``GET /health`` (without the deployment's names) and its status code."""
    status = deployment_status(pool)
    body = {
        "status": status,
        "replica_num": len(pool.replicas),
        "healthy_replicas": sum(bool(r.healthy) for r in pool.replicas),
        "replicas": replica_list(pool),
    }
    return body, 200 if status == "ok" else 503


def add_replica_health(reply: mii_pb2.StatsReply, pool: Any) -> mii_pb2.StatsReply:
    """Fill the deployment's ``status`` and per-replica health into ``reply``."""
    reply.status = deployment_status(pool)
    for item in replica_list(pool):
        reply.replicas.add(**{**item, "pid": item["pid"] or 0})
    return reply


def health_from_stats(reply: mii_pb2.StatsReply) -> dict[str, Any]:
    """A Stats reply's health and load as JSON (``mii list --json``)."""
    return {
        "status": reply.status or "unknown",
        "running": reply.running,
        "waiting": reply.waiting,
        "kv_cache_usage": reply.kv_cache_usage,
        "replicas": [
            {
                "index": r.index,
                "address": r.address,
                "state": r.state,
                "restarts": r.restarts,
                "pid": r.pid or None,
                "in_flight": r.in_flight,
            }
            for r in reply.replicas
        ],
    }
