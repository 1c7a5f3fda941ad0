"""Which asyncio task drives an AsyncEngine when its user moves between event loops.

An engine may serve one event loop, then another (``asyncio.run`` twice, a test
framework's loop per test), and a loop may stop with a pass running and resume
later. Each loop gets at most one driver task (the engine loop of AsyncEngine).
A driver that runs after another loop's driver did first waits for the engine
thread to finish what that one left running, and the outputs of every pass wait
in ``FinishedPasses`` in the order the engine thread produced them, so whichever
driver runs next delivers them in order. (A driver resumed late once delivered a
stale pass's pieces after newer ones, and ran beside a second driver of its loop.)
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any


class FinishedPasses:
    """The outputs of passes the engine thread finished, oldest first, until a
    driver takes them (appended on the engine thread, taken on a loop's)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._outputs: list[Any] = []

    def add(self, outputs: list[Any]) -> None:
        with self._lock:
            self._outputs.extend(outputs)

    def take(self) -> list[Any]:
        with self._lock:
            outputs, self._outputs = self._outputs, []
        return outputs


@dataclass
class _Driver:
    task: asyncio.Task
    wakeup: asyncio.Event


class LoopDrivers:
    """The driver tasks of one engine, one per event loop, and which of them new
    work wakes (``loop``, ``wakeup``: the running loop's, once ``ensure`` ran there)."""

    def __init__(self, run: Callable[[asyncio.Event], Coroutine[Any, Any, None]]) -> None:
        self._run = run  # a driver's body, given its wakeup event
        self._by_loop: dict[asyncio.AbstractEventLoop, _Driver] = {}
        self.loop: asyncio.AbstractEventLoop | None = None
        self.wakeup: asyncio.Event | None = None
        self._driving: asyncio.Task | None = None  # the one that last took the core

    def ensure(self) -> None:
        """Make the running loop's driver (started if it has none) the one that new
        work wakes. RuntimeError while another loop runs (in another thread)."""
        loop = asyncio.get_running_loop()
        driver = self._by_loop.get(loop)
        if self.loop is loop and driver is not None and not driver.task.done():
            return
        self.check()
        if driver is None or driver.task.done():
            self._forget_ended()
            wakeup = asyncio.Event()
            task = loop.create_task(self._run(wakeup), name="mii-engine-loop")
            driver = self._by_loop[loop] = _Driver(task, wakeup)
        self.loop, self.wakeup = loop, driver.wakeup
        driver.wakeup.set()

    def ended_here(self) -> bool:
        """Whether the running loop's driver was cancelled: the loop is ending
        (``asyncio.run`` cancels every task, then closes the async generators left
        open; a driver started then would be destroyed pending with the loop)."""
        driver = self._by_loop.get(asyncio.get_running_loop())
        return driver is not None and driver.task.cancelled()

    def check(self) -> None:
        """RuntimeError when another event loop runs the engine now (in another
        thread): checked before anything is changed."""
        if self._other_loop_runs(asyncio.get_running_loop()):
            raise RuntimeError("an AsyncEngine serves one event loop at a time")

    def take_over(self) -> bool | None:
        """Called by a driver whenever it runs. False: it drives, as it did; True: it
        drives now, but another loop's driver did since it last did, so it must wait
        for the engine thread before touching the core; None: it does not drive
        (another loop runs, in another thread; or the engine stopped its drivers)."""
        me = asyncio.current_task()
        if self._driving is me:
            return False
        loop = asyncio.get_running_loop()
        driver = self._by_loop.get(loop)
        if driver is None or driver.task is not me or self._other_loop_runs(loop):
            return None
        self._driving = me
        self.loop, self.wakeup = loop, driver.wakeup
        for other_loop, other in self._by_loop.items():
            # (whichever loop resumes next finds its driver awake, to take over)
            if other_loop is not loop and not other_loop.is_closed():
                other.wakeup.set()
        return True

    async def stop(self) -> None:
        """Cancel every driver; return once the running loop's has ended (a stopped
        loop's ends when that loop runs again; a closed loop's never runs again)."""
        loop = asyncio.get_running_loop()
        mine = None
        for driver_loop, driver in self._by_loop.items():
            if driver_loop.is_closed() or driver.task.done():
                continue
            driver.task.cancel()
            if driver_loop is loop:
                mine = driver.task
        self._by_loop.clear()
        self.loop = self.wakeup = self._driving = None
        if mine is not None:
            # (asyncio.wait: a cancellation of the caller is not swallowed, unlike
            # awaiting the cancelled task under suppress(CancelledError))
            await asyncio.wait({mine})

    def _other_loop_runs(self, loop: asyncio.AbstractEventLoop) -> bool:
        other = self.loop
        return other not in (None, loop) and not other.is_closed() and other.is_running()

    def _forget_ended(self) -> None:
        self._by_loop = {
            loop: driver
            for loop, driver in self._by_loop.items()
            if not loop.is_closed() and not driver.task.done()
        }
