"""The HTTP side's drain on a Ray deployment, told through the board.

A single-host deployment drains its gRPC front and its HTTP gateway in one process
(:mod:`mii.rpc.drain`). On Ray the HTTP routes run in the ingress replica, on the
cluster, where Serve's proxy keeps routing new requests to it until the application
is deleted. So the deployment process posts a drain notice on the board (the one
actor both sides already read); the ingress's watch loop sees it within
``HEALTH_INTERVAL_S`` and runs the same drain on its own pool: new requests get 503,
``/health`` says ``draining``, those in flight finish within ``shutdown_grace_s``
and the rest are cut with an error event. The ingress then reports back, and only
then does the deployment delete the application.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from typing import Any

from mii.ray_backend.pool import HEALTH_INTERVAL_S, RayPool
from mii.rpc.drain import CUT_WAIT_S, drain

# Past the grace period and the cut: the ingress's poll interval, its report, slack.
REPORT_SLACK_S = 2 * HEALTH_INTERVAL_S + 3.0


class IngressDrain:
    """The ingress replica's side: follow the board's notice (``poll`` from the
    ingress's watch loop) by draining ``pool`` once, then report it drained."""

    def __init__(self, pool: RayPool) -> None:
        self.pool = pool
        self.ingress_id = os.urandom(6).hex()
        self._hurry = asyncio.Event()
        self._task: asyncio.Task | None = None

    async def poll(self) -> None:
        notice = await self.pool.board.drain_notice.remote()
        if notice is None:
            return
        if notice["hurry"]:
            self._hurry.set()
        if self._task is None:
            self._task = asyncio.create_task(self._drain(notice["grace_s"]))

    async def _drain(self, grace_s: float) -> None:
        await drain(self.pool, grace_s, self._hurry)
        with contextlib.suppress(Exception):  # the board is gone: nobody waits any more
            await self.pool.board.report_drained.remote(self.ingress_id)

    def cancel(self) -> None:
        if self._task is not None:
            self._task.cancel()


async def drain_http(board: Any, grace_s: float, hurry: asyncio.Event) -> bool:
    """The deployment's side: post the notice, pass a second signal on (``hurry``),
    and wait for the ingress to report its requests finished or cut. False when it
    did not report in time (it died, or the cluster is gone: a board call that hangs
    counts against the same deadline); the deletion goes on either way."""
    wait_s = grace_s + CUT_WAIT_S + REPORT_SLACK_S
    try:
        return await asyncio.wait_for(_notice_and_wait(board, grace_s, hurry), wait_s)
    except asyncio.TimeoutError:
        return False


async def _notice_and_wait(board: Any, grace_s: float, hurry: asyncio.Event) -> bool:
    await board.start_drain.remote(grace_s)
    hurried = False
    while True:
        if hurry.is_set() and not hurried:
            hurried = True
            with contextlib.suppress(Exception):
                await board.hurry_drain.remote()
        if await board.drained_ingresses.remote() > 0:
            return True
        await asyncio.sleep(HEALTH_INTERVAL_S / 2)
