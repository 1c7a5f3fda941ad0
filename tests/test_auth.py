"""Who may call a deployment (issue 14, items 4 and 5): the API key on every gRPC
method and HTTP route, the internal token of the replicas' ports, secrets kept
off command lines, the Host check and CORS of the HTTP API, and the
tensor-parallel store listening on loopback only.

One deployment serves most tests: an API key, tensor_parallel=2 (so that the
store and the rank workers are there), the REST API and one CORS origin.
"""

from __future__ import annotations

import asyncio
import json
import os
import stat
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import openai
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

import mii
from helpers import descendants
from mii.rpc import auth, mii_pb2, mii_pb2_grpc, registry
from mii.rpc.client import MiiClient
from mii.rpc.deployment import free_port
from mii.rpc.deployment_config import DeploymentConfig
from mii.rpc.http.auth import AccessPolicy, host_name

KEY = "test-key-" + uuid.uuid4().hex
ORIGIN = "https://app.example"
GREEDY = {"do_sample": False, "max_new_tokens": 4}


@dataclass
class Secured:
    client: MiiClient
    name: str
    model: str
    address: str  # the public gRPC port
    url: str  # the REST API
    info: dict


@pytest.fixture(scope="module")
def secured(checkpoints, tmp_path_factory):
    path = str(checkpoints("llama")[0])
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MII_CACHE_DIR", str(tmp_path_factory.mktemp("mii-cache")))
        mp.delenv("MII_API_KEY", raising=False)
        name = f"auth-test-{uuid.uuid4().hex[:8]}"
        port, rest_port = free_port(), free_port()
        client = mii.serve(
            path,
            deployment_name=name,
            api_key=KEY,
            tensor_parallel=2,
            enable_restful_api=True,
            restful_api_port=rest_port,
            port=port,
            allowed_origins=[ORIGIN],
            kv_block_size=4,
            num_kv_blocks=64,
        )
        info = registry.lookup(name)
        pids = [info["pid"], *descendants(info["pid"])]
        try:
            yield Secured(
                client, name, path, f"127.0.0.1:{port}", f"http://127.0.0.1:{rest_port}", info
            )
        finally:
            client.terminate_server()
            deadline = time.monotonic() + 30
            while any(registry.pid_alive(p) for p in pids) and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not any(registry.pid_alive(p) for p in pids), "deployment processes left"


def replica_config(secured: Secured) -> tuple[int, dict]:
    """The replica's pid and its ReplicaConfig (the JSON on its command line)."""
    [pid] = secured.info["replica_pids"]
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    return pid, json.loads(argv[argv.index(b"mii.rpc.replica") + 1])


def environment(pid: int) -> dict[str, str]:
    items = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().partition("=")[::2] for item in items if item)


# ----- every gRPC method ------------------------------------------------------------

SHORT = mii_pb2.GenerateRequest(
    prompts=["hi"], options=mii_pb2.GenerationOptions(max_new_tokens=2, do_sample=False)
)
METHODS = {
    "Generate": lambda stub, md: stub.Generate(SHORT, metadata=md, timeout=30),
    "GenerateStream": lambda stub, md: list(stub.GenerateStream(SHORT, metadata=md, timeout=30)),
    "ModelInfo": lambda stub, md: stub.ModelInfo(mii_pb2.ModelInfoRequest(), metadata=md),
    "Stats": lambda stub, md: stub.Stats(mii_pb2.StatsRequest(), metadata=md),
    "Terminate": lambda stub, md: stub.Terminate(mii_pb2.TerminateRequest(), metadata=md),
}


def call_everything(address: str, metadata) -> dict[str, grpc.StatusCode]:
    """The status of every method of the port (Mii, health, reflection) called with
    ``metadata``: OK or the error code."""
    codes = {}
    with grpc.insecure_channel(address) as channel:
        stub = mii_pb2_grpc.MiiStub(channel)
        calls = dict(METHODS)
        calls["health.Check"] = lambda _, md: health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), metadata=md, timeout=10
        )
        calls["health.Check mii.Mii"] = lambda _, md: health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(service="mii.Mii"), metadata=md, timeout=10
        )
        calls["reflection"] = lambda _, md: list(
            reflection_pb2_grpc.ServerReflectionStub(channel).ServerReflectionInfo(
                iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
                metadata=md,
                timeout=10,
            )
        )
        for method, call in calls.items():
            if method == "Terminate" and metadata == (("authorization", f"Bearer {KEY}"),):
                continue  # the right key alone would stop the deployment
            try:
                call(stub, metadata)
                codes[method] = grpc.StatusCode.OK
            except grpc.RpcError as err:
                codes[method] = err.code()
    return codes


def test_every_grpc_method_refuses_a_missing_or_wrong_key(secured):
    unauthenticated = grpc.StatusCode.UNAUTHENTICATED
    right, wrong = ("authorization", f"Bearer {KEY}"), ("authorization", "Bearer wrong")
    for metadata in [(), (wrong,), (("authorization", KEY),), (right, wrong), (wrong, right)]:
        codes = call_everything(secured.address, metadata)
        assert codes == {
            **dict.fromkeys([*METHODS, "health.Check mii.Mii", "reflection"], unauthenticated),
            "health.Check": grpc.StatusCode.OK,  # the server's status: probes send no key
        }
    # Terminate was refused: the deployment still serves, and the right key passes.
    codes = call_everything(secured.address, (("authorization", f"Bearer {KEY}"),))
    assert set(codes.values()) == {grpc.StatusCode.OK}, codes
    assert secured.client.is_healthy()


def test_the_client_of_mii_serve_sends_the_key_on_every_call(secured):
    client = secured.client
    assert client.generate("DeepSpeed is", **GREEDY)[0].generated_length > 0
    assert list(client.stream("DeepSpeed is", **GREEDY))[-1].finish_reason is not None
    assert client.model_info().deployment_name == secured.name
    assert client.stats().in_flight == 0
    assert client.is_healthy()

    async def main():
        answers = await client.agenerate(["a", "b"], **GREEDY)
        pieces = [p async for p in client.astream("c", **GREEDY)]
        return answers, pieces

    answers, pieces = asyncio.run(main())
    assert len(answers) == 2 and pieces[-1].finish_reason is not None


def test_a_client_without_the_key_gets_authentication_error(secured, monkeypatch):
    monkeypatch.delenv("MII_API_KEY", raising=False)
    for client in (MiiClient(secured.address), mii.client(secured.name, api_key="wrong")):
        with pytest.raises(mii.AuthenticationError, match="API key"):
            client.generate("DeepSpeed is", **GREEDY)
        with pytest.raises(mii.AuthenticationError):
            list(client.stream("DeepSpeed is", **GREEDY))
        with pytest.raises(mii.AuthenticationError):
            client.terminate_server(timeout=1)
        with pytest.raises(mii.AuthenticationError, match="MII_API_KEY") as err:
            client.is_healthy()  # there, and refusing this key: not "unhealthy"
        # a key that was sent and is wrong is not "requires an API key"
        sent = client._api_key is not None
        assert ("refused this API key" in str(err.value)) == sent, err.value
    monkeypatch.setenv("MII_API_KEY", KEY)  # a client made by address takes the variable
    assert MiiClient(secured.address).generate("DeepSpeed is", **GREEDY)


def test_mii_client_in_another_process_reads_the_key_from_the_record(secured):
    files = list(registry.registry_dir().glob("*.json"))
    assert files and all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    assert stat.S_IMODE(registry.registry_dir().stat().st_mode) == 0o700
    assert registry.lookup(secured.name)["api_key"] == KEY
    code = (
        "import mii\n"
        f"c = mii.client({secured.name!r})\n"
        "print(c.generate('DeepSpeed is', do_sample=False, max_new_tokens=4)[0].generated_length)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MII_API_KEY"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env
    )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout.split()[-1]) > 0


def test_the_cli_uses_the_record_and_never_prints_the_key(secured, capsys, monkeypatch):
    from mii.cli.commands import main

    monkeypatch.delenv("MII_API_KEY", raising=False)
    assert main(["generate", secured.name, "DeepSpeed is", "--max-new-tokens", "2"]) == 0
    capsys.readouterr()
    assert main(["list", "--json"]) == 0
    out = capsys.readouterr().out
    assert KEY not in out
    [listed] = [d for d in json.loads(out) if d["deployment_name"] == secured.name]
    assert listed["api_key"] is True
    # By address, without the key: the deployment is there and says so (it was
    # reported as "no mii deployment answers").
    capsys.readouterr()
    assert main(["generate", secured.client.address, "DeepSpeed is"]) == 1
    err = capsys.readouterr().err
    assert "requires an API key" in err and "MII_API_KEY" in err
    # --api-key: by address it is the way in; a wrong one wins over the record and is refused.
    by_address = ["generate", secured.client.address, "DeepSpeed is", "--max-new-tokens", "2"]
    assert main([*by_address, "--api-key", KEY]) == 0
    assert main(["generate", secured.name, "DeepSpeed is", "--api-key", "wrong"]) == 1
    assert "refused this API key" in capsys.readouterr().err
    assert main(["terminate", secured.client.address, "--api-key", "wrong"]) == 1
    assert "refused this API key" in capsys.readouterr().err
    assert secured.client.is_healthy()  # still running


# ----- the replicas' ports -------------------------------------------------------------


def test_a_replica_port_refuses_everyone_but_its_deployment(secured):
    pid, config = replica_config(secured)
    address = f"127.0.0.1:{config['port']}"
    for metadata in [(), (("authorization", f"Bearer {KEY}"),)]:  # the API key is no token
        with grpc.insecure_channel(address) as channel:
            stub = mii_pb2_grpc.MiiStub(channel)
            for method, call in METHODS.items():
                with pytest.raises(grpc.RpcError) as caught:
                    call(stub, metadata)
                assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, method
                assert "internal token" in caught.value.details()
    # The refused Terminate stopped nothing: the replica is alive and serving.
    assert registry.pid_alive(pid)
    assert secured.client.generate("DeepSpeed is", **GREEDY)[0].generated_length > 0
    # The refusal is the token's doing: a proof of the deployment's token for this
    # port and method passes. The token itself (as a Bearer secret) does not: it
    # never travels, so a process that binds a dead replica's port while it restarts
    # learns only proofs for that port (it was a token good on every replica).
    secret, port = environment(pid)["MII_REPLICA_TOKEN"], config["port"]
    info_method, check_method = "/mii.Mii/ModelInfo", "/grpc.health.v1.Health/Check"

    def proof(method: str, for_port: int = port, now: float | None = None):
        return ((auth.PROOF, auth.call_proof(secret, for_port, method, now)),)

    with grpc.insecure_channel(address) as channel:
        stub = mii_pb2_grpc.MiiStub(channel)
        reply = stub.ModelInfo(mii_pb2.ModelInfoRequest(), metadata=proof(info_method))
        health = health_pb2_grpc.HealthStub(channel).Check(
            health_pb2.HealthCheckRequest(), metadata=proof(check_method), timeout=10
        )
        refused = [
            (("authorization", f"Bearer {secret}"),),  # the token itself
            proof(info_method, for_port=port + 1),  # another replica's proof
            proof(check_method),  # another method's
            proof(info_method, now=time.time() - 10 * auth.PROOF_WINDOW_S),  # an old one
        ]
        for metadata in refused:
            with pytest.raises(grpc.RpcError) as caught:
                stub.ModelInfo(mii_pb2.ModelInfoRequest(), metadata=metadata, timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED, metadata
    assert reply.deployment_name == secured.name
    assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_no_secret_is_on_any_command_line(secured):
    deployment = secured.info["pid"]
    processes = {deployment, *descendants(deployment)}
    replica, _ = replica_config(secured)
    [worker] = descendants(replica)  # rank 1
    secrets = {
        "api key": (KEY, deployment),
        "replica token": (environment(replica)["MII_REPLICA_TOKEN"], replica),
        "store secret": (environment(worker)["MII_TP_STORE_SECRET"], worker),
    }
    for what, (secret, holder) in secrets.items():
        assert secret and secret in environment(holder).values(), what
        for pid in processes:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode()
            assert secret not in cmdline, f"the {what} is on the command line of {pid}"
    # The replicas and their ranks never get the clients' key at all.
    assert "MII_API_KEY" not in environment(replica)
    assert "MII_API_KEY" not in environment(worker)


def listening_addresses(port: int) -> set[str]:
    """The local addresses of the TCP sockets listening on ``port`` (/proc/net)."""
    found = set()
    for table, width in (("tcp", 8), ("tcp6", 32)):
        for line in Path(f"/proc/net/{table}").read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, _, hex_port = local.partition(":")
            if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            if width == 8:
                found.add(".".join(str(b) for b in reversed(raw)))
            else:  # four little-endian 32-bit words
                words = [raw[i : i + 4][::-1] for i in range(0, 16, 4)]
                found.add(str(__import__("ipaddress").IPv6Address(b"".join(words))))
    return found


def test_the_tensor_parallel_store_listens_on_loopback_only(secured):
    _, config = replica_config(secured)
    assert config["deployment"]["tp_master_addr"] == "127.0.0.1"
    assert listening_addresses(config["tp_master_port"]) == {"127.0.0.1"}


# ----- the HTTP API ---------------------------------------------------------------------


def test_every_http_route_refuses_a_missing_or_wrong_key(secured):
    routes = [
        ("GET", "/health", None),
        ("GET", "/metrics", None),
        ("GET", "/v1/models", None),
        ("POST", "/v1/completions", {"model": secured.model, "prompt": "a", "max_tokens": 2}),
        (
            "POST",
            "/v1/chat/completions",
            {
                "model": secured.model,
                "messages": [{"role": "user", "content": "a"}],
                "max_tokens": 2,
            },
        ),
        ("POST", f"/mii/{secured.name}", {"prompts": ["a"], "max_new_tokens": 2}),
        ("POST", "/tokenize", {"prompt": "a"}),
        ("POST", "/detokenize", {"tokens": [1]}),
        ("GET", "/nowhere", None),
    ]
    with httpx.Client(base_url=secured.url, timeout=60) as http:
        for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}]:
            for method, path, body in routes:
                r = http.request(method, path, json=body, headers=headers)
                assert r.status_code == 401, (path, headers, r.text)
                assert r.headers["www-authenticate"] == "Bearer"
                error = r.json()["error"]
                assert "API key" in error["message"]
                assert error["code"] == "invalid_api_key"
                assert error["type"] == "invalid_request_error"
        right = {"Authorization": f"Bearer {KEY}"}
        for method, path, body in routes:
            r = http.request(method, path, json=body, headers=right)
            assert r.status_code == (404 if path == "/nowhere" else 200), (path, r.text)
        # Liveness probes cannot hold a secret: /ping answers without it, its status only
        # (its neighbours /ping/x and /pingx do not).
        for method in ("GET", "POST"):
            r = http.request(method, "/ping")
            assert r.status_code == 200 and r.json() == {"status": "ok"}, r.text
        for path in ("/ping/x", "/pingx", "/ping/../health"):
            assert http.get(path).status_code == 401, path


def test_two_authorization_headers_are_refused_whatever_their_order(secured):
    """The first of two decided (SRE trial: right then wrong passed, wrong then
    right failed): a request carrying two keys is refused either way."""
    right, wrong = f"Bearer {KEY}".encode(), b"Bearer wrong"
    with httpx.Client(base_url=secured.url, timeout=60) as http:
        for pair in ([right, wrong], [wrong, right], [right, right]):
            headers = [(b"Authorization", value) for value in pair]
            r = http.get("/v1/models", headers=headers)
            assert r.status_code == 401, (pair, r.text)
        assert http.get("/v1/models", headers=[(b"Authorization", right)]).status_code == 200


def test_the_openai_client_sends_its_api_key(secured):
    base = f"{secured.url}/v1"
    with (
        openai.OpenAI(base_url=base, api_key="wrong", max_retries=0) as wrong,
        pytest.raises(openai.AuthenticationError),
    ):
        wrong.models.list()
    with openai.OpenAI(base_url=base, api_key=KEY, max_retries=0, timeout=60) as right:
        completion = right.completions.create(
            model=secured.model, prompt="DeepSpeed is", max_tokens=3, temperature=0
        )
        assert completion.choices[0].text
        chunks = list(
            right.chat.completions.create(
                model=secured.model,
                messages=[{"role": "user", "content": "hi"}],
                max_tokens=3,
                stream=True,
            )
        )
        assert chunks[-1].choices[0].finish_reason is not None


def test_a_foreign_host_header_is_refused(secured):
    port = secured.url.rsplit(":", 1)[1]
    key = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=secured.url, timeout=30) as http:
        for host in ("evil.example", f"evil.example:{port}", "127.0.0.1.evil.example"):
            r = http.get("/v1/models", headers={**key, "Host": host})
            assert r.status_code == 400, host
            message = r.json()["error"]["message"]
            assert "allowed_hosts" in message and "--allowed-hosts" in message
        for host in (f"localhost:{port}", "localhost", f"127.0.0.1:{port}", f"[::1]:{port}"):
            assert http.get("/v1/models", headers={**key, "Host": host}).status_code == 200


def test_cors_preflight_and_answers_name_the_allowed_origin(secured):
    with httpx.Client(base_url=secured.url, timeout=30) as http:
        preflight = {
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            # as the browser openai SDK asks (its x-stainless-* headers were refused)
            "Access-Control-Request-Headers": "authorization,content-type,x-stainless-os",
        }
        r = http.options("/v1/completions", headers=preflight)  # no key: browsers send none
        assert r.status_code == 200
        assert r.headers["access-control-allow-origin"] == ORIGIN
        allowed = r.headers["access-control-allow-headers"].lower()
        assert "authorization" in allowed and "x-stainless-os" in allowed
        r = http.options("/v1/completions", headers={**preflight, "Origin": "https://evil"})
        assert r.status_code == 400
        assert "access-control-allow-origin" not in r.headers
        # What that page can send without a preflight (a text body, no key): 403, before
        # the key is looked at; with a key it was preflighted (or sent by no browser).
        body = json.dumps({"prompt": "hi", "max_tokens": 1})
        simple = {"Origin": "https://evil", "Content-Type": "text/plain"}
        r = http.post("/v1/completions", content=body, headers=simple)
        assert r.status_code == 403 and "allowed_origins" in r.json()["error"]["message"]
        keyed = {**simple, "Authorization": f"Bearer {KEY}"}
        assert http.post("/v1/completions", content=body, headers=keyed).status_code == 200
        r = http.get("/v1/models", headers={"Origin": ORIGIN, "Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
        # Its script may read a 429's Retry-After and the X-Request-Id it sent.
        exposed = r.headers["access-control-expose-headers"].lower()
        assert "retry-after" in exposed and "x-request-id" in exposed


# ----- options, without a deployment ---------------------------------------------------


def test_the_key_is_an_option_never_serialized(monkeypatch):
    monkeypatch.delenv("MII_API_KEY", raising=False)
    config = DeploymentConfig.parse("m", api_key="s3cret")
    assert config.secret_api_key() == "s3cret"
    assert "s3cret" not in config.model_dump_json() and "s3cret" not in repr(config)
    assert DeploymentConfig.parse("m").secret_api_key() is None
    monkeypatch.setenv("MII_API_KEY", "from-env")
    assert DeploymentConfig.parse("m").secret_api_key() == "from-env"
    # The deployment process rebuilds its configuration from the JSON and the variable.
    again = DeploymentConfig.model_validate_json(config.model_dump_json())
    assert again.secret_api_key() == "from-env"
    for bad in ("", "two words", "caf\u00e9"):
        with pytest.raises(mii.InvalidRequestError, match="api_key must be") as caught:
            DeploymentConfig.parse("m", api_key=bad)
        assert caught.value.field == "api_key"
    # a bad key from the environment is named there, not as a flag never given (a trial)
    monkeypatch.setenv("MII_API_KEY", "two words")
    with pytest.raises(mii.InvalidRequestError, match="environment variable MII_API_KEY") as caught:
        DeploymentConfig.parse("m")
    assert caught.value.field == "MII_API_KEY" and "two words" not in str(caught.value)


def test_cli_takes_the_access_options():
    from mii.cli.commands import build_parser

    args = build_parser().parse_args(
        [
            *("serve", "m", "--api-key", "k"),
            *("--allowed-hosts", "a.example,b.example", "--allowed-origins", "https://x.example"),
        ]
    )
    from mii.cli.options import deployment_options

    config = DeploymentConfig.parse("m", **deployment_options(args))
    assert config.secret_api_key() == "k"
    assert config.allowed_hosts == ["a.example", "b.example"]
    assert config.allowed_origins == ["https://x.example"]


def test_the_store_binds_master_addr_only_and_keys_live_under_the_secret(monkeypatch):
    """In-process: rank 0 of a one-rank group hosts the store; a foreign client of
    the store does not see the group's keys under their plain names."""
    import datetime

    import torch.distributed as dist

    from mii.engine import tp_store

    port = free_port()
    for name, value in [("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port))]:
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    monkeypatch.setenv("MII_TP_STORE_SECRET", "s3cret")
    monkeypatch.setattr(tp_store, "_BASE_STORE", None)  # this process's own, restored after
    monkeypatch.setattr(tp_store, "_GENERATION", 0)
    store = tp_store.fresh_store(0, 1, datetime.timedelta(seconds=10))
    assert listening_addresses(port) == {"127.0.0.1"}
    store.set("error", "rank 1 failed")
    foreign = dist.TCPStore("127.0.0.1", port, is_master=False, wait_for_workers=False)
    assert foreign.check(["mii/s3cret/group1/error"])  # where the group's key lives
    assert not foreign.check(["mii/group1/error"]) and not foreign.check(["error"])


def test_host_names_and_the_default_host_policy():
    assert host_name("LocalHost:8080") == "localhost"
    assert host_name("[::1]:28080") == "::1"
    assert host_name("127.0.0.1") == "127.0.0.1"
    assert host_name("localhost.") == "localhost"

    def policy(**options) -> AccessPolicy:
        return AccessPolicy.of(DeploymentConfig.parse("m", **options))

    loopback = {"localhost", "127.0.0.1", "::1"}
    assert policy().allowed_hosts == loopback
    assert policy(host="::1").allowed_hosts == loopback
    assert policy(host="0.0.0.0").allowed_hosts is None  # no check unless configured
    assert policy(allowed_hosts=["[::1]", "Api.Example"]).allowed_hosts == loopback | {
        "api.example"
    }
    assert policy(host="0.0.0.0", allowed_hosts=["api.example"]).allowed_hosts == loopback | {
        "api.example"
    }
    assert policy(allowed_hosts=["*"]).allowed_hosts is None
    assert policy().api_key is None and policy().allowed_origins == ()
