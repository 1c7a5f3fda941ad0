"""Issue 14, items 7 and 8: a frozen replica (SIGSTOP) fails its requests with
UNAVAILABLE and leaves rotation; a replica that exits is restarted
(on a fresh port: a process that took the old one cannot keep it down; back-off,
restart limit); per-replica health in ``/health`` and ``mii list``.

One deployment of 2 replicas serves every test of this module, in order; its
forward passes are slowed (MII_PASS_DELAY_S) so that a long request is still
running whatever the machine's speed.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest

import mii
from helpers import PROMPTS, replica_client, wait_until
from mii.cli import main as mii_main
from mii.errors import MiiError
from mii.rpc import registry
from mii.rpc.client import MiiClient
from mii.rpc.deployment import free_port
from mii.rpc.supervisor import RestartPolicy, Supervisor

NAME = "test-supervised"
TIMEOUT_S = 2.0  # the deployment's replica_timeout_s
MAX_RESTARTS = 2
LONG = {"max_new_tokens": 200, "ignore_eos": True}  # >= 20 s at 0.1 s per pass


@dataclass
class Supervised:
    client: MiiClient
    http: httpx.Client
    model: Path  # a copy of the checkpoint, which a test may take away
    pid: int

    def health(self) -> dict:
        return self.http.get("/health").json()

    def replica(self, index: int) -> dict:
        return self.health()["replicas"][index]

    def busy_replica(self) -> dict:
        """The replica that has a request in flight (waits for it)."""
        found: list[dict] = []

        def busy() -> bool:
            found[:] = [r for r in self.health()["replicas"] if r["in_flight"] >= 1]
            return len(found) == 1

        assert wait_until(busy), self.health()
        return found[0]


@pytest.fixture(scope="module")
def supervised(tmp_path_factory, checkpoints):
    model = tmp_path_factory.mktemp("supervised") / "model"
    shutil.copytree(checkpoints("llama")[0], model)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MII_CACHE_DIR", str(tmp_path_factory.mktemp("mii-cache")))
        mp.setenv("MII_PASS_DELAY_S", "0.1")  # inherited by the deployment's processes
        rest_port = free_port()
        client = mii.serve(
            str(model),
            deployment_name=NAME,
            replica_num=2,
            port=free_port(),
            enable_restful_api=True,
            restful_api_port=rest_port,
            replica_timeout_s=TIMEOUT_S,
            replica_restart_backoff_s=0.2,
            replica_max_restarts=MAX_RESTARTS,
            shutdown_grace_s=1.0,
        )
        http = httpx.Client(base_url=f"http://127.0.0.1:{rest_port}", timeout=30)
        info = registry.lookup(NAME)
        try:
            yield Supervised(client, http, model, info["pid"])
        finally:
            http.close()
            client.terminate_server()


def list_json(capsys) -> dict:
    """``mii list --json``: this deployment's record, with its health."""
    capsys.readouterr()
    assert mii_main(["list", "--json"]) == 0
    [record] = [d for d in json.loads(capsys.readouterr().out) if d["deployment_name"] == NAME]
    return record


def run_in_thread(fn):
    """Start ``fn()`` in a thread; the returned function joins it and gives its
    (result, exception)."""
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as err:  # handed to the test
            box["error"] = err

    thread = threading.Thread(target=target, daemon=True)
    thread.start()

    def join(timeout: float):
        thread.join(timeout)
        assert not thread.is_alive(), f"the request still runs after {timeout} s"
        return box.get("result"), box.get("error")

    return join


# ----- item 7: a frozen replica ------------------------------------------------------------


def _grpc_stream(s: Supervised):
    stream = s.client.stream(PROMPTS[0], timeout=60, **LONG)
    next(stream)  # generating
    return run_in_thread(lambda: list(stream))


def _grpc_unary(s: Supervised):
    return run_in_thread(lambda: s.client.generate(PROMPTS[0], timeout=60, **LONG))


def _sse_stream(s: Supervised):
    body = {"prompt": PROMPTS[0], "max_tokens": LONG["max_new_tokens"], "ignore_eos": True}
    response = s.http.send(
        s.http.build_request("POST", "/v1/completions", json={**body, "stream": True}),
        stream=True,
    )
    lines = response.iter_lines()
    assert next(line for line in lines if line).startswith("data: {")  # generating

    def rest():
        try:
            return [line for line in lines if line]
        finally:
            response.close()

    return run_in_thread(rest)


def _endings(s: Supervised) -> dict[str, float]:
    """The deployment's failed and refused-as-unavailable request counts (/metrics)."""
    from prometheus_client.parser import text_string_to_metric_families

    found = {}
    for family in text_string_to_metric_families(s.http.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "mii_requests_total" and sample.labels["finish_reason"] == "error":
                found["error"] = sample.value
            if sample.name == "mii_requests_rejected_total":
                found[sample.labels["reason"]] = sample.value
    return found


@pytest.mark.parametrize("start", [_grpc_stream, _sse_stream, _grpc_unary])
def test_frozen_replica_fails_its_request_and_leaves_rotation(supervised, start):
    """A stream its frozen replica was answering fails after replica_timeout_s; a
    whole-answer call (nothing answered yet) goes to the other replica instead (it
    failed with NoReplicaError while that replica was idle: a user trial)."""
    s = supervised
    assert wait_until(lambda: s.health()["healthy_replicas"] == 2), s.health()
    join = start(s)
    frozen = s.busy_replica()
    other = 1 - frozen["index"]
    before = _endings(s)
    os.kill(frozen["pid"], signal.SIGSTOP)
    try:
        began = time.monotonic()
        # (a whole answer is generated again on the other replica: 20 s at 0.1 s a pass)
        result, error = join(timeout=TIMEOUT_S + 60)
        took = time.monotonic() - began
        if start is _grpc_unary:  # nothing was answered yet: the other replica answers it
            assert error is None, error
            [answer] = result
            assert answer.generated_length == LONG["max_new_tokens"]
        elif start is _sse_stream:  # the 200 was sent: an error event, then [DONE]
            assert error is None, error
            *_, last_event, done = result
            failure = json.loads(last_event.removeprefix("data: "))["error"]
            assert "stopped responding" in failure["message"], result[-3:]
            assert failure["code"] == "no_replica_available"
            assert done == "data: [DONE]"
        else:
            assert isinstance(error, MiiError), (result, error)
            assert str(error).startswith("UNAVAILABLE"), error
            assert "stopped responding" in str(error)
        assert took >= TIMEOUT_S - 0.5  # not before its replica was silent that long
        # A request its replica failed while serving it: an error, not a refusal (it was
        # counted as rejected "unavailable", a request refused before starting); a
        # whole answer retried elsewhere is no error.
        after = _endings(s)
        failed = 0 if start is _grpc_unary else 1
        assert after["error"] == before["error"] + failed, (before, after)
        assert after["unavailable"] == before["unavailable"], (before, after)
        # Out of rotation while frozen; the other replica takes every new request.
        health = s.health()
        assert health["replicas"][frozen["index"]]["state"] == "unresponsive", health
        assert health["status"] == "ok" and health["healthy_replicas"] == 1
        for prompt in PROMPTS[:3]:
            [answer] = s.client.generate(prompt, max_new_tokens=2, ignore_eos=True, timeout=30)
            assert answer.generated_length == 2
        assert s.replica(other)["state"] == "serving"
    finally:
        os.kill(frozen["pid"], signal.SIGCONT)
    # It answers again: back in rotation, the same process (nobody restarted it).
    assert wait_until(lambda: s.replica(frozen["index"])["state"] == "serving"), s.health()
    assert s.replica(frozen["index"])["pid"] == frozen["pid"]
    assert s.replica(frozen["index"])["restarts"] == 0
    replica = replica_client(frozen["address"], frozen["pid"])
    [answer] = replica.generate(PROMPTS[1], max_new_tokens=2, ignore_eos=True, timeout=30)
    assert answer.generated_length == 2


# ----- item 8: supervision -----------------------------------------------------------------


def test_killed_replica_is_restarted(supervised, capsys):
    s = supervised
    before = s.replica(1)
    assert before["state"] == "serving" and before["restarts"] == 0
    os.kill(before["pid"], signal.SIGKILL)
    # Another local process takes the dead replica's port during the back-off: the
    # restart must not depend on getting it back (it used to fail on it, restart
    # after restart, until the replica was given up).
    squatter = _bind_when_free(int(before["address"].rpartition(":")[2]))
    assert wait_until(lambda: s.replica(1)["state"] == "restarting", timeout=10), s.health()
    listed = list_json(capsys)["health"]
    assert listed["status"] == "ok", listed  # replica 0 serves on
    assert listed["replicas"][1]["state"] in ("restarting", "serving")
    assert listed["replicas"][1]["restarts"] == 1

    assert wait_until(lambda: s.replica(1)["state"] == "serving", timeout=120), s.health()
    after = s.replica(1)
    assert after["pid"] != before["pid"] and registry.pid_alive(after["pid"])
    assert after["restarts"] == 1 and after["address"] != before["address"]  # a fresh port
    squatter.close()
    replica = replica_client(after["address"], after["pid"])
    [answer] = replica.generate(PROMPTS[0], max_new_tokens=3, ignore_eos=True, timeout=30)
    assert answer.generated_length == 3
    record = list_json(capsys)
    assert record["health"]["replicas"][1] == {**after, "in_flight": 0}
    assert after["pid"] in record["replica_pids"]  # the registry follows the restart

    capsys.readouterr()
    assert mii_main(["list"]) == 0
    out = capsys.readouterr().out
    [row] = [line for line in out.splitlines() if line.startswith(NAME)]
    assert "ok 2/2" in row
    assert f"replica 1: serving (pid {after['pid']}, 1 restart," in out


def _bind_when_free(port: int) -> socket.socket:
    """A socket listening on 127.0.0.1:``port`` once the port can be bound."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # past TIME_WAIT, as gRPC
    deadline = time.monotonic() + 10
    while True:
        try:
            sock.bind(("127.0.0.1", port))
            break
        except OSError:
            assert time.monotonic() < deadline, f"port {port} stayed busy"
            time.sleep(0.02)
    sock.listen()
    return sock


def test_replica_that_keeps_crashing_is_given_up(supervised, capsys):
    s = supervised
    assert wait_until(lambda: s.health()["healthy_replicas"] == 2), s.health()
    victim = s.replica(0)
    moved = s.model.with_name("model-moved")
    s.model.rename(moved)  # every new replica process now fails to load
    try:
        os.kill(victim["pid"], signal.SIGKILL)
        assert wait_until(lambda: s.replica(0)["state"] == "failed", timeout=150), s.health()
    finally:
        moved.rename(s.model)
    health = s.http.get("/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"  # replica 1 serves
    assert health.json()["replicas"][0]["restarts"] == MAX_RESTARTS
    listed = list_json(capsys)["health"]
    assert [r["state"] for r in listed["replicas"]] == ["failed", "serving"]
    [answer] = s.client.generate(PROMPTS[0], max_new_tokens=2, ignore_eos=True, timeout=30)
    assert answer.generated_length == 2
    log = registry.log_path(NAME).read_text()
    assert "giving up on it" in log and "replica_max_restarts" in log
    time.sleep(1.0)  # given up for good: not restarted again
    assert s.replica(0)["state"] == "failed"


def test_no_replica_left_answers_503_and_says_so(supervised, capsys):
    s = supervised
    last = s.replica(1)
    os.kill(last["pid"], signal.SIGSTOP)  # (replica 0 failed above)
    try:
        assert wait_until(lambda: s.http.get("/health").status_code == 503), s.health()
        assert s.health()["status"] == "unavailable"
        assert list_json(capsys)["health"]["status"] == "unavailable"
        # A request meanwhile: 503 with a Retry-After (a replica may rejoin).
        r = s.http.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 1})
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        # The gRPC client raises the deployment's NoReplicaError, as documented (its
        # UnavailableError only, before: `except mii.NoReplicaError` caught nothing).
        with pytest.raises(mii.NoReplicaError, match="no replica"):
            s.client.generate(PROMPTS[0], max_new_tokens=1, timeout=30)
    finally:
        os.kill(last["pid"], signal.SIGCONT)
    assert wait_until(lambda: s.http.get("/health").status_code == 200), s.health()


def test_deployment_stops_with_an_error_once_every_replica_failed(supervised):
    """The last replica given up on (replica 0 failed above): the deployment used to
    stay up answering 503 "retry in 1 s" forever, so that no process supervisor
    (systemd, Kubernetes) ever restarted it. It now stops, saying why, and exits
    with an error; terminate_server() on it afterwards is a no-op."""
    s = supervised
    assert wait_until(lambda: s.replica(1)["state"] == "serving", timeout=60), s.health()
    moved = s.model.with_name("model-moved")
    s.model.rename(moved)  # every new replica process now fails to load
    try:
        os.kill(s.replica(1)["pid"], signal.SIGKILL)
        assert wait_until(lambda: not registry.pid_alive(s.pid), timeout=150)
    finally:
        moved.rename(s.model)
    log = registry.log_path(NAME).read_text()
    assert "every replica failed" in log and "replica_max_restarts" in log, log[-2000:]
    assert registry.lookup(NAME) is None  # its record is gone: the name is free
    with pytest.raises(httpx.TransportError):
        s.http.get("/health")


# ----- the supervisor's rules, without processes ---------------------------------------------


def test_the_restart_log_line_says_why_once():
    from mii.rpc.supervisor import _why

    # The log's last line, not the "exited with code" preamble the line already says.
    assert _why("replica 0 exited with code -9:\nloading the model\nKilled") == ": Killed"
    assert _why("replica 0 exited with code 1:\n") == ""
    assert _why("replica 0 was killed by SIGSEGV:\nSegmentation fault") == ": Segmentation fault"
    assert _why("replica 0 was killed by SIGSEGV") == ""  # (nothing in its log)
    assert _why("the model directory does not exist") == ": the model directory does not exist"
    assert _why(None) == ""


def test_the_restart_log_line_names_the_signal_and_counts_in_words(capsys):
    """A replica a signal ended: "was killed by SIGKILL", not its log's last line as
    the reason ("exited with code -9: [mii] converted in 8.3 s"); "once", not "1 times"."""
    pool, spawned = FakePool(), []
    processes = [FakeProcess(99)]
    policy = RestartPolicy(max_restarts=1, window_s=100.0, backoff_s=1.0)
    supervisor = Supervisor(
        pool, processes, lambda i: spawned.append(FakeProcess(7)) or spawned[-1], policy
    )
    processes[0].code = -9
    supervisor.tick(1000.0)
    said = capsys.readouterr().err
    assert "replica 0 (pid 99) was killed by SIGKILL; restarting it in 1 s" in said
    supervisor.tick(1001.0)
    processes[0].code = -11  # a crash: the log's end may say why
    supervisor.tick(1002.0)
    said = capsys.readouterr().err
    assert "(pid 7) died of SIGSEGV; it was restarted once in" in said


class FakeReplica(SimpleNamespace):
    """What the supervisor touches of a pool's Replica."""

    def __init__(self) -> None:
        super().__init__(healthy=False, state=None, restarts=0, pid=None, address="old:1")

    def move_to(self, address: str) -> None:
        self.address = address


class FakePool:
    """What the supervisor touches of a ReplicaPool: its replicas."""

    def __init__(self) -> None:
        self.replicas = [FakeReplica()]


class FakeProcess:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.address = f"127.0.0.1:{pid}"  # each process its own port
        self.code: int | None = None

    def exit_code(self) -> int | None:
        return self.code

    def failure(self) -> str | None:
        return None if self.code is None else f"replica exited with code {self.code}"

    def kill(self) -> None:
        self.code = -9


def test_restart_backoff_doubles_and_the_limit_gives_up():
    pool = FakePool()
    spawned: list[FakeProcess] = []

    def spawn(index: int) -> FakeProcess:
        spawned.append(FakeProcess(100 + len(spawned)))
        return spawned[-1]

    processes = [FakeProcess(99)]
    policy = RestartPolicy(max_restarts=3, window_s=100.0, backoff_s=1.0)
    supervisor = Supervisor(pool, processes, spawn, policy)
    replica = pool.replicas[0]
    now = 1000.0
    for attempt, backoff in enumerate([1.0, 2.0, 4.0]):
        processes[0].code = 1  # crashed
        supervisor.tick(now)
        assert replica.state == "restarting" and replica.restarts == attempt + 1
        assert replica.pid is None  # /health and mii list name no dead process
        supervisor.tick(now + backoff - 0.01)
        assert len(spawned) == attempt  # still waiting out the back-off
        supervisor.tick(now + backoff)
        assert len(spawned) == attempt + 1 and replica.pid == spawned[-1].pid
        assert replica.address == spawned[-1].address  # the pool follows the new port
        now += backoff + 1
    processes[0].code = 1  # a fourth exit within the window: given up
    assert not supervisor.all_failed
    supervisor.tick(now)
    assert replica.state == "failed" and len(spawned) == 3 and replica.pid is None
    assert supervisor.all_failed
    supervisor.tick(now + 1000)
    assert replica.state == "failed" and len(spawned) == 3


async def test_run_until_says_why_supervision_ended_first():
    """run_until(stop): returns once stop is set; raises DeploymentError when every
    replica failed, or when a replacement process could not be started (that ended
    the deployment as a clean stop, exit 0, before)."""
    from mii.errors import DeploymentError

    def supervisor(spawn) -> Supervisor:
        return Supervisor(FakePool(), [FakeProcess(1)], spawn, RestartPolicy(backoff_s=0.0))

    stop = asyncio.Event()
    looked_after = supervisor(lambda i: FakeProcess(2))
    loop = asyncio.get_running_loop()
    loop.call_later(0.3, stop.set)
    await asyncio.wait_for(looked_after.run_until(stop), timeout=5)  # returns

    def no_process(index: int) -> FakeProcess:
        raise OSError("Too many open files")

    broken = supervisor(no_process)
    broken.processes[0].code = 1  # exits: its restart cannot spawn
    with pytest.raises(DeploymentError, match=r"supervising its replicas failed .*open files"):
        await asyncio.wait_for(broken.run_until(asyncio.Event()), timeout=5)

    given_up = Supervisor(FakePool(), [FakeProcess(1)], no_process, RestartPolicy(max_restarts=0))
    given_up.processes[0].code = 1
    with pytest.raises(DeploymentError, match=r"every replica failed .*replica_max_restarts"):
        await asyncio.wait_for(given_up.run_until(asyncio.Event()), timeout=5)


async def test_supervision_ends_once_every_replica_has_failed():
    """run() returns when nothing is left to serve (the deployment then stops with
    an error), and not while one replica of two still serves."""
    pool = FakePool()
    pool.replicas.append(FakeReplica())
    processes = [FakeProcess(1), FakeProcess(2)]
    policy = RestartPolicy(max_restarts=0)  # the first exit is given up
    supervisor = Supervisor(pool, processes, lambda i: FakeProcess(3), policy)
    pool.replicas[1].healthy = True
    processes[0].code = 1
    running = asyncio.create_task(supervisor.run())
    await asyncio.sleep(0.3)
    assert pool.replicas[0].state == "failed" and not running.done()  # replica 1 serves on
    processes[1].code = -9
    await asyncio.wait_for(running, timeout=5)
    assert supervisor.all_failed


def test_restarts_outside_the_window_do_not_count():
    pool = FakePool()
    processes = [FakeProcess(1)]
    supervisor = Supervisor(
        pool,
        processes,
        lambda i: FakeProcess(2),
        RestartPolicy(max_restarts=1, window_s=10.0, backoff_s=0.0),
    )
    processes[0].code = 1
    supervisor.tick(0.0)
    supervisor.tick(0.0)  # restarted
    assert pool.replicas[0].state == "restarting"
    processes[0].code = 1
    supervisor.tick(11.0)  # the first restart left the window
    assert pool.replicas[0].state == "restarting" and pool.replicas[0].restarts == 2


def test_a_replica_out_of_rotation_and_back_is_logged(capsys):
    """A frozen replica left and rejoined rotation without a word in the log, where an
    exited one is logged (user trial); a probe missed for less than 2 s stays quiet."""
    pool = FakePool()
    processes = [FakeProcess(1)]
    supervisor = Supervisor(pool, processes, lambda i: FakeProcess(2), RestartPolicy())
    replica = pool.replicas[0]
    replica.healthy = True
    supervisor.tick(0.0)
    replica.healthy = False
    supervisor.tick(1.0)
    replica.healthy = True
    supervisor.tick(1.5)  # one missed look: nothing said
    assert capsys.readouterr().err == ""
    replica.healthy = False
    supervisor.tick(2.0)
    supervisor.tick(4.5)
    supervisor.tick(5.0)
    replica.healthy = True
    supervisor.tick(9.0)
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 2, lines
    assert "replica 0" in lines[0] and "out of rotation" in lines[0]
    assert "answers again after 7.0 s: back in rotation" in lines[1]


def test_unresponsive_replica_is_killed_after_the_limit():
    pool = FakePool()
    processes = [FakeProcess(1)]
    policy = RestartPolicy(unresponsive_restart_s=5.0)
    supervisor = Supervisor(pool, processes, lambda i: FakeProcess(2), policy)
    replica = pool.replicas[0]
    supervisor.tick(0.0)
    assert replica.state == "starting"  # loading: never killed for that
    replica.healthy = True
    supervisor.tick(1.0)
    assert replica.state == "serving"
    replica.healthy = False  # stops answering its probes
    supervisor.tick(2.0)
    assert replica.state == "unresponsive" and processes[0].code is None
    supervisor.tick(6.9)
    assert processes[0].code is None
    supervisor.tick(7.0)
    assert processes[0].code == -9  # killed; the next look restarts it
    supervisor.tick(7.1)
    assert replica.state == "restarting" and replica.restarts == 1


async def test_a_moved_replica_keeps_its_probe_in_flight_and_drops_its_old_channel():
    """Replica.move_to (a restart on a fresh port): a health probe already waiting on
    the old address (here a socket that never answers, as a process squatting the
    port) ends as a missed probe, not cancelled: closing the old channel at once
    raised CancelledError into it, and the Stats call awaiting it never answered.
    New calls go to the new address; close() closes the old channel too."""
    from mii.rpc.pool import HEALTH_PROBE_TIMEOUT_S, ReplicaPool

    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    try:
        pool = ReplicaPool([f"127.0.0.1:{squatter.getsockname()[1]}"], token="t")
        [replica] = pool.replicas
        old = replica.channel
        probe = asyncio.ensure_future(pool.check(replica))
        await asyncio.sleep(0.2)  # the probe is waiting on the squatter
        moved = f"127.0.0.1:{free_port()}"
        replica.move_to(moved)
        assert replica.channel is not old and replica.address == moved
        started = time.monotonic()
        assert await probe is False  # missed, within its own deadline
        assert time.monotonic() - started <= HEALTH_PROBE_TIMEOUT_S + 0.5
        assert await pool.check(replica) is False  # nothing listens there yet: refused
        await pool.close()
        assert not replica._retiring  # the old channel closed with the pool
    finally:
        squatter.close()


def test_health_states_agree_with_the_status_between_the_supervisors_looks():
    """The probe updates ``healthy`` at once, the supervisor its ``state`` on its next
    look: in between, /health said ``"status": "ok", "healthy_replicas": 1`` beside
    its only replica ``"state": "unresponsive"`` (user trial). A replica's state is
    ``serving`` exactly while it is in rotation."""
    from mii.rpc.replica_health import health_body

    def pool(*replicas):
        return SimpleNamespace(replicas=[SimpleNamespace(**r) for r in replicas])

    for state in ("unresponsive", "starting", "restarting", "serving", None):
        body, code = health_body(pool({"healthy": True, "state": state}))
        assert code == 200 and body["healthy_replicas"] == 1
        assert body["replicas"][0]["state"] == "serving", state
    body, code = health_body(pool({"healthy": False, "state": "serving"}, {"healthy": False}))
    assert code == 503 and body["status"] == "unavailable" and body["healthy_replicas"] == 0
    assert [r["state"] for r in body["replicas"]] == ["unresponsive", "unresponsive"]
    for state in ("starting", "restarting", "failed"):
        body, _ = health_body(pool({"healthy": False, "state": state}))
        assert body["replicas"][0]["state"] == state
