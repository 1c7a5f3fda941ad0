"""Waiting for a Ray deployment's start without ever blocking its event loop or
outliving a stop: Serve's calls block (``serve.run`` until every replica runs), so
they run in threads, and each wait ends early when the deployment is told to stop
(a signal, a Terminate call), as a local deployment's does."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from mii.rpc.startup_errors import StoppedWhileStarting

T = TypeVar("T")


def in_daemon_thread(fn: Callable[..., T], *args: Any, **kwargs: Any) -> asyncio.Future[T]:
    """``fn(*args, **kwargs)`` in a daemon thread, its outcome as a future of the
    running loop. A daemon: a ``serve.run`` that waits for replicas that never come
    must not keep the process from exiting once the deployment gave up on it."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def target() -> None:
        try:
            outcome: tuple[Any, BaseException | None] = (fn(*args, **kwargs), None)
        except BaseException as err:  # (handed to the waiter, as to_thread does)
            outcome = (None, err)
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
            loop.call_soon_threadsafe(settle, *outcome)

    threading.Thread(target=target, name=f"mii-{fn.__name__}", daemon=True).start()
    # Its failure is read even when nobody waits for it any more (a stopped start):
    # asyncio would print "Future exception was never retrieved".
    future.add_done_callback(lambda done: done.cancelled() or done.exception())
    return future


async def outcome(work: asyncio.Future[T] | None, timeout: float) -> T | None:
    """``work``'s result once it has ended, waited for up to ``timeout`` s (a thread's
    work that a stopped or cancelled start left running); None when there is no work,
    it failed, or it still runs."""
    if work is None:
        return None
    await asyncio.wait({work}, timeout=timeout)
    if not work.done() or work.cancelled() or work.exception() is not None:
        return None
    return work.result()


async def unless_stopped(work: Awaitable[T], stop: asyncio.Event, timeout: float | None) -> T:
    """``work``'s result; StoppedWhileStarting when ``stop`` is set first,
    asyncio.TimeoutError after ``timeout`` seconds (None: no limit). ``work`` is
    cancelled either way (a thread's work runs on, unwaited)."""
    task = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        done, _ = await asyncio.wait(
            {task, stopping}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
    except BaseException:  # cancelled (Ctrl-C while starting): nobody reads ``work`` now
        task.cancel()
        raise
    finally:
        stopping.cancel()
    if task in done:
        return task.result()
    task.cancel()
    if stop.is_set():
        raise StoppedWhileStarting(
            "stopped while starting (a signal or a Terminate call); its Serve replicas were "
            "still starting"
        )
    raise asyncio.TimeoutError


async def until_submitted(app: str, run: asyncio.Future | None, timeout: float) -> None:
    """Until ``serve.run`` (``run``: its thread's outcome) has handed ``app`` to Serve's
    controller, or has ended, or ``timeout`` s. A stop that deleted the application
    before that would delete nothing; the thread would then start Serve again, if the
    stop had shut it down (a controller, and a proxy on Serve's default port, left
    behind), and deploy the application after all."""
    from ray import serve

    deadline = time.monotonic() + timeout
    while run is not None and not run.done() and time.monotonic() < deadline:
        try:
            status = await asyncio.to_thread(serve.status)
        except Exception:  # (Serve is not up yet)
            status = None
        if status is not None and app in status.applications:
            return
        await asyncio.sleep(0.2)


async def threads_settled(
    app: str, serving: asyncio.Future | None, run: asyncio.Future | None, timeout: float
) -> bool:
    """Before what a start began is removed: wait, ``timeout`` s in all, for Serve's
    start (``serving``: start_serve in its thread) to end and for ``serve.run``
    (``run``) to hand ``app`` over; a start stopped or cancelled midway (Ctrl-C on
    mii serve) left them running, and what they start must go too. Returns whether
    the start started Serve; says so when Serve was still starting at the end."""
    deadline = time.monotonic() + timeout
    started = await outcome(serving, timeout)
    if serving is not None and not serving.done():
        print(
            "[mii] Ray Serve was still starting when the deployment stopped; if it comes "
            "up, `serve shutdown` stops it",
            file=sys.stderr,
            flush=True,
        )
    await until_submitted(app, run, max(0.0, deadline - time.monotonic()))
    return bool(started)
