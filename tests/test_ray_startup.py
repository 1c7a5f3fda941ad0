"""A Ray deployment's start-up waits (mii.ray_backend.startup): Serve's blocking
calls in daemon threads, each wait ended by a stop or its time limit."""

from __future__ import annotations

import asyncio
import threading

import pytest

from mii.ray_backend.startup import in_daemon_thread, unless_stopped
from mii.rpc.startup_errors import StoppedWhileStarting


async def test_a_stop_ends_the_wait_and_the_thread_is_left_to_itself():
    """serve.run waits for replicas that may never come: a Terminate call or a signal
    during it was answered, yet the deployment went on loading and then served."""
    release = threading.Event()
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(0.05, stop.set)
    blocked = in_daemon_thread(release.wait)
    with pytest.raises(StoppedWhileStarting, match="stopped while starting"):
        await asyncio.wait_for(unless_stopped(blocked, stop, timeout=60), 30)
    [thread] = [t for t in threading.enumerate() if t.name == "mii-wait"]
    assert thread.daemon  # it cannot keep the process from exiting
    release.set()
    thread.join(10)


async def test_a_wait_past_its_limit_times_out_and_results_and_errors_come_through():
    never = threading.Event()
    with pytest.raises(asyncio.TimeoutError):
        await unless_stopped(in_daemon_thread(never.wait), asyncio.Event(), timeout=0.05)
    never.set()
    assert await unless_stopped(in_daemon_thread(sum, [1, 2]), asyncio.Event(), None) == 3

    def fails() -> None:
        raise RuntimeError("Deploying application x failed")

    with pytest.raises(RuntimeError, match="Deploying application"):
        await unless_stopped(in_daemon_thread(fails), asyncio.Event(), None)
    # a coroutine (the wait for the replicas' first figures) ends the same ways
    stop = asyncio.Event()
    stop.set()
    with pytest.raises(StoppedWhileStarting):
        await unless_stopped(asyncio.sleep(60), stop, None)


async def test_a_start_cancelled_by_ctrl_c_leaves_no_unread_failure():
    """Ctrl-C during serve.run cancels the wait; the thread then failed (the Serve
    controller died with the cluster) into a future nobody read: asyncio printed
    "Future exception was never retrieved" and a traceback after mii's last line."""
    release = threading.Event()

    def dies() -> None:
        release.wait()
        raise RuntimeError("SERVE_CONTROLLER_ACTOR died")

    work = in_daemon_thread(dies)
    waiter = asyncio.create_task(unless_stopped(work, asyncio.Event(), None))
    await asyncio.sleep(0.05)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    release.set()
    [thread] = [t for t in threading.enumerate() if t.name == "mii-dies"]
    thread.join(10)
    await asyncio.sleep(0.05)  # the thread's outcome reaches the loop
    assert work.cancelled()  # so its error is dropped, not left unread


async def test_a_replica_whose_engine_never_loaded_shuts_down_quietly():
    """Serve calls __del__ of a replica whose __init__ failed (a model that does not
    load) too: it raised AttributeError 'poster', a second traceback under the load
    error."""
    from mii.ray_backend.replica import MiiReplica

    class Unloaded(MiiReplica):
        def __del__(self) -> None:  # (the garbage collector's call: no coroutine left)
            pass

    await MiiReplica.__del__(object.__new__(Unloaded))


class FakeStatus:
    def __init__(self, applications) -> None:
        self.applications = applications


async def test_a_stopped_start_waits_for_serves_start_and_the_hand_over(monkeypatch, capsys):
    """A stop while Serve started (or serve.run built the application) in their
    threads deleted nothing and shut nothing down: the threads then brought Serve up
    again and left its controller and proxy on the cluster (a test found it). The
    removal waits for Serve's start to end and for the application to be handed over."""
    from ray import serve

    from mii.ray_backend.startup import threads_settled

    applications: dict = {}
    monkeypatch.setattr(serve, "status", lambda: FakeStatus(applications))
    serve_up, handed_over = threading.Event(), threading.Event()

    def start_serve() -> bool:
        serve_up.wait(10)
        return True

    def run() -> None:
        handed_over.wait(10)
        applications["app"] = "DEPLOYING"  # (then it waits for replicas: never here)
        threading.Event().wait(60)

    serving, running = in_daemon_thread(start_serve), in_daemon_thread(run)
    loop = asyncio.get_running_loop()
    loop.call_later(0.2, serve_up.set)
    loop.call_later(0.4, handed_over.set)
    started = loop.time()
    assert await threads_settled("app", serving, running, timeout=30) is True
    assert "app" in applications and loop.time() - started >= 0.35
    # Serve's start still running at the end of the wait: said, and not counted as ours
    never = threading.Event()
    assert await threads_settled("app", in_daemon_thread(never.wait), None, 0.1) is False
    assert "`serve shutdown` stops it" in capsys.readouterr().err
    never.set()
    # nothing started: nothing to wait for
    assert await threads_settled("app", None, None, 30) is False
