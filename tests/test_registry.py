"""The local registry of deployments: one record file per deployment name."""

from __future__ import annotations

import os

import pytest

from mii.rpc import registry


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MII_CACHE_DIR", str(tmp_path))
    yield tmp_path
    for name in list(registry._claims):  # as a deployment process's end does
        registry.release(name)


def record(name: str, info: dict) -> None:
    """What a deployment does: claim its name, then record itself."""
    registry.claim(name)
    registry.record(name, info)


NAMES = [
    "a/b",
    "a_b",
    "a%2Fb",
    "a b",
    "a.b",
    "org/model-mii-deployment",  # mii.serve("org/model")'s default name before issue 16
    "org_model-mii-deployment",
    "modèle",
    "mod_le",
    "x" * 300,
    "x" * 299 + "y",
    ".",
    "..",
]


def test_distinct_names_never_share_a_record():
    for i, name in enumerate(NAMES):
        record(name, {"pid": os.getpid(), "port": 50000 + i})
    stems = {registry.file_stem(n) for n in NAMES}
    assert len(stems) == len(NAMES)
    for i, name in enumerate(NAMES):
        info = registry.lookup(name)
        assert info["deployment_name"] == name and info["port"] == 50000 + i
    assert sorted(d["deployment_name"] for d in registry.list_deployments()) == sorted(NAMES)
    assert len({registry.log_path(n) for n in NAMES}) == len(NAMES)


def test_records_stay_in_the_registry_folder(cache):
    for name in NAMES:
        path = registry.log_path(name)
        assert path.parent == registry.registry_dir()
        assert len(path.name.encode()) < 255
    assert registry.file_stem("test-deploy") == "test-deploy"  # plain names read as themselves


def test_remove_forgets_only_that_name():
    record("a/b", {"pid": os.getpid()})
    record("a_b", {"pid": os.getpid()})
    registry.remove("a/b", pid=os.getpid())
    assert registry.lookup("a/b") is None
    assert registry.lookup("a_b")["deployment_name"] == "a_b"


CLAIM = """
import os, sys
from mii.errors import DeploymentError
from mii.rpc import registry
try:
    registry.claim(sys.argv[1])
except DeploymentError as err:
    print("refused:", err)
else:
    print("claimed")
    if len(sys.argv) > 2:  # record it under the pid of the process that started this one
        registry.record(sys.argv[1], {"pid": os.getppid(), "host": "127.0.0.1", "port": 1})
"""


def test_a_name_is_claimed_by_one_live_process(cache):
    """Two deployments of one name started at the same moment both ran (the name was
    checked at start, recorded only once loaded); and a record whose pid was reused
    by another process blocked the name for ever."""
    import subprocess
    import sys

    from mii.errors import DeploymentError
    from mii.rpc.deployment_config import DeploymentConfig

    def claim_elsewhere(name: str, *record: str) -> str:
        env = {**os.environ, "MII_CACHE_DIR": str(cache)}
        run = subprocess.run(
            [sys.executable, "-c", CLAIM, name, *record], capture_output=True, text=True, env=env
        )
        assert run.returncode == 0, run.stderr
        return run.stdout

    registry.claim("starting")  # loading its model: no record yet
    assert registry.claimed("starting")
    assert claim_elsewhere("starting").startswith("refused: a deployment named 'starting'")
    with pytest.raises(DeploymentError, match="is starting or stopping"):
        DeploymentConfig.parse("m", deployment_name="starting")
    registry.release("starting")
    assert claim_elsewhere("starting") == "claimed\n"  # the process ended: so did its claim
    assert not registry.claimed("starting")
    DeploymentConfig.parse("m", deployment_name="starting")

    # A claimant's record whose claim nobody holds any more is stale, even when its
    # pid is alive (a reused pid; here: this process, which never claimed it).
    assert claim_elsewhere("stale", "and record it") == "claimed\n"
    assert registry.lookup("stale") is None
    assert "stale" not in [d["deployment_name"] for d in registry.list_deployments()]
    DeploymentConfig.parse("m", deployment_name="stale")
    # A record of mii before claims (none taken) goes by its pid, as it did.
    registry.record("older", {"pid": os.getpid(), "host": "127.0.0.1", "port": 1})
    assert registry.lookup("older")["claimed"] is False


def test_a_stopping_deployment_is_named_as_such():
    """`kill -TERM PID; mii serve ...` right after: the new start was told the old
    deployment "is starting" (its record was gone while its processes still ran)."""
    from mii.errors import DeploymentError
    from mii.rpc.deployment_config import DeploymentConfig

    record("d", {"pid": os.getpid(), "host": "127.0.0.1", "port": 1, "served_model_name": ["s"]})
    assert registry.find("s")["deployment_name"] == "d"
    with pytest.raises(DeploymentError, match="'d' is already running; stop it"):
        DeploymentConfig.parse("m", deployment_name="d")
    registry.mark_stopping("d", pid=os.getpid() + 1)  # not its process: no change
    assert not registry.lookup("d").get("stopping")
    registry.mark_stopping("d", pid=os.getpid())
    info = registry.lookup("d")
    assert info["stopping"] is True and info["port"] == 1 and info["claimed"] is True
    with pytest.raises(DeploymentError, match=r"'d' is stopping .* once it is gone"):
        DeploymentConfig.parse("m", deployment_name="d")
    from mii.cli.deployments import deployment_health

    assert deployment_health(info) == {"status": "stopping"}  # mii list says so
    assert registry.find("s") is None  # its served name finds no stopping deployment
    registry.remove("d", pid=os.getpid())  # its processes are gone; the claim is not yet
    with pytest.raises(DeploymentError, match="'d' is starting or stopping"):
        DeploymentConfig.parse("m", deployment_name="d")
    registry.release("d")
    DeploymentConfig.parse("m", deployment_name="d")


def test_a_client_finds_a_deployment_by_the_model_name_it_serves():
    """`mii terminate SmolLM2-135M-Instruct` (the name the demo's OpenAI API serves)
    did not find the deployment `mii-demo`; a name two deployments serve stays
    ambiguous, so it is not found."""
    import mii
    from mii.rpc.client import DeploymentNotFoundError, client

    record("mii-demo", {"pid": os.getpid(), "host": "::1", "port": 50050,
                        "served_model_name": ["SmolLM2-135M-Instruct", "smol"]})  # fmt: skip
    from mii.cli.generate import _find_deployment

    found = client("SmolLM2-135M-Instruct")
    assert found.deployment_name == "mii-demo" and found.address == "[::1]:50050"
    found.close()
    found = _find_deployment("SmolLM2-135M-Instruct")  # mii generate NAME, the same way
    assert found.deployment_name == "mii-demo" and found.address == "[::1]:50050"
    found.close()
    record("other", {"pid": os.getpid(), "host": "127.0.0.1", "port": 50051,
                     "served_model_name": ["smol"]})  # fmt: skip
    for find in (client, _find_deployment):  # ambiguous: an error naming both
        with pytest.raises(mii.AmbiguousDeploymentError, match="'mii-demo', 'other'") as err:
            find("smol")
        # (found twice is no "not found": code catching that would think none runs)
        assert not isinstance(err.value, DeploymentNotFoundError)
        assert isinstance(err.value, LookupError)


def test_the_not_found_error_says_where_it_looked():
    """A deployment started with another MII_CACHE_DIR is recorded elsewhere: the
    error names the folder searched and the variable (it said 'no running
    deployment ... on this machine' while one ran; user trial)."""
    import mii
    from mii.errors import DeploymentNotFoundError

    with pytest.raises(mii.DeploymentNotFoundError) as caught:
        mii.client("not-running-here")
    assert isinstance(caught.value, DeploymentNotFoundError) and isinstance(
        caught.value, LookupError
    )
    assert str(registry.registry_dir()) in str(caught.value) and "MII_CACHE_DIR" in str(
        caught.value
    )
    assert {"pipeline", "AsyncEngine", "DeploymentNotFoundError"} <= set(dir(mii))


def test_a_client_takes_a_model_path_as_mii_serve_does(tmp_path):
    """mii.client(pathlib.Path(...)) crashed: 'PosixPath' object has no attribute 'rstrip'."""
    import mii
    from mii.errors import DeploymentNotFoundError

    model = tmp_path / "model.gguf"
    with pytest.raises(DeploymentNotFoundError, match="no running deployment named '/"):
        mii.client(model)
    record(
        registry.default_deployment_name(str(model)),
        {"pid": os.getpid(), "host": "127.0.0.1", "port": 1},
    )
    with mii.client(model) as client:
        assert client.deployment_name == "model-mii-deployment"


def test_a_client_whose_deployment_ended_or_moved_is_told_so():
    """Nothing answers at a client's address: its deployment, no longer recorded, is
    gone; recorded at another address, it was started again there (the old client
    got a retryable UnavailableError for ever; review). Neither is retried."""
    import mii
    from mii.rpc.deployment import free_port

    old, new = free_port(), free_port()  # nothing listens on either
    record("moved", {"pid": os.getpid(), "host": "127.0.0.1", "port": old})
    with mii.client("moved") as client:
        registry.record("moved", {"pid": os.getpid(), "host": "127.0.0.1", "port": new})
        with pytest.raises(mii.DeploymentNotFoundError, match=f"started again at 127.0.0.1:{new}"):
            client.generate("x", max_new_tokens=1)
        registry.remove("moved")
        registry.release("moved")
        with pytest.raises(mii.DeploymentNotFoundError, match="not running any more") as err:
            client.generate("x", max_new_tokens=1)
        # no log file (mii serve logs to its terminal): none is named (one that does
        # not exist was), and the CLI's way to start it again is named too
        assert not registry.log_path("moved").exists()
        assert "its log is" not in str(err.value) and "mii serve" in str(err.value)
    # Recorded at the same port under another host name: not "started again" (it
    # listens at 127.0.0.1 only; [::1] is refused: a user trial)
    from mii.rpc.client import MiiClient

    record("v4", {"pid": os.getpid(), "host": "127.0.0.1", "port": old})
    with MiiClient(f"[::1]:{old}", "v4") as client:
        with pytest.raises(mii.DeploymentNotFoundError, match=r"does not listen at \[::1\]") as err:
            client.generate("x", max_new_tokens=1)
        assert f"it listens at 127.0.0.1:{old}" in str(err.value)
        assert "started again" not in str(err.value)
    for target in ("http://127.0.0.1:50050", "grpc://127.0.0.1:50050", "127.0.0.1:70000"):
        with pytest.raises(mii.InvalidRequestError):  # (not UnavailableError: "retry me")
            mii.client(target)
    by_address = mii.client(f"127.0.0.1:{old}")  # no name: it may come back
    with by_address, pytest.raises(mii.UnavailableError, match="nothing answers"):
        by_address.generate("x", max_new_tokens=1)


def test_clients_reconnect_within_a_second(monkeypatch):
    """gRPC's default reconnect back-off grows to two minutes: a client whose
    deployment was down for 30 s took 15 s more to reach it once it was back (0.4 s
    with these options; measured with a health server stopped and restarted on its
    port). The sync and asyncio channels of a client, as the balancer's to replicas,
    back off a second at most."""
    import asyncio

    import mii
    from mii.rpc import auth

    seen = []
    sync_channel, aio_channel = auth.channel, auth.aio_channel
    monkeypatch.setattr(auth, "channel", lambda *a, **k: seen.append(a[2]) or sync_channel(*a, **k))
    monkeypatch.setattr(
        auth, "aio_channel", lambda *a, **k: seen.append(a[2]) or aio_channel(*a, **k)
    )

    async def make_aio_channel(client):
        client._aio.stub(asyncio.get_running_loop())  # this loop's channel

    with mii.client("127.0.0.1:1") as client:
        asyncio.run(make_aio_channel(client))
    assert len(seen) == 2
    for options in seen:
        assert dict(options)["grpc.max_reconnect_backoff_ms"] <= 1000, options
        # gRPC reads this one as a connection attempt's time limit: never shortened
        assert "grpc.min_reconnect_backoff_ms" not in dict(options), options


def test_a_client_finds_a_deployment_by_its_model_whatever_its_name(tmp_path, monkeypatch):
    """Two deployments named explicitly (trialA-n1/-n2) of one checkpoint: a lookup
    by that checkpoint's path said 'no running deployment named ...' though `mii
    list` showed both (user trial). One is found by its model (the path as given,
    with a trailing slash, or another path to it); two name each other. The model
    compared is the one recorded absolute when the deployment started: a relative
    path is never read in the client's own working directory (review)."""
    from mii.errors import AmbiguousDeploymentError

    def started_with(model: str) -> dict:
        return {"pid": os.getpid(), "host": "127.0.0.1", "port": 1, "model": model,
                "tokenizer_source": {"model": os.path.abspath(model) if os.path.exists(model)
                                     else model}}  # fmt: skip

    (tmp_path / "a" / "llama").mkdir(parents=True)
    (tmp_path / "b" / "llama").mkdir(parents=True)
    model = tmp_path / "a" / "llama"
    monkeypatch.chdir(tmp_path / "a")
    record("n1", started_with("llama"))  # started from a/ with a relative path
    monkeypatch.chdir(tmp_path / "b")
    for given in (str(model), str(model) + "/", str(tmp_path / "b" / ".." / "a" / "llama")):
        assert registry.find(given)["deployment_name"] == "n1"
    assert registry.find("llama") is None  # b/llama here: another checkpoint
    assert registry.find(str(tmp_path / "b" / "llama")) is None
    record("n2", started_with(str(model)))
    with pytest.raises(AmbiguousDeploymentError, match=r"2 deployments serve .*'n1', 'n2'"):
        registry.find(str(model))
    # a hub id recorded as given; not a local folder of that name
    record("hub", started_with("org/model-x"))
    assert registry.find("org/model-x")["deployment_name"] == "hub"
    # the default name of b/llama is not taken for a/llama's deployment of that name
    record(registry.default_deployment_name("llama"), started_with(str(tmp_path / "b" / "llama")))
    with pytest.raises(AmbiguousDeploymentError, match="2 deployments serve"):
        registry.find(str(model))  # n1 and n2 still; not llama-mii-deployment
    assert registry.find(str(tmp_path / "b" / "llama"))["deployment_name"] == "llama-mii-deployment"


def test_terminating_an_address_where_nothing_answers_says_so():
    """mii.client("host:port").terminate_server() at an address nothing listens on
    returned None, as if it had stopped a deployment (user trial); a named
    deployment already gone stays a no-op."""
    import socket

    import mii
    from mii.rpc.client import MiiClient

    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        address = f"127.0.0.1:{sock.getsockname()[1]}"
    with (
        mii.client(address) as client,
        pytest.raises(mii.DeploymentNotFoundError, match=f"no deployment answers at {address}"),
    ):
        client.terminate_server(timeout=5)
    with MiiClient(address, "gone-already") as client:
        client.terminate_server(timeout=5)


def test_terminating_a_hung_deployment_after_a_failed_call_says_it_is_unresponsive(monkeypatch):
    """A deployment that accepts connections but never answers (SIGSTOP): once a call of
    the client had failed, terminate_server() read its channel's at-once UNAVAILABLE as
    "already stopping", waited out its timeout for the live processes and raised a bare
    TimeoutError (user trial): DeploymentUnresponsiveError, at once, naming mii terminate."""
    import socket
    import time

    import mii
    from mii.rpc import client as client_module

    # (a short connect timeout: grpc's own is 20 s)
    options = (*client_module.UNLIMITED_MESSAGES, ("grpc.min_reconnect_backoff_ms", 300))
    monkeypatch.setattr(client_module, "UNLIMITED_MESSAGES", options)
    with socket.socket() as silent:  # the kernel accepts; nobody ever answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        record("hung", {"pid": os.getpid(), "host": "127.0.0.1", "port": port})
        with client_module.MiiClient(f"127.0.0.1:{port}", "hung") as client:
            with pytest.raises(mii.UnavailableError):
                client.generate("a", max_new_tokens=1)
            start = time.monotonic()
            with pytest.raises(mii.DeploymentUnresponsiveError, match="mii terminate"):
                client.terminate_server(timeout=30)
            assert time.monotonic() - start < 20  # not the 30 s wait for the processes


def test_terminating_a_deployment_that_answers_but_still_drains_sends_no_signal(capsys):
    """A deployment that answered its Terminate call and outlives --timeout is draining:
    mii terminate says so (wait, a larger --timeout, --force) and signals nothing; a
    SIGTERM would cut its grace period short (review)."""
    import subprocess
    import sys
    from concurrent import futures

    import grpc

    from mii.cli import main
    from mii.rpc import mii_pb2, mii_pb2_grpc

    class Draining(mii_pb2_grpc.MiiServicer):
        def Terminate(self, request, context):
            return mii_pb2.TerminateReply()

    server = grpc.server(futures.ThreadPoolExecutor(2))
    mii_pb2_grpc.add_MiiServicer_to_server(Draining(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    stand_in = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record("draining", {"pid": stand_in.pid, "host": "127.0.0.1", "port": port})
        assert main(["terminate", "draining", "--timeout", "1"]) == 1
        err = capsys.readouterr().err
        assert "may still be finishing the requests in flight" in err, err
        assert stand_in.poll() is None  # no SIGTERM, no SIGKILL
    finally:
        stand_in.kill()
        stand_in.wait()
        server.stop(None)


def test_a_closed_client_says_so():
    """After `with mii.client(...) as c:` a call raised grpc's ValueError
    'Cannot invoke RPC on closed channel!'."""
    import asyncio

    from mii.errors import EngineClosedError
    from mii.rpc.client import MiiClient

    client = MiiClient("127.0.0.1:1", "d")
    client.close()
    for call in (
        lambda: client.generate("a"),
        lambda: list(client.stream("a")),
        client.model_info,
        client.stats,
        client.is_healthy,
        client.terminate_server,
        lambda: asyncio.run(client.agenerate("a")),
    ):
        with pytest.raises(EngineClosedError, match=r"client of d is closed .* mii\.client"):
            call()


def test_a_deployment_is_found_by_its_grpc_address():
    """``mii generate HOST:PORT --chat`` loads the chat template of the deployment
    recorded at that address: loopback names are one host, a deployment bound to
    every interface answers on loopback; another port, another host, or two records
    at one address (one of them stale) find none."""
    record("local", {"pid": os.getpid(), "host": "127.0.0.1", "port": 51151})
    record("everywhere", {"pid": os.getpid(), "host": "0.0.0.0", "port": 51152})
    for address in ("127.0.0.1:51151", "localhost:51151", "[::1]:51151"):
        assert registry.find_by_address(address)["deployment_name"] == "local", address
    assert registry.find_by_address("localhost:51152")["deployment_name"] == "everywhere"
    for address in ("127.0.0.1:51153", "10.1.2.3:51151", "51151", "local", "h:port"):
        assert registry.find_by_address(address) is None, address
    record("twin", {"pid": os.getpid(), "host": "localhost", "port": 51151})
    assert registry.find_by_address("127.0.0.1:51151") is None  # which one: unknown
