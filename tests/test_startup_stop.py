"""A deployment stopped, listed or orphaned while its replicas still load the model.

The replicas here never finish loading (conftest's ``never_loading`` checkpoint).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

import mii
from helpers import wait_until
from mii.cli import main as mii_main
from mii.rpc import registry
from mii.rpc.deployment import free_port
from mii.rpc.deployment_config import DeploymentConfig


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MII_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


class Starting:
    """A deployment process started as mii.serve starts one, left loading."""

    def __init__(self, model: Path, cache: Path, replicas: int = 2, **options) -> None:
        self.name = f"starting-{uuid.uuid4().hex[:8]}"
        config = DeploymentConfig.parse(
            str(model), deployment_name=self.name, port=free_port(), replica_num=replicas, **options
        )
        cache.mkdir(parents=True, exist_ok=True)
        self.log_path = cache / "deployment.log"
        with open(self.log_path, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mii.rpc.deployment", config.model_dump_json()],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(os.environ),
            )
        # (recorded first without its replicas, then with them once started)
        started = lambda: len((self.record() or {}).get("replica_pids", ())) == replicas  # noqa: E731
        assert wait_until(started, timeout=60), self.log()
        self.replica_pids = list(self.record()["replica_pids"])

    def record(self) -> dict | None:
        return registry.lookup(self.name, include_starting=True)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def pids(self) -> list[int]:
        return [self.process.pid, *self.replica_pids]

    def gone(self, pids: list[int]) -> bool:
        self.process.poll()  # (reaped: no zombie left to count as running)
        return not any(registry.pid_alive(p) for p in pids)

    def kill_all(self) -> None:
        for pid in self.pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        self.process.wait()


@pytest.fixture
def starting(never_loading, cache):
    started: list[Starting] = []

    def start(**options) -> Starting:
        started.append(Starting(never_loading, cache, **options))
        return started[-1]

    yield start
    for deployment in started:
        deployment.kill_all()


def test_a_starting_deployment_is_listed_as_starting(starting, capsys):
    s = starting()
    assert s.record()["starting"] is True
    # Not (yet) a running deployment to whatever looks one up as such (a client's wait).
    assert registry.lookup(s.name) is None and registry.list_deployments() == []
    capsys.readouterr()
    assert mii_main(["list", "--json"]) == 0
    [listed] = __import__("json").loads(capsys.readouterr().out)
    assert listed["deployment_name"] == s.name and listed["health"]["status"] == "starting"
    assert mii_main(["list"]) == 0
    assert "starting" in capsys.readouterr().out
    # A client by name says it is starting; a second deployment of the name, what to do.
    with pytest.raises(mii.DeploymentNotFoundError, match="still starting"):
        mii.client(s.name)
    with pytest.raises(mii.DeploymentError, match=f"mii terminate {s.name}"):
        registry.require_available(s.name)


def test_mii_terminate_stops_a_deployment_that_is_starting(starting, capsys):
    """It said "no running deployment named ..." (exit 1), and --ignore-not-found
    "nothing to stop" (exit 0) while the deployment went on to serve."""
    s = starting()
    assert mii_main(["terminate", s.name, "--timeout", "60"]) == 0
    assert "still starting" in capsys.readouterr().out
    assert s.gone(s.pids())
    assert s.record() is None
    assert "stopped while starting" in s.log()


def test_sigterm_while_starting_stops_at_once(starting):
    """The deployment waited for every replica to load before it acted on SIGTERM, and
    each replica for its load; the replicas were stopped one after another."""
    s = starting()
    os.kill(s.process.pid, signal.SIGTERM)
    # (the old way took 10 s per replica, one after another, after every load)
    assert wait_until(lambda: s.gone(s.pids()), timeout=9), s.log()
    assert s.process.wait(5) == 0  # a stop asked for: a service manager's is no failure
    assert "stopped while starting" in s.log()


def test_replicas_exit_when_their_deployment_dies_while_they_load(starting):
    """A replica took its parent's pid only once loaded: one whose deployment was
    killed meanwhile ran on for ever, invisible to mii list and mii terminate."""
    s = starting()
    os.kill(s.process.pid, signal.SIGKILL)
    s.process.wait()
    assert wait_until(lambda: s.gone(s.replica_pids), timeout=30)


async def test_a_replica_gives_up_its_start_when_told_to_stop_or_orphaned():
    """While the model loads (here: never), a Terminate call or the deployment's end
    ends the wait within its half-second poll; a load that ends first is returned."""
    import asyncio

    from mii.rpc.replica import _StopWhileStarting, _unless_stopped

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    never = loop.create_future()
    loop.call_later(0.1, stop.set)
    with pytest.raises(_StopWhileStarting):
        await asyncio.wait_for(_unless_stopped(never, stop, lambda: False), 5)
    orphaned = iter([False, True])
    with pytest.raises(_StopWhileStarting):
        await asyncio.wait_for(_unless_stopped(never, asyncio.Event(), lambda: next(orphaned)), 5)
    loaded = loop.create_future()
    loop.call_later(0.1, loaded.set_result, "engine")
    assert await _unless_stopped(loaded, asyncio.Event(), lambda: False) == "engine"
    never.cancel()


def test_mii_terminate_stops_a_starting_deployment_that_was_stopped(starting, capsys):
    """A starting deployment stopped with SIGSTOP: SIGTERM alone never reached it
    (it stayed stopped, and terminate timed out naming processes already gone)."""
    s = starting()
    os.kill(s.process.pid, signal.SIGSTOP)
    assert mii_main(["terminate", s.name, "--timeout", "60"]) == 0
    assert s.gone(s.pids())


def test_the_http_port_answers_503_starting_while_the_model_loads(never_loading, cache):
    """The HTTP port is bound before the model loads (a busy port fails at once), and
    a request there hung until the load ended; it gets 503 "starting" at once."""
    rest_port = free_port()
    http_on = {"enable_restful_api": True, "restful_api_port": rest_port}
    s = Starting(never_loading, cache, replicas=1, **http_on)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{rest_port}", timeout=10) as http:
            health = http.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "starting"
            assert health.headers["retry-after"] == "5"
            answer = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
            assert answer.status_code == 503
            assert answer.json()["error"]["code"] == "service_unavailable"
        assert mii_main(["terminate", s.name]) == 0
        assert s.gone(s.pids())
    finally:
        s.kill_all()


def test_the_grpc_port_answers_unavailable_starting_while_the_model_loads(starting):
    """The gRPC port was bound but served nothing until the replicas had loaded: a
    client at host:port (another machine's, a health probe) waited for its whole
    deadline. Calls get UNAVAILABLE "starting" at once, health NOT_SERVING, and
    Terminate stops the start."""
    s = starting(replicas=1)
    address = f"127.0.0.1:{s.record()['port']}"
    with mii.client(address) as client:
        started = __import__("time").monotonic()
        with pytest.raises(mii.UnavailableError, match="is starting") as err:
            client.generate("Seattle is", max_new_tokens=2, timeout=60)
        assert not isinstance(err.value, mii.NoReplicaError)
        with pytest.raises(mii.UnavailableError, match="is starting"):
            list(client.stream("Seattle is", max_new_tokens=2, timeout=60))
        assert __import__("time").monotonic() - started < 30  # answered, not timed out
        assert client.is_healthy(timeout=10) is False
        client.terminate_server()
    assert wait_until(lambda: s.gone(s.pids()), timeout=30), s.log()
    assert "stopped while starting" in s.log()
