"""Issue 14, item 9: SIGTERM drains a deployment. New requests are refused at once
(HTTP 503, gRPC UNAVAILABLE, health NOT_SERVING); a short request in flight
completes normally; one still running when ``shutdown_grace_s`` is over ends with
an error event and ``data: [DONE]`` (SSE) or UNAVAILABLE (gRPC); the logs hold no
traceback."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import threading
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import mii
from helpers import PROMPTS, SseStream, wait_until
from mii.errors import MiiError
from mii.rpc import registry
from mii.rpc.call_guard import CallGuard, ShuttingDownError
from mii.rpc.deployment import free_port
from mii.rpc.drain import ShutdownRequest, drain

NAME = "test-drain"
GRACE_S = 10.0
SHORT = 20  # tokens: >= 2 s at 0.1 s per pass, well within the grace period
LONG = 200  # tokens: >= 20 s, well beyond it


@pytest.fixture
def draining_deployment(tmp_path, checkpoints, monkeypatch):
    monkeypatch.setenv("MII_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("MII_PASS_DELAY_S", "0.1")  # inherited by the deployment's processes
    rest_port = free_port()
    # SIGHUP as a login shell leaves it (a test run under nohup passes its ignored
    # SIGHUP on, which the deployment then rightly keeps ignoring)
    hangup = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        client = mii.serve(
            str(checkpoints("llama")[0]),
            deployment_name=NAME,
            port=free_port(),
            enable_restful_api=True,
            restful_api_port=rest_port,
            shutdown_grace_s=GRACE_S,
        )
    finally:
        signal.signal(signal.SIGHUP, hangup)
    info = registry.lookup(NAME)
    yield client, info, f"http://127.0.0.1:{rest_port}"
    for pid in (info["pid"], *info["replica_pids"]):
        if registry.pid_alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize(
    "signalled, signum",
    [
        ("deployment", signal.SIGTERM),
        ("every process", signal.SIGTERM),
        ("every process", signal.SIGHUP),
    ],
    ids=["SIGTERM-deployment", "SIGTERM-every-process", "SIGHUP-every-process"],
)
def test_sigterm_drains_in_flight_requests_and_refuses_new_ones(
    draining_deployment, signalled, signum
):
    """SIGTERM to the deployment's process, or to all of its processes at once as
    systemd's default stop (KillMode=control-group) and a process-group kill send
    it: the replica's running calls still finish or last out the grace period.
    SIGHUP to them all (a closed terminal or SSH session) drains the same way: it
    ended every process at once, cutting the streams."""
    client, info, url = draining_deployment
    short, long_sse = SseStream(url, SHORT), SseStream(url, LONG)
    grpc_pieces: list = []
    grpc_error: list[BaseException] = []

    def long_grpc() -> None:
        try:
            for piece in client.stream(PROMPTS[1], max_new_tokens=LONG, ignore_eos=True):
                grpc_pieces.append(piece)
        except BaseException as err:  # handed to the test
            grpc_error.append(err)

    grpc_thread = threading.Thread(target=long_grpc, daemon=True)
    grpc_thread.start()
    assert short.started.wait(30) and long_sse.started.wait(30)
    assert wait_until(lambda: len(grpc_pieces) > 0)
    assert short.is_alive(), "the short stream ended before the signal"

    for pid in [info["pid"]] + (info["replica_pids"] if signalled == "every process" else []):
        os.kill(pid, signum)
    began = time.monotonic()
    with httpx.Client(base_url=url, timeout=10) as http:
        assert wait_until(lambda: http.get("/health").status_code == 503)
        assert http.get("/health").json()["status"] == "draining"
        refused = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert refused.status_code == 503, refused.text
        assert "shutting down" in refused.json()["error"]["message"]
        # No Retry-After: the deployment is going away, not back in a second (it said 1 s).
        assert "retry-after" not in refused.headers
        assert http.post(f"/mii/{NAME}", json={"prompts": "x"}).status_code == 503
    with pytest.raises(MiiError, match=r"^UNAVAILABLE: .*shutting down"):
        client.generate("x", max_new_tokens=2)
    with grpc.insecure_channel(f"127.0.0.1:{info['port']}") as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
    assert time.monotonic() - began < GRACE_S, "these checks must run within the grace period"

    # The short stream finished as if nothing happened.
    short.join(30)
    assert short.error is None, short.error
    *chunks, done = short.events
    assert done == "data: [DONE]"
    last = json.loads(chunks[-1].removeprefix("data: "))
    assert last["choices"][0]["finish_reason"] == "length"
    assert not any('"error"' in event for event in chunks)

    # The long ones were ended once the grace period was over, saying so.
    long_sse.join(GRACE_S + 30)
    assert long_sse.error is None, long_sse.error
    *_, error_event, done = long_sse.events
    assert done == "data: [DONE]"
    error = json.loads(error_event.removeprefix("data: "))["error"]
    assert "shut down" in error["message"] and error["type"] == "server_error"
    assert time.monotonic() - began >= GRACE_S - 0.5
    grpc_thread.join(30)
    [err] = grpc_error
    assert isinstance(err, MiiError) and str(err).startswith("UNAVAILABLE"), err

    assert wait_until(lambda: not registry.pid_alive(info["pid"]))
    assert wait_until(lambda: not any(registry.pid_alive(p) for p in info["replica_pids"]))
    logs = sorted(registry.registry_dir().glob(f"{NAME}*.log"))
    assert len(logs) == 2  # the deployment's and its replica's
    for log in logs:
        text = log.read_text()
        assert "Traceback" not in text, f"{log.name}:\n{text}"
        assert "Error" not in text.replace("MII_STARTUP_ERROR", ""), f"{log.name}:\n{text}"


# ----- the drain's rules, without a deployment ----------------------------------------------


class FakeCall:
    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class FakeReplica:
    address = "127.0.0.1:1"
    healthy = True
    unanswered_since = None


class FakePool:
    def __init__(self) -> None:
        self.guard = CallGuard()


def test_sigint_stops_a_deployment_that_mii_serve_started(draining_deployment):
    """mii.serve held Ctrl-C back with a blocked signal mask while it started the
    deployment, and the deployment (and its replicas) inherited it: SIGINT did
    nothing. It drains and exits as on SIGTERM."""
    _, info, _ = draining_deployment
    pids = (info["pid"], *info["replica_pids"])
    for pid in pids:
        blocked = _proc_status(pid)["SigBlk"]
        assert not int(blocked, 16) & (1 << (signal.SIGINT - 1)), (pid, blocked)
    os.kill(info["pid"], signal.SIGINT)
    assert wait_until(lambda: not any(registry.pid_alive(pid) for pid in pids), timeout=60)
    assert registry.lookup(NAME) is None


def _proc_status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as status:
        return dict(line.rstrip("\n").split(":\t", 1) for line in status if ":\t" in line)


def test_a_second_signal_ends_the_grace_period_at_once():
    async def scenario():
        pool, shutdown = FakePool(), ShutdownRequest()
        call = FakeCall()
        watch = pool.guard.watch(FakeReplica(), call)
        shutdown.request()  # the first signal: drain
        assert shutdown.stop.is_set() and not shutdown.hurry.is_set()
        draining = asyncio.create_task(drain(pool, grace_s=60.0, hurry=shutdown.hurry))
        await asyncio.sleep(0.2)
        assert pool.guard.draining and not call.cancelled  # waiting for the call
        shutdown.request()  # the second: now
        loop = asyncio.get_running_loop()
        began = loop.time()
        while not call.cancelled and loop.time() - began < 5:  # cut at once, not after 60 s
            await asyncio.sleep(0.01)
        assert call.cancelled
        watch.close()  # the cut call ends
        finished = await asyncio.wait_for(draining, 10)
        assert loop.time() - began < 5
        return finished, call, watch

    finished, call, watch = asyncio.run(scenario())
    assert not finished and call.cancelled
    assert isinstance(watch.reason, ShuttingDownError)


def test_calls_that_finish_within_the_grace_period_are_not_cut():
    async def scenario():
        pool = FakePool()
        call = FakeCall()
        watch = pool.guard.watch(FakeReplica(), call)
        asyncio.get_running_loop().call_later(0.3, watch.close)  # it finishes
        return await drain(pool, grace_s=30.0), call

    finished, call = asyncio.run(scenario())
    assert finished and not call.cancelled


class _RayLikeCall:
    """A call whose cancel() makes its await raise an error of its own, as a Ray
    Serve response does (RequestCancelledError), not asyncio.CancelledError."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()

    def cancel(self) -> None:
        self.cancelled.set()

    def __await__(self):
        return self._wait().__await__()

    async def _wait(self):
        await self.cancelled.wait()
        raise RuntimeError("RequestCancelledError: the request was cancelled")


class _Replica:
    address, healthy, unanswered_since = "ray-serve", True, None


def test_a_call_cut_at_the_end_of_the_grace_period_says_so_whatever_its_transport():
    """The Ray backend's gRPC front ended such calls as INTERNAL (the transport's own
    cancellation error); the cut's reason, ShuttingDownError (UNAVAILABLE), wins."""

    async def scenario():
        guard = CallGuard()
        waiting = asyncio.ensure_future(guard.result(_Replica(), _RayLikeCall()))
        await asyncio.sleep(0.05)
        guard.cut_all()
        with pytest.raises(ShuttingDownError, match="shut down before the request finished"):
            await waiting
        await guard.close()
        # A failure of its own, with no cut, is still that failure.
        call = _RayLikeCall()
        failing = asyncio.ensure_future(CallGuard().result(_Replica(), call))
        await asyncio.sleep(0.05)
        call.cancel()  # not through the guard
        with pytest.raises(RuntimeError, match="RequestCancelledError"):
            await failing

    asyncio.run(scenario())


# ----- a Ray deployment's HTTP side, drained through its board (no Ray needed) ----------------


class _Actor:
    """A board as Ray hands it out: ``actor.method.remote(...)`` is awaited."""

    def __init__(self, target) -> None:
        self._target = target

    def __getattr__(self, name: str):
        method = getattr(self._target, name)

        class _Method:
            @staticmethod
            async def remote(*args):
                return method(*args)

        return _Method


class _IngressPool(FakePool):
    def __init__(self, board) -> None:
        super().__init__()
        self.board = board


async def _ingress_watch(ingress, every_s: float = 0.05) -> None:
    while True:  # the ingress's watch loop, faster
        await ingress.poll()
        await asyncio.sleep(every_s)


def test_the_ingress_drains_on_the_boards_notice_and_reports_back():
    from mii.ray_backend.board import StatsBoard
    from mii.ray_backend.http_drain import IngressDrain, drain_http

    async def scenario():
        board = _Actor(StatsBoard())
        pool = _IngressPool(board)
        ingress = IngressDrain(pool)
        watching = asyncio.create_task(_ingress_watch(ingress))
        await asyncio.sleep(0.2)
        assert not pool.guard.draining  # no notice yet: it serves
        call = FakeCall()
        watch = pool.guard.watch(FakeReplica(), call)
        asyncio.get_running_loop().call_later(0.5, watch.close)  # it finishes meanwhile
        loop = asyncio.get_running_loop()
        began = loop.time()
        reported = await drain_http(board, grace_s=30.0, hurry=asyncio.Event())
        watching.cancel()
        return reported, pool, call, loop.time() - began

    reported, pool, call, took = asyncio.run(scenario())
    assert reported and pool.guard.draining and not call.cancelled
    assert 0.4 < took < 10  # it waited for the call, not for the grace period


def test_a_second_signal_reaches_the_ingress():
    from mii.ray_backend import http_drain
    from mii.ray_backend.board import StatsBoard

    async def hurried():
        board = _Actor(StatsBoard())
        pool = _IngressPool(board)
        watching = asyncio.create_task(_ingress_watch(http_drain.IngressDrain(pool)))
        call = FakeCall()
        watch = pool.guard.watch(FakeReplica(), call)
        hurry = asyncio.Event()
        loop = asyncio.get_running_loop()
        loop.call_later(0.5, hurry.set)
        loop.call_later(0.5, lambda: loop.call_soon(_close_when_cut, call, watch, loop))
        began = loop.time()
        reported = await http_drain.drain_http(board, grace_s=60.0, hurry=hurry)
        watching.cancel()
        return reported, call, loop.time() - began

    reported, call, took = asyncio.run(hurried())
    assert reported and call.cancelled and took < 15  # cut at once, not after 60 s


def test_a_silent_ingress_is_not_waited_for_ever(monkeypatch):
    """No ingress follows the notice (it died): the deployment gives up after the
    grace period and the cut's wait, and deletes the application anyway."""
    from mii.ray_backend import http_drain
    from mii.ray_backend.board import StatsBoard

    monkeypatch.setattr(http_drain, "CUT_WAIT_S", 0.2)
    monkeypatch.setattr(http_drain, "REPORT_SLACK_S", 0.3)

    async def silent():
        loop = asyncio.get_running_loop()
        began = loop.time()
        reported = await http_drain.drain_http(_Actor(StatsBoard()), 0.2, asyncio.Event())
        return reported, loop.time() - began

    reported, took = asyncio.run(silent())
    assert not reported and 0.7 <= took < 5


def _close_when_cut(call, watch, loop) -> None:
    """A cut call ends (its reader sees the cancel and leaves)."""
    if call.cancelled:
        watch.close()
    else:
        loop.call_later(0.02, _close_when_cut, call, watch, loop)
