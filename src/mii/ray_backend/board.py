"""The deployment's notice board: every replica posts its engine's figures here
twice a second, and the deployment (its gRPC front and HTTP ingress) reads them for
``/health``, ``/metrics``, the Stats reply and ``mii list``.

Ray Serve routes each request to one replica and offers no way to ask each of them
something, hence this small named actor. It also carries the deployment's drain
notice to the HTTP ingress, and the ingress's answer back
(:mod:`mii.ray_backend.http_drain`). It is owned by the deployment process,
so Ray removes it when that process ends. A replica that stops posting (killed,
restarting) drops off the board after ``STALE_S``.
"""

from __future__ import annotations

import time
from typing import Any

NAMESPACE = "mii"  # the Ray namespace of mii's own named actors
POST_INTERVAL_S = 0.5
STALE_S = 3.0


def board_name(app_name: str) -> str:
    """The board's actor name for the Serve application ``app_name``."""
    return f"mii-board:{app_name}"


class StatsBoard:
    """What each live replica last posted (plain data), by replica id."""

    def __init__(self) -> None:
        self._posts: dict[str, dict[str, Any]] = {}
        self._drain: dict[str, Any] | None = None  # the deployment's drain notice
        self._drained: set[str] = set()  # the ingress replicas done draining

    def post(self, replica_id: str, figures: dict[str, Any]) -> None:
        self._posts[replica_id] = {**figures, "replica_id": replica_id, "at": time.monotonic()}

    def forget(self, replica_id: str) -> None:
        self._posts.pop(replica_id, None)

    def read(self) -> list[dict[str, Any]]:
        """The posts of replicas heard from within ``STALE_S``, oldest replica first."""
        now = time.monotonic()
        for replica_id, post in list(self._posts.items()):
            if now - post["at"] > STALE_S:
                del self._posts[replica_id]
        return sorted(self._posts.values(), key=lambda p: p.get("started", 0.0))

    # ----- the drain of the HTTP side (mii.ray_backend.http_drain) ---------------

    def start_drain(self, grace_s: float) -> None:
        if self._drain is None:
            self._drain = {"grace_s": grace_s, "hurry": False}

    def hurry_drain(self) -> None:
        if self._drain is not None:
            self._drain["hurry"] = True

    def drain_notice(self) -> dict[str, Any] | None:
        return self._drain

    def report_drained(self, ingress_id: str) -> None:
        self._drained.add(ingress_id)

    def drained_ingresses(self) -> int:
        return len(self._drained)
