"""A real persistent deployment on loopback: 2 replicas behind the load balancer,
driven through every client; cancellation, deadlines, a killed replica,
termination and start-up failures."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys

import grpc
import pytest

import mii
from helpers import PROMPTS, wait_until
from mii.rpc import registry
from mii.rpc.deployment import DeploymentError, free_port

GREEDY = {"do_sample": False, "max_new_tokens": 12}


def port_is_free(port: int) -> bool:
    """Nothing listens there: a server (which sets SO_REUSEADDR) could bind it again."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("mii-cache")
    old = os.environ.get("MII_CACHE_DIR")
    os.environ["MII_CACHE_DIR"] = str(path)
    yield path
    if old is None:
        os.environ.pop("MII_CACHE_DIR")
    else:
        os.environ["MII_CACHE_DIR"] = old


@pytest.fixture(scope="module")
def reference(checkpoints):
    path = str(checkpoints("llama")[0])
    with mii.pipeline(path) as pipe:
        return {p: pipe(p, **GREEDY)[0] for p in PROMPTS}


@pytest.fixture(scope="module")
def deployment(cache_dir, checkpoints):
    path = str(checkpoints("llama")[0])
    port = free_port()
    client = mii.serve(path, deployment_name="test-deploy", replica_num=2, port=port)
    info = registry.lookup("test-deploy")
    yield client, info
    client.terminate_server()
    pids = [info["pid"], *info["replica_pids"]]
    assert not any(registry.pid_alive(p) for p in pids)
    assert port_is_free(port)
    assert registry.lookup("test-deploy") is None


def running(client) -> int:
    stats = client.stats()
    return stats.running + stats.waiting + stats.in_flight


def test_generate_equals_pipeline(deployment, reference):
    client, _ = deployment
    responses = client.generate(PROMPTS, **GREEDY)
    for prompt, response in zip(PROMPTS, responses):
        assert response.generated_text == reference[prompt].generated_text
        assert response.token_ids == reference[prompt].token_ids
        assert response.finish_reason == reference[prompt].finish_reason
    # client(prompts, ...) as DeepSpeed-MII's client is called
    [called] = client(PROMPTS[0], **GREEDY)
    assert called.generated_text == reference[PROMPTS[0]].generated_text


def test_stats_count_prefix_cache_hits_over_the_replicas(deployment):
    """client.stats() carries the prefix cache's queries and hits (in tokens, summed
    over the replicas) as AsyncEngine.stats() and /metrics do (a gRPC-only deployment
    could not see them)."""
    client, _ = deployment
    before = client.stats()
    prompt = "DeepSpeed is a library for training and serving large models. " * 6
    for _ in range(4):  # each replica sees the prompt at least twice
        [answer] = client.generate(prompt, max_new_tokens=2)
    after = client.stats()
    assert after.prefix_cache_queries - before.prefix_cache_queries >= 4 * answer.prompt_length
    assert after.prefix_cache_hits - before.prefix_cache_hits >= answer.prompt_length // 2


def test_streaming_fn_and_stream(deployment, reference):
    client, _ = deployment
    seen = []
    [whole] = client.generate(PROMPTS[1], streaming_fn=seen.append, **GREEDY)
    assert all(len(batch) == 1 for batch in seen) and len(seen) > 1
    assert "".join(b[0].generated_text for b in seen) == reference[PROMPTS[1]].generated_text
    assert whole.generated_text == reference[PROMPTS[1]].generated_text
    pieces = list(client.stream(PROMPTS[2], **GREEDY))
    assert "".join(p.generated_text for p in pieces) == reference[PROMPTS[2]].generated_text
    assert pieces[-1].finish_reason == reference[PROMPTS[2]].finish_reason


def test_async_client(deployment, reference):
    client, _ = deployment

    async def main():
        many = await client.agenerate(PROMPTS[:3], **GREEDY)
        pieces = [p async for p in client.astream(PROMPTS[3], **GREEDY)]
        return many, pieces

    many, pieces = asyncio.run(main())
    assert [r.generated_text for r in many] == [reference[p].generated_text for p in PROMPTS[:3]]
    assert "".join(p.generated_text for p in pieces) == reference[PROMPTS[3]].generated_text


def test_client_from_another_process(deployment, reference):
    code = (
        "import json, mii\n"
        "c = mii.client('test-deploy')\n"
        f"r = c.generate({PROMPTS[0]!r}, do_sample=False, max_new_tokens=12)\n"
        "print(json.dumps(r[0].generated_text))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=os.environ
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.strip().splitlines()[-1]) == reference[PROMPTS[0]].generated_text


def test_client_by_address_and_unknown_name(deployment):
    _client, info = deployment
    with mii.client(f"127.0.0.1:{info['port']}") as by_address:  # closes its channel only
        assert by_address.model_info().replicas == 2
        assert by_address.deployment_name == "test-deploy"  # (None: a trial)
    assert _client.model_info().replicas == 2  # the deployment keeps running
    with pytest.raises(mii.DeploymentNotFoundError, match="no running deployment named 'nope'"):
        mii.client("nope")
    # A deployment that ran here and is gone (its process killed): its log is named.
    gone_log = registry.log_path("gone-deployment")
    gone_log.write_text("MII_STARTUP_ERROR killed\n")
    with pytest.raises(mii.DeploymentNotFoundError, match="ran here") as err:
        mii.client("gone-deployment")
    assert str(gone_log) in str(err.value)
    gone_log.unlink()
    assert issubclass(mii.DeploymentNotFoundError, LookupError)
    assert issubclass(mii.NoReplicaError, mii.UnavailableError)
    # Errors in words, not gRPC's: nothing listening ("UNAVAILABLE: failed to connect
    # to all addresses; ..."), the call's timeout ("Stream removed (Deadline Exceeded)"),
    # several prompts to stream ("a token-id prompt is a non-empty list of integers").
    nobody = mii.client(f"127.0.0.1:{free_port()}")
    with nobody, pytest.raises(mii.UnavailableError, match=r"nothing answers at .*running"):
        nobody.generate(PROMPTS[0], max_new_tokens=1)
    # A MiiError (so that `except mii.MiiError` catches every failed call) and still
    # a TimeoutError.
    with pytest.raises(mii.RequestTimeoutError, match="did not answer within the call's timeout"):
        for _ in _client.stream(PROMPTS[0], timeout=0.001, max_new_tokens=64, ignore_eos=True):
            pass
    assert issubclass(mii.RequestTimeoutError, (mii.MiiError, TimeoutError))
    with pytest.raises(mii.InvalidRequestError, match="stream takes one prompt"):
        next(iter(_client.stream(PROMPTS[:2], max_new_tokens=1)))
    # Ported DeepSpeed-MII code (user trial): a TypeError at the first piece, after the
    # request was sent; a bare AttributeError for the legacy query().
    with pytest.raises(mii.InvalidRequestError, match="streaming_fn is a function") as err:
        _client.generate(PROMPTS[0], streaming_fn=5, max_new_tokens=1)
    assert err.value.field == "streaming_fn"
    with pytest.raises(AttributeError, match=r"generate\(prompts, \.\.\.\) here"):
        _client.query({"query": PROMPTS[:1]})


def test_invalid_options_fail_cleanly(deployment):
    client, _ = deployment
    with pytest.raises(mii.InvalidRequestError, match="top_p"):
        client.generate(PROMPTS[0], top_p=3.0)
    # rejected by the replica's engine: the field survives the trip
    with pytest.raises(mii.InvalidRequestError) as info:
        client.generate("word " * 400)
    assert info.value.field == "prompt"
    assert client.generate(PROMPTS[0], **GREEDY)[0].generated_length > 0


def test_health_and_reflection(deployment):
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    _client, info = deployment
    with grpc.insecure_channel(f"127.0.0.1:{info['port']}") as channel:
        status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
        assert status.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        [reply] = list(stub.ServerReflectionInfo(iter([request])))
        names = {s.name for s in reply.list_services_response.service}
    assert "mii.Mii" in names and "grpc.health.v1.Health" in names


def test_cancelled_stream_aborts_on_the_replica(deployment):
    client, _ = deployment
    stream = client.stream(PROMPTS[1], max_new_tokens=200, ignore_eos=True)
    next(stream)
    assert wait_until(lambda: client.stats().running >= 1)
    stream.close()  # cancels the call
    assert wait_until(lambda: running(client) == 0), client.stats()


@pytest.fixture
def slow_deployment(cache_dir, checkpoints, monkeypatch):
    """A deployment whose every forward pass takes at least 0.1 s (a fault-injection
    switch inherited by its processes), so that 200 new tokens take 20 s or more
    however fast the machine is: longer than the deadline below, and longer than
    wait_until's 15 s, so that only an abort can empty the replica in time."""
    monkeypatch.setenv("MII_PASS_DELAY_S", "0.1")
    client = mii.serve(str(checkpoints("llama")[0]), deployment_name="test-slow", port=free_port())
    yield client, registry.lookup("test-slow")
    client.terminate_server()


def test_deadline_exceeded_aborts_on_the_replica(slow_deployment):
    client, _ = slow_deployment
    with pytest.raises(mii.RequestTimeoutError):
        client.generate(PROMPTS[1], max_new_tokens=200, ignore_eos=True, timeout=0.3)
    assert wait_until(lambda: running(client) == 0), client.stats()

    async def late() -> None:
        await client.agenerate(PROMPTS[1], max_new_tokens=200, ignore_eos=True, timeout=0.3)

    with pytest.raises(mii.RequestTimeoutError):
        asyncio.run(late())
    assert wait_until(lambda: running(client) == 0), client.stats()


def test_a_terminated_deployment_is_not_found_not_unavailable(slow_deployment):
    """A client of a deployment that was terminated got UnavailableError, which retry
    policies retry for ever (user trial): the deployment is gone, and said so."""
    _client, info = slow_deployment
    other = mii.client("test-slow")
    # By address too, it waits for the processes (it returned at once, so that a new
    # deployment on the port failed: a trial); and the client knows the name.
    by_address = mii.client(f"localhost:{info['port']}")
    assert by_address.deployment_name == "test-slow"
    by_address.terminate_server()
    assert not any(registry.pid_alive(p) for p in [info["pid"], *info["replica_pids"]])
    with other, pytest.raises(mii.DeploymentNotFoundError, match="not running any more") as err:
        other.generate(PROMPTS[0], max_new_tokens=1)
    assert not isinstance(err.value, mii.UnavailableError)
    assert str(registry.log_path("test-slow")) in str(err.value)


def test_leaving_a_with_block_over_a_held_stream_aborts_it(slow_deployment):
    """``s = client.stream(...)`` then ``break``: the request went on generating on the
    server while ``s`` lived (user trial); a ``with`` block over the stream ends it,
    and a streaming_fn that raises ends its request too."""
    client, _ = slow_deployment
    with client.stream(PROMPTS[1], max_new_tokens=200, ignore_eos=True) as pieces:
        for index, _piece in enumerate(pieces):
            if index == 1:
                break
    assert wait_until(lambda: running(client) == 0), client.stats()

    def stop_at_first(pieces):
        raise RuntimeError("the caller's callback failed")

    with pytest.raises(RuntimeError, match="callback failed"):
        client.generate(PROMPTS[1], max_new_tokens=200, ignore_eos=True, streaming_fn=stop_at_first)
    assert wait_until(lambda: running(client) == 0), client.stats()


def test_a_stream_closed_from_another_thread_ends(slow_deployment):
    """A UI's cancel button closes the stream its worker thread iterates: close() raised
    "generator already executing" there and the request ran on; now the worker's
    loop ends quietly and the request is aborted."""
    import threading

    client, _ = slow_deployment
    pieces = client.stream(PROMPTS[1], max_new_tokens=200, ignore_eos=True)
    got, failed, first = [], [], threading.Event()

    def worker():
        try:
            for piece in pieces:
                got.append(piece)
                first.set()
        except Exception as err:  # (none expected)
            failed.append(err)

    thread = threading.Thread(target=worker)
    thread.start()
    assert first.wait(60)
    pieces.close()  # the worker is (almost always) waiting in next() now
    thread.join(30)
    assert not thread.is_alive() and not failed, failed
    assert len(got) < 200 and got[-1].finish_reason is None  # ended before its end
    assert wait_until(lambda: running(client) == 0), client.stats()


def test_next_while_another_thread_closes_the_stream_ends_it():
    """close() from another thread runs the stream's cleanup (the call's cancel) on
    that thread; the iterating thread's next() meanwhile raised "generator already
    executing" (review). It ends the iteration."""
    import threading

    from mii.rpc.piece_stream import PieceStream

    gate, in_cleanup = threading.Event(), threading.Event()

    def pieces():
        try:
            yield 1
            yield 2
        finally:
            in_cleanup.set()
            gate.wait(10)

    stream = PieceStream(pieces(), cancel=lambda: None)
    assert next(stream) == 1
    closer = threading.Thread(target=stream.close)
    closer.start()
    assert in_cleanup.wait(10)
    with pytest.raises(StopIteration):
        next(stream)
    gate.set()
    closer.join(10)
    assert not closer.is_alive()


def test_client_timeouts_close_and_event_loops(slow_deployment):
    """A gRPC-client trial's findings: timeout=math.inf (or 1e10) failed every call at
    once as "did not answer within the call's timeout" (grpc's deadline overflowed);
    close() with calls in flight ended a sync one as a retryable UnavailableError and
    left async ones running to their end; each asyncio.run kept a channel for good."""
    import math
    import threading

    client, _ = slow_deployment
    for timeout in (math.inf, 1e10):
        [answer] = client.generate(PROMPTS[0], max_new_tokens=2, ignore_eos=True, timeout=timeout)
        assert answer.generated_length == 2
    for bad in (0, -1, math.nan, "5", True):
        with pytest.raises(mii.InvalidRequestError, match="timeout") as caught:
            client.generate(PROMPTS[0], max_new_tokens=2, timeout=bad)
        assert caught.value.field == "timeout"
        with pytest.raises(mii.InvalidRequestError, match="timeout"):
            client.stream(PROMPTS[0], timeout=bad)  # at the call, not at the first piece

    async def one() -> None:
        await client.agenerate(PROMPTS[0], max_new_tokens=1)

    for _ in range(3):
        asyncio.run(one())
    assert len(client._aio) == 1  # the ended loops' channels went

    client = mii.client("test-slow")  # (the fixture's stays open, to stop the deployment)
    endings: dict[str, BaseException | None] = {}

    def sync_call() -> None:
        try:
            client.generate(PROMPTS[1], max_new_tokens=200, ignore_eos=True)
            endings["sync"] = None
        except BaseException as err:
            endings["sync"] = err

    def async_call() -> None:
        async def main() -> None:
            try:
                async for _ in client.astream(PROMPTS[1], max_new_tokens=200, ignore_eos=True):
                    pass
                endings["async"] = None
            except BaseException as err:
                endings["async"] = err

        asyncio.run(main())

    callers = [threading.Thread(target=sync_call), threading.Thread(target=async_call)]
    for caller in callers:
        caller.start()
    assert wait_until(lambda: client.stats().running >= 2), client.stats()
    client.close()
    for caller in callers:
        caller.join(timeout=60)
    for kind in ("sync", "async"):
        assert isinstance(endings[kind], mii.EngineClosedError), (kind, endings[kind])
    with mii.client("test-slow") as other:  # the requests were aborted on the replica
        assert wait_until(lambda: running(other) == 0), other.stats()


def test_requests_spread_over_replicas(deployment):
    client, _ = deployment

    async def burst():
        return await asyncio.gather(
            *(client.agenerate(p, max_new_tokens=20, ignore_eos=True) for p in PROMPTS * 2)
        )

    results = asyncio.run(burst())
    assert all(r[0].generated_length == 20 for r in results)


def test_replica_ports_refuse_calls_without_the_internal_token(deployment, reference):
    """Even without an api_key, another local process cannot call a replica's port
    (its Terminate would stop that replica): only the deployment's pool has the token."""
    from mii.rpc import mii_pb2, mii_pb2_grpc

    client, info = deployment
    for pid in info["replica_pids"]:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        port = json.loads(argv[argv.index(b"mii.rpc.replica") + 1])["port"]
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = mii_pb2_grpc.MiiStub(channel)
            calls = [
                (stub.Terminate, mii_pb2.TerminateRequest()),
                (stub.Generate, mii_pb2.GenerateRequest(prompts=["x"])),
                (stub.Stats, mii_pb2.StatsRequest()),
            ]
            for call, request in calls:
                with pytest.raises(grpc.RpcError) as caught:
                    call(request, timeout=10)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
    # The refused Terminates stopped nothing: every replica is alive and serving.
    assert all(registry.pid_alive(p) for p in info["replica_pids"])
    for prompt in PROMPTS[:2]:
        [r] = client.generate(prompt, **GREEDY)
        assert r.generated_text == reference[prompt].generated_text


def test_second_deployment_on_a_busy_port_fails(deployment, reference, checkpoints):
    """gRPC's default SO_REUSEPORT would let a second deployment share the port:
    it must fail naming the port, and the first one keep serving alone."""
    client, info = deployment
    port = info["port"]
    with pytest.raises(DeploymentError, match=f":{port} "):
        mii.serve(str(checkpoints("llama")[0]), deployment_name="same-port", port=port)
    assert wait_until(lambda: no_deployment_processes("same-port"))
    assert registry.lookup("same-port") is None
    [r] = client.generate(PROMPTS[0], **GREEDY)  # still the first deployment, still serving
    assert r.generated_text == reference[PROMPTS[0]].generated_text
    assert mii.client(f"127.0.0.1:{port}").model_info().deployment_name == "test-deploy"
    assert registry.lookup("test-deploy")["pid"] == info["pid"]


def test_grpc_servers_refuse_a_busy_port():
    """Balancer and replicas bind through listening_server: never SO_REUSEPORT."""
    from mii.rpc.listen import listening_server

    async def main():
        port = free_port()
        first = listening_server(f"127.0.0.1:{port}")
        await first.start()
        try:
            with pytest.raises(DeploymentError, match=f"127.0.0.1:{port}"):
                listening_server(f"127.0.0.1:{port}")
            # A name is bound on all its addresses or refused: "localhost" would
            # otherwise take [::1] beside the 127.0.0.1 of the server already there.
            for address in (f"localhost:{port}", f"0.0.0.0:{port}"):
                with pytest.raises(DeploymentError, match="is the port in use"):
                    listening_server(address)
        finally:
            await first.stop(None)
        if socket.has_ipv6:  # an IPv6 literal, with or without brackets
            for address in (f"::1:{free_port()}", f"[::1]:{free_port()}"):
                try:
                    server = listening_server(address)
                except DeploymentError as err:
                    assert "::1" in str(err) and "resolve" not in str(err)
                    continue  # no IPv6 loopback on this machine: refused, not misread
                await server.start()
                await server.stop(None)

    asyncio.run(main())


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
        return True
    except OSError:
        return False


@pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback")
def test_the_ipv4_wildcard_listens_on_ipv4_alone():
    """grpc bound "0.0.0.0" as the dual-stack [::]: --host 0.0.0.0 answered gRPC on
    every IPv6 address too (its HTTP port did not), past IPv4 firewalls (a trial)."""
    from mii.rpc.listen import listening_server

    async def main():
        port = free_port()
        server = listening_server(f"0.0.0.0:{port}")
        await server.start()
        try:
            socket.create_connection(("127.0.0.1", port), timeout=10).close()
            with pytest.raises(OSError):  # refused: nothing listens on IPv6
                socket.create_connection(("::1", port), timeout=10).close()
        finally:
            await server.stop(None)

    asyncio.run(main())


@pytest.mark.skipif(not _ipv6_loopback(), reason="this machine has no IPv6 loopback")
def test_a_deployment_on_an_ipv6_host_is_reached_by_name(checkpoints, capsys):
    """host="::1": clients, `mii list` and terminate write the address [::1]:PORT
    (::1:PORT does not resolve: the deployment ran, and nobody could reach it)."""
    from mii.cli.commands import main
    from mii.rpc.deployment_config import DeploymentConfig

    assert DeploymentConfig.parse("m", host="[::1]").host == "::1"  # as URLs write it
    http_port = free_port()
    client = mii.serve(
        str(checkpoints("llama")[0]),
        deployment_name="v6-deploy",
        host="::1",
        port=free_port(),
        enable_restful_api=True,
        restful_api_port=http_port,
    )
    try:
        assert client.address.startswith("[::1]:")
        [r] = mii.client("v6-deploy").generate(PROMPTS[0], do_sample=False, max_new_tokens=2)
        assert r.generated_length == 2
        assert main(["list", "--json"]) == 0
        [listed] = [
            d for d in json.loads(capsys.readouterr().out) if d["deployment_name"] == "v6-deploy"
        ]
        assert listed["health"]["status"] == "ok", listed
        import httpx

        assert httpx.get(f"http://[::1]:{http_port}/health", timeout=30).status_code == 200
    finally:
        assert main(["terminate", "v6-deploy", "--timeout", "60"]) == 0
    assert registry.lookup("v6-deploy") is None
    # A stop hook that runs twice (SRE trial: the second run failed): --ignore-not-found.
    capsys.readouterr()
    assert main(["terminate", "v6-deploy"]) == 1
    assert main(["terminate", "v6-deploy", "--ignore-not-found"]) == 0
    assert "nothing to stop" in capsys.readouterr().out
    free = f"127.0.0.1:{free_port()}"  # an address where nothing answers
    assert main(["terminate", free, "--ignore-not-found"]) == 0


def test_grpc_servers_close_connections_that_never_speak(monkeypatch):
    """A TCP connection that never completes HTTP/2's handshake is closed (grpc's
    default kept it 120 s: enough of them take every descriptor of the process)."""
    from mii.rpc import listen

    defaults = dict(listen.SERVER_OPTIONS)
    assert defaults.get("grpc.server_handshake_timeout_ms", 120_000) <= 30_000
    assert defaults.get("grpc.max_connection_idle_ms", 0) > 0
    # The same option, shortened, to see it act within the test.
    options = defaults | {"grpc.server_handshake_timeout_ms": 500}
    monkeypatch.setattr(listen, "SERVER_OPTIONS", tuple(options.items()))

    async def main():
        port = free_port()
        server = listen.listening_server(f"127.0.0.1:{port}")
        await server.start()
        try:
            silent = socket.create_connection(("127.0.0.1", port))
            preface_only = socket.create_connection(("127.0.0.1", port))
            preface_only.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            for sock in (silent, preface_only):
                sock.settimeout(30)
                # Closed: recv returns b"" after the server's frames (if any).
                assert await asyncio.to_thread(_read_until_closed, sock) is True
                sock.close()
        finally:
            await server.stop(None)

    asyncio.run(main())


def _read_until_closed(sock: socket.socket) -> bool:
    try:
        while sock.recv(4096):
            pass
    except TimeoutError:
        return False
    return True


@pytest.mark.parametrize("field", ["port", "restful_api_port"])
@pytest.mark.parametrize("value", [0, 65536, -1])
def test_ports_out_of_range_are_refused(field, value):
    from mii.rpc.deployment_config import DeploymentConfig

    with pytest.raises(Exception, match=field):
        DeploymentConfig.parse("m", **{field: value})


def test_killed_replica_is_taken_out_of_rotation(deployment, reference):
    """Runs last among the deployment tests: it leaves one replica."""
    client, info = deployment
    os.kill(info["replica_pids"][0], signal.SIGKILL)
    for prompt in PROMPTS * 2:  # every request still succeeds on the survivor
        [r] = client.generate(prompt, **GREEDY)
        assert r.generated_text == reference[prompt].generated_text
    assert client.is_healthy()


# ----- start-up failures ---------------------------------------------------------


def no_deployment_processes(name: str) -> bool:
    out = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout
    return name not in out


def test_bad_model_path_raises_in_caller(cache_dir, tmp_path):
    with pytest.raises(DeploymentError, match="not a directory"):
        mii.serve(str(tmp_path / "missing"), deployment_name="bad-path", port=free_port())
    assert registry.lookup("bad-path") is None
    assert wait_until(lambda: no_deployment_processes("bad-path"))


def test_port_in_use_raises_in_caller(cache_dir, checkpoints):
    path = str(checkpoints("llama")[0])
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(DeploymentError, match="port"):
            mii.serve(path, deployment_name="busy-port", port=port)
    assert wait_until(lambda: no_deployment_processes("busy-port"))


def test_a_busy_ipv6_rest_port_is_named_in_brackets():
    """host "::" on a busy HTTP port said "cannot listen on :::PORT" (SRE trial)."""
    from mii.rpc.http.server import GatewayError, bind_socket

    with socket.socket(socket.AF_INET6) as busy:
        busy.bind(("::1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(GatewayError, match=rf"cannot listen on \[::1\]:{port} for"):
            bind_socket("::1", port)


def test_busy_rest_port_fails_before_the_model_loads(cache_dir, tmp_path):
    """The REST port is checked first: with a model path that does not exist, a
    busy REST port is still the error reported (the replicas never started)."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        rest_port = busy.getsockname()[1]
        with pytest.raises(DeploymentError, match=f"restful_api_port {rest_port} in use"):
            mii.serve(
                str(tmp_path / "missing"),
                deployment_name="busy-rest-port",
                port=free_port(),
                enable_restful_api=True,
                restful_api_port=rest_port,
            )
    assert not registry.log_path("busy-rest-port").with_suffix(".replica0.log").exists()
    assert wait_until(lambda: no_deployment_processes("busy-rest-port"))


def test_crash_while_loading_raises_in_caller(cache_dir, checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    path = tmp_path / "broken"
    shutil.copytree(checkpoints("llama")[0], path)
    weights = load_file(path / "model.safetensors")
    del weights["model.norm.weight"]
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(DeploymentError, match=r"model\.norm\.weight"):
        mii.serve(str(path), deployment_name="broken-weights", port=free_port())
    assert wait_until(lambda: no_deployment_processes("broken-weights"))
    # the replica stopped its gRPC server before its loop closed (its log ended with
    # "Exception ignored in: <function Server.__del__ ...> Event loop is closed")
    log = registry.log_path("broken-weights").with_suffix(".replica0.log").read_text()
    assert "model.norm.weight" in log and "Event loop is closed" not in log


# A caller of mii.serve whose wait never sees the deployment serve (its registry
# lookups find nothing), so that Ctrl-C lands in the wait however fast the start is.
_INTERRUPTED_CALLER = """
import os, signal, sys
import mii
from mii.rpc import launcher

# Ctrl-C raises KeyboardInterrupt, even where the test runs in a background job
# (whose children start with SIGINT ignored)
signal.signal(signal.SIGINT, signal.default_int_handler)

calls = []

def lookup(name, include_starting=False):  # says when the wait has begun
    calls.append(name)
    if len(calls) == 2:  # the first is the options' check, before anything starts
        print("waiting", flush=True)
    return None

launcher.registry.lookup = lookup
mii.serve(sys.argv[1], deployment_name=os.environ["TEST_NAME"], port=int(sys.argv[2]))
"""


def kill_deployment_processes(name: str) -> None:
    """SIGKILL every process whose command line names the deployment (a test's
    failure must not leave one running)."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid,args"], capture_output=True, text=True)
    for line in out.stdout.splitlines()[1:]:
        pid, _, args = line.strip().partition(" ")
        if name in args and "mii.rpc" in args:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


def test_ctrl_c_while_starting_leaves_nothing_running(cache_dir, checkpoints):
    """Ctrl-C (or a notebook's interrupt) while mii.serve waits for the deployment to
    start ends the call with KeyboardInterrupt and takes the deployment down: it
    kept running, with its ports and name, and no client to stop it."""
    name = f"interrupted-{os.getpid()}"
    caller = subprocess.Popen(
        [sys.executable, "-c", _INTERRUPTED_CALLER, str(checkpoints("llama")[0]), str(free_port())],
        env={**os.environ, "TEST_NAME": name},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert caller.stdout.readline().strip() == "waiting"  # "" if the caller died
        caller.send_signal(signal.SIGINT)
        _, err = caller.communicate(timeout=60)
        assert caller.returncode != 0 and "KeyboardInterrupt" in err, err[-2000:]
        assert wait_until(lambda: no_deployment_processes(name), timeout=30)
    finally:
        caller.kill()
        kill_deployment_processes(name)


def test_bad_engine_option_raises_before_starting(cache_dir, checkpoints):
    with pytest.raises(mii.InvalidRequestError, match="kv_block_size"):
        mii.serve(str(checkpoints("llama")[0]), kv_block_size=-1)


def test_stubs_are_up_to_date(tmp_path):
    from pathlib import Path

    from mii.rpc import codegen

    fresh = {p.name: p.read_text() for p in codegen.generate(tmp_path)}
    committed_dir = Path(codegen.__file__).parent
    assert fresh, "protoc produced nothing"
    for name, text in fresh.items():
        assert (committed_dir / name).read_text() == text, (
            f"{name} is stale: run `python -m mii.rpc.codegen`"
        )


def test_terminate_a_deployment_that_does_not_answer(cache_dir, checkpoints, monkeypatch, capsys):
    """mii terminate of a stopped (SIGSTOP) deployment: its Terminate call times out,
    so the command sends its processes SIGTERM and SIGCONT, and the deployment
    drains and exits; --force kills one at once (it failed with "did not answer
    within the call's timeout" and nothing else)."""
    from mii.cli import main
    from mii.rpc import client as client_module

    monkeypatch.setattr(client_module, "TERMINATE_CALL_S", 1.0)
    path = str(checkpoints("llama")[0])
    for name, flags in (("stopped-deploy", ["--timeout", "60"]), ("killed-deploy", ["--force"])):
        mii.serve(path, deployment_name=name, port=free_port())
        info = registry.lookup(name)
        pids = [info["pid"], *info["replica_pids"]]
        os.kill(info["pid"], signal.SIGSTOP)
        try:
            assert main(["terminate", name, *flags]) == 0
            out, err = capsys.readouterr()
            if flags[0] == "--force":
                assert f"killed {name}" in out
            else:
                assert "did not answer its Terminate call" in err and "SIGTERM" in err
                assert f"terminated {name} (with SIGTERM" in out
            assert not any(registry.pid_alive(p) for p in pids)
        finally:
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        assert wait_until(lambda name=name: registry.lookup(name) is None, timeout=10)
    assert main(["terminate", "killed-deploy", "--force"]) == 1  # gone: no record


def test_terminate_signals_only_the_deployments_own_replicas():
    """A replica pid in the record counts only while that process is the deployment's
    child: a replica given up on keeps its old pid there, free for reuse."""
    from mii.cli.stop_processes import deployment_pids

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        info = {"pid": os.getpid(), "replica_pids": [child.pid, 1, 2**22 + 7]}
        assert deployment_pids(info) == [os.getpid(), child.pid]
    finally:
        child.kill()
        child.wait()


def test_a_startup_timeout_names_the_option_and_leaves_nothing_running(cache_dir, checkpoints):
    """Replicas not ready in time: the error says which option gives them longer."""
    path = str(checkpoints("llama")[0])
    with pytest.raises(DeploymentError, match="--startup-timeout") as err:
        mii.serve(path, deployment_name="slow-start", port=free_port(), startup_timeout=0.2)
    assert "startup_timeout=" in str(err.value)
    assert wait_until(lambda: registry.lookup("slow-start") is None, timeout=10)
