"""Supervising a deployment's replica processes: a replica that exits is started
again (on a fresh port, which the pool follows), with exponential back-off and a
restart limit; one that stays unresponsive too long is killed and restarted the
same way.

Each replica's state is kept on its ``mii.rpc.pool.Replica`` (``state``,
``restarts``, ``pid``), where ``/health``, the Stats reply and ``mii list`` read
it (:mod:`mii.rpc.replica_health`):

- ``starting``: its first process is loading the model;
- ``serving``: in rotation;
- ``unresponsive``: alive but out of rotation (missed health probes, or reports
  NOT_SERVING, e.g. a failed tensor-parallel rank);
- ``restarting``: its process exited (or was killed); a new one is waiting out
  the back-off or loading, until it serves;
- ``failed``: it exited more than ``replica_max_restarts`` times within
  ``replica_restart_window_s``; the deployment gave up on it (the others serve on).

A replica whose process has exited has no pid (``None``) until its next process
starts: ``/health`` and ``mii list`` must not name a dead process. Once every
replica has failed, ``run()`` returns: nothing is left to serve, and the
deployment stops with an error (a process supervisor, systemd or Kubernetes, can
then restart it, rather than a deployment answering 503 forever).
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from mii.errors import DeploymentError
from mii.rpc.pool import HEALTH_INTERVAL_S, ReplicaPool
from mii.rpc.startup_errors import signal_name

# A serving replica out of rotation this long is logged (a probe or two missed under
# load is not worth a line), and so is its return.
UNRESPONSIVE_LOG_S = 2.0

MAX_BACKOFF_S = 60.0  # the back-off doubles with each recent restart, up to this


class _Process(Protocol):
    """What the supervisor needs of a replica process (``deployment.ReplicaProcess``)."""

    @property
    def pid(self) -> int: ...

    @property
    def address(self) -> str: ...

    def exit_code(self) -> int | None: ...

    def failure(self) -> str | None: ...

    def kill(self) -> None: ...


@dataclass(frozen=True)
class RestartPolicy:
    """When a replica is restarted, and when the deployment gives up on it."""

    max_restarts: int = 5  # within window_s; one more exit and it is failed
    window_s: float = 600.0
    backoff_s: float = 1.0  # before the first restart; doubled for each recent one
    unresponsive_restart_s: float = 120.0  # kill and restart after this long; 0: never

    def backoff(self, recent_restarts: int) -> float:
        return min(self.backoff_s * 2**recent_restarts, MAX_BACKOFF_S)


@dataclass
class _Slot:
    """The supervisor's memory of one replica."""

    restart_times: deque[float] = field(default_factory=deque)
    start_at: float | None = None  # a restart waits until then
    served: bool = False  # since its process (re)started
    out_since: float | None = None  # out of rotation since, after having served
    said_out: bool = False  # the log said so (after UNRESPONSIVE_LOG_S)
    failed: bool = False


class Supervisor:
    """Keeps the replicas of ``pool`` running: ``processes[i]`` is replica i's
    process, replaced in place by ``spawn(i)`` on a restart (so that whoever stops
    the deployment stops the current ones); ``on_restart()`` runs after each."""

    def __init__(
        self,
        pool: ReplicaPool,
        processes: list[_Process],
        spawn: Callable[[int], _Process],
        policy: RestartPolicy,
        on_restart: Callable[[], None] | None = None,
    ) -> None:
        self.pool = pool
        self.processes = processes
        self.spawn = spawn
        self.policy = policy
        self.on_restart = on_restart
        self.slots = [_Slot() for _ in processes]
        for replica, process in zip(pool.replicas, processes):
            replica.state, replica.pid = "starting", process.pid

    async def run(self) -> None:
        """Look after the replicas until cancelled, or until every replica has
        failed (then it returns)."""
        while True:
            self.tick(time.monotonic())
            if self.all_failed:
                return
            await asyncio.sleep(HEALTH_INTERVAL_S / 2)

    async def run_until(self, stop: asyncio.Event) -> None:
        """Look after the replicas until ``stop`` is set. DeploymentError when the
        looking after ends first: every replica failed (nothing is left to serve),
        or it failed itself (a replacement process could not be started). The
        deployment then stops with that error, exit status 1, rather than as if it
        had been asked to (exit 0: a process supervisor would not restart it)."""
        supervising = asyncio.create_task(self.run())
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({stopping, supervising}, return_when=asyncio.FIRST_COMPLETED)
            ended = supervising.done()
        finally:
            supervising.cancel()
            stopping.cancel()
        if not ended:
            return
        failure = supervising.exception()
        if failure is not None:
            raise DeploymentError(
                f"supervising its replicas failed ({type(failure).__name__}: {failure})"
            ) from failure
        policy = self.policy
        raise DeploymentError(
            f"every replica failed (each ended {_times(policy.max_restarts + 1)} within "
            f"{policy.window_s:g} s: replica_max_restarts)"
        )

    @property
    def all_failed(self) -> bool:
        """True once the deployment has given up on every replica."""
        return all(slot.failed for slot in self.slots)

    def tick(self, now: float) -> None:
        """One look at every replica: restart what exited, kill what hangs."""
        for index, slot in enumerate(self.slots):
            self._look_after(index, slot, now)

    def _look_after(self, index: int, slot: _Slot, now: float) -> None:
        replica, process = self.pool.replicas[index], self.processes[index]
        if slot.failed:
            replica.healthy, replica.state = False, "failed"
            return
        if slot.start_at is not None:  # waiting out the back-off
            replica.healthy = False
            if now >= slot.start_at:
                slot.start_at = None
                self.processes[index] = process = self.spawn(index)
                replica.pid = process.pid
                replica.move_to(process.address)
                _say(f"replica {index} restarted (pid {process.pid})")
                if self.on_restart is not None:
                    self.on_restart()
            return
        if process.exit_code() is not None:
            self._exited(index, slot, process, now)
            return
        if replica.healthy:
            if slot.said_out:
                _say(
                    f"replica {index} (pid {process.pid}) answers again after "
                    f"{now - slot.out_since:.1f} s: back in rotation"
                )
            slot.served, slot.out_since, slot.said_out = True, None, False
            replica.state = "serving"
            return
        if not slot.served:  # still loading
            replica.state = "restarting" if replica.restarts else "starting"
            return
        replica.state = "unresponsive"
        if slot.out_since is None:
            slot.out_since = now
        if not slot.said_out and now - slot.out_since >= UNRESPONSIVE_LOG_S:
            slot.said_out = True
            _say(
                f"replica {index} (pid {process.pid}) does not answer its health probes: "
                "out of rotation (its requests fail after replica_timeout_s)"
            )
        limit = self.policy.unresponsive_restart_s
        if limit > 0 and now - slot.out_since >= limit:
            _say(f"replica {index} (pid {process.pid}) unresponsive for {limit:g} s: killing it")
            process.kill()  # the next look sees it exited and restarts it

    def _exited(self, index: int, slot: _Slot, process: _Process, now: float) -> None:
        replica = self.pool.replicas[index]
        replica.healthy, replica.pid = False, None  # no live process until the next one
        ended = _how_it_ended(process)
        window = self.policy.window_s
        while slot.restart_times and now - slot.restart_times[0] > window:
            slot.restart_times.popleft()
        recent = len(slot.restart_times)
        if recent >= self.policy.max_restarts:
            slot.failed = True
            replica.state = "failed"
            _say(
                f"replica {index} (pid {process.pid}) {ended}; it was restarted "
                f"{_times(recent)} in {window:g} s (replica_max_restarts): giving up on it"
            )
            return
        delay = self.policy.backoff(recent)
        slot.restart_times.append(now)
        slot.start_at = now + delay
        slot.served, slot.out_since, slot.said_out = False, None, False
        replica.restarts += 1
        replica.state = "restarting"
        _say(f"replica {index} (pid {process.pid}) {ended}; restarting it in {delay:g} s")


def _how_it_ended(process: _Process) -> str:
    """ "exited with code N: REASON", "was killed by SIGKILL" for a process stopped by
    a signal from outside (its log's last line says nothing of why: it quoted
    "converted in 8.3 s"), or "died of SIGSEGV: REASON" for a crash."""
    code = process.exit_code()
    if code is not None and -code in _STOP_SIGNALS:
        return f"was killed by {signal_name(-code)}"
    if code is not None and code < 0:  # a crash (SIGSEGV, SIGABRT): its log may say why
        return f"died of {signal_name(-code)}{_why(process.failure())}"
    return f"exited with code {code}{_why(process.failure())}"


# Signals that stop a process from outside (a user, the OOM killer): its log's last
# line does not say why.
_STOP_SIGNALS = frozenset((signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP))


def _times(count: int) -> str:
    return "once" if count == 1 else f"{count} times"


def _why(failure: str | None) -> str:
    """ ": REASON" from a replica's failure report (its start-up error, or the end
    of its log after a "... exited with code N:" / "... was killed by SIG...:" line,
    which the caller says already), or "" when there is none."""
    lines = [line.strip() for line in (failure or "").splitlines() if line.strip()]
    if lines and any(said in lines[0] for said in ("exited with code", "was killed by")):
        lines = lines[1:]  # the log's tail: its last line says most
        return f": {lines[-1]}" if lines else ""
    return f": {lines[0]}" if lines else ""


def _say(message: str) -> None:
    print(f"[mii] {message}", file=sys.stderr, flush=True)
