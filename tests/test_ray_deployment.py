"""Deployments on a Ray cluster (backend="ray"): a local Ray instance of 2 CPUs and
no GPU, started once for the module; replicas of the tiny llama as Ray Serve
replicas, answering token for token as the pipeline does, spread over, restarted
by Ray, autoscaled, and removed without a trace."""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import ray
from ray import serve

import mii
from helpers import PROMPTS, SseStream, wait_until
from mii.cli import main as mii_main
from mii.rpc import registry
from mii.rpc.deployment import free_port

GREEDY = {"do_sample": False, "max_new_tokens": 12}
SLOW_PASS_S = "0.05"  # MII_PASS_DELAY_S: requests that overlap, whatever the machine


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pid_alive(pid: int) -> bool:
    return registry.pid_alive(pid)


def serve_actors() -> list[str]:
    """Named actors of Ray Serve and of mii on the cluster."""
    return [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] in ("serve", "mii")
    ]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A local Ray instance (2 CPUs, no GPU) shared by the module; its address.

    Ray waits a fixed 30 s for its raylet to register (ray/_private/node.py); on a
    loaded 2-core machine (CI beside another test run) it once missed that, so a
    start that times out is tried again, up to three times in all.

    Serve's controller gives its HTTP proxy 5 s to answer a readiness check (10 s a
    health check) and kills it after three misses: on a starved CPU it missed them
    over and over, and the deployment waiting on it failed with ActorDiedError (9 of
    the module's 10 tests, under load only). Those checks only ask whether the proxy
    lives; the cluster's processes, started here, inherit a minute for each."""
    patience = {
        "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
        "RAY_SERVE_PROXY_HEALTH_CHECK_TIMEOUT_S": "60",
    }
    with pytest.MonkeyPatch.context() as mp:
        for name, value in patience.items():
            mp.setenv(name, value)
        for attempt in range(3):
            try:
                context = ray.init(
                    address="local",  # a new instance, even where a cluster runs here
                    num_cpus=2,
                    num_gpus=0,
                    include_dashboard=False,
                    namespace="mii-tests",
                )
                break
            except Exception as error:
                ray.shutdown()
                if attempt == 2 or "timed out during startup" not in str(error):
                    raise
        yield context.address_info["gcs_address"]
        ray.shutdown()


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("mii-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MII_CACHE_DIR", str(path))
        yield path


@pytest.fixture(scope="module")
def reference(checkpoints):
    with mii.pipeline(str(checkpoints("llama")[0])) as pipe:
        return {p: pipe(p, **GREEDY)[0] for p in PROMPTS}


def start(cluster, model: str, pass_delay: str = "0", **options):
    """``mii.serve`` on the test cluster, REST on, on free ports; (client, name, url).
    ``cluster`` None: no ray_address (backend="ray": the caller's cluster)."""
    name = f"ray-{os.urandom(4).hex()}"
    rest_port = free_port()
    http = {"enable_restful_api": True, "restful_api_port": rest_port}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MII_PASS_DELAY_S", pass_delay)
        client = mii.serve(
            model,
            deployment_name=name,
            **({"ray_address": cluster} if cluster else {"backend": "ray"}),
            ray_num_cpus=0.5,
            **({} if options.get("enable_restful_api") is False else http),
            port=free_port(),
            # a safety net: starting two replicas' worker processes took over 240 s on
            # 2 cores beside 3 busy processes (idle: well under a minute)
            startup_timeout=600,
            **options,
        )
    return client, name, f"http://127.0.0.1:{rest_port}"


@pytest.fixture(scope="module")
def two(cluster, cache_dir, checkpoints):
    client, name, url = start(cluster, str(checkpoints("llama")[0]), SLOW_PASS_S, replica_num=2)
    yield client, name, url
    if registry.lookup(name) is not None:
        client.terminate_server()


def test_two_replicas_answer_as_the_pipeline(two, reference):
    client, name, url = two
    client = mii.client(name)  # found by name, as any deployment
    answers = client.generate(PROMPTS, **GREEDY)
    assert [a.token_ids for a in answers] == [reference[p].token_ids for p in PROMPTS]
    assert [a.generated_text for a in answers] == [reference[p].generated_text for p in PROMPTS]
    streamed = "".join(p.generated_text for p in client.stream(PROMPTS[1], **GREEDY))
    assert streamed == reference[PROMPTS[1]].generated_text
    # The HTTP routes through Ray Serve's ingress: /mii/{name} and the OpenAI API.
    reply = httpx.post(f"{url}/mii/{name}", json={"prompts": PROMPTS[:2], **GREEDY}, timeout=60)
    assert reply.status_code == 200, reply.text
    assert [r["generated_text"] for r in reply.json()] == [
        reference[p].generated_text for p in PROMPTS[:2]
    ]
    import openai

    oai = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
    completion = oai.completions.create(model=name, prompt=PROMPTS[0], max_tokens=12, temperature=0)
    assert completion.choices[0].text == reference[PROMPTS[0]].generated_text
    chunks = oai.completions.create(
        model=name, prompt=PROMPTS[0], max_tokens=12, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in chunks) == reference[PROMPTS[0]].generated_text
    # Bad input: the same 400 naming the field as on a single host, over both protocols.
    bad = httpx.post(f"{url}/v1/completions", json={"model": name, "prompt": "x", "top_p": 7})
    assert bad.status_code == 400 and "top_p" in bad.text
    with pytest.raises(mii.InvalidRequestError) as err:
        client.generate("x", max_new_tokens=-3)
    assert err.value.field == "max_new_tokens"


def _slow_streams(
    client, count: int, stop: threading.Event, errors: list
) -> list[threading.Thread]:
    """``count`` threads, each streaming long answers until ``stop`` is set."""

    def run() -> None:
        try:
            while True:
                for _ in client.stream(PROMPTS[0], max_new_tokens=40, ignore_eos=True):
                    pass
                if stop.is_set():
                    return
        except Exception as err:  # reported by the test
            errors.append(err)

    threads = [threading.Thread(target=run, daemon=True) for _ in range(count)]
    for t in threads:
        t.start()
    return threads


def test_requests_spread_over_both_replicas(two):
    client, _, url = two
    stop, errors = threading.Event(), []
    threads = _slow_streams(client, 8, stop, errors)
    try:
        # Both replicas have requests at once: Ray Serve routed them to both.
        assert wait_until(
            lambda: sum(r.in_flight > 0 for r in client.stats().replicas) == 2, timeout=120
        ), client.stats()
    finally:
        stop.set()
        for t in threads:
            t.join(120)
    assert not errors
    answer = httpx.get(f"{url}/health", headers={"X-Request-Id": "trace-1"}, timeout=30)
    health = answer.json()
    assert health["status"] == "ok" and health["replica_num"] == 2
    # echoed once: Serve's proxy echoes it, and the gateway did too (user trial)
    assert answer.headers.get_list("x-request-id") == ["trace-1"], answer.headers


def test_a_caller_that_leaves_aborts_its_request_on_the_replica(two):
    """A deadline passed, a stream left early: the replica's engine ends the request
    (it would need at least 150 x 0.05 s to finish)."""
    client, _, _ = two
    long = {"max_new_tokens": 150, "ignore_eos": True}

    def idle() -> bool:
        stats = client.stats()
        return len(stats.replicas) == 2 and not any(r.in_flight for r in stats.replicas)

    assert wait_until(idle, timeout=120)
    before = client.stats().generation_tokens
    with pytest.raises(TimeoutError):
        client.generate(PROMPTS[0], timeout=1.0, **long)
    for piece in client.stream(PROMPTS[0], **long):
        assert piece.generated_length >= 1
        break  # leaves the stream after its first piece
    assert wait_until(idle, timeout=120)
    # Neither ran to its end: together they generated fewer tokens than one would have.
    assert client.stats().generation_tokens - before < 150


def test_a_second_http_api_on_the_cluster_is_refused_saying_what_to_do(two, cluster, checkpoints):
    """Serve has one HTTP proxy per cluster and `two`'s API holds its root: a second
    deployment asking for one is refused in words (it was Ray's RayTaskError repr,
    the cause only in the deployment's log), and leaves nothing behind."""
    _, first, _ = two
    before = set(serve_actors())
    with pytest.raises(mii.DeploymentError) as refused:
        start(cluster, str(checkpoints("llama")[0]))
    message = str(refused.value)
    assert first in message and "enable_restful_api=False" in message, message
    assert "\x1b[" not in message and "RayTaskError" not in message
    # (not serve.status() here: this process would keep a handle on a controller that
    # a later test's Serve replaces, and serve.shutdown() there would find "nothing")
    assert wait_until(lambda: set(serve_actors()) == before, timeout=60), serve_actors()


def test_the_refusal_names_a_deployment_whose_name_has_dots():
    from mii.ray_backend.serve_errors import serve_refusal

    said = (
        "\x1b[36mray::ServeController.deploy_applications()\x1b[39m (pid=1)\nray.serve.exceptions."
        'RayServeException: Prefix / is being used by application "Qwen2.5-0.5B-mii-deployment".'
        ' Failed to deploy application "b".'
    )
    assert "'Qwen2.5-0.5B-mii-deployment' at /" in serve_refusal(RuntimeError(said))


def test_a_killed_replica_is_restarted_and_requests_keep_succeeding(two, cluster, reference):
    client, name, _ = two
    before = {r.pid for r in client.stats().replicas}
    assert len(before) == 2
    replicas = [
        a["name"]
        for a in ray.util.list_named_actors(all_namespaces=True)
        if a["namespace"] == "serve" and f"{name}#MiiReplica#" in a["name"]
    ]
    assert len(replicas) == 2
    # Long requests on both replicas; one replica is killed while they run.
    answers, errors = [], []

    def ask() -> None:
        try:
            answers.append(client.generate(PROMPTS[0], max_new_tokens=60, ignore_eos=True)[0])
        except Exception as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=ask) for _ in range(6)]
    for t in threads:
        t.start()
    assert wait_until(
        lambda: sum(r.in_flight > 0 for r in client.stats().replicas) == 2, timeout=120
    )
    ray.kill(ray.get_actor(replicas[0], namespace="serve"), no_restart=True)
    for t in threads:
        t.join(180)
    # The requests the dead replica had not answered were sent to the other one.
    assert not errors and [a.generated_length for a in answers] == [60] * 6
    for prompt in PROMPTS:
        assert client.generate(prompt, **GREEDY)[0].token_ids == reference[prompt].token_ids
    # Ray Serve replaces the replica: two replicas again, one of them new.
    assert wait_until(
        lambda: len(now := {r.pid for r in client.stats().replicas}) == 2 and now != before,
        timeout=180,
    ), client.stats()
    gone = before - {r.pid for r in client.stats().replicas}
    assert len(gone) == 1 and not pid_alive(gone.pop())
    assert client.generate(PROMPTS[2], **GREEDY)[0].token_ids == reference[PROMPTS[2]].token_ids


def test_terminate_drains_http_and_leaves_no_actor_process_or_port(two):
    """Terminate drains the HTTP side too (it runs in the ingress, on the cluster): a
    stream in flight finishes, a new request meanwhile gets 503 and /health says
    draining; then nothing of the deployment is left."""
    client, name, url = two
    record = registry.lookup(name)
    pids = [record["pid"], *(r.pid for r in client.stats().replicas)]
    ports = [int(client.address.rsplit(":", 1)[1]), int(url.rsplit(":", 1)[1])]
    assert serve_actors()
    # >= 7.5 s at 0.05 s per pass (the drain notice takes a second or two to reach the
    # ingress), well within the 30 s grace period even on a slow CPU
    in_flight = SseStream(url, 150)
    assert in_flight.started.wait(120)
    failed: list[BaseException] = []

    def terminate() -> None:
        try:
            client.terminate_server()
        except BaseException as err:  # handed to the test
            failed.append(err)

    terminating = threading.Thread(target=terminate, daemon=True)
    terminating.start()
    with httpx.Client(base_url=url, timeout=30) as http:
        assert wait_until(lambda: http.get("/health").status_code == 503, timeout=30)
        assert in_flight.is_alive(), "the stream ended before the drain began"
        assert http.get("/health").json()["status"] == "draining"
        refused = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert refused.status_code == 503 and "shutting down" in refused.text, refused.text
    in_flight.join(120)
    assert in_flight.error is None, in_flight.error
    *chunks, done = in_flight.events
    assert done == "data: [DONE]" and not any('"error"' in event for event in chunks)
    assert json.loads(chunks[-1].removeprefix("data: "))["choices"][0]["finish_reason"] == "length"
    terminating.join(180)
    assert not terminating.is_alive() and not failed, failed
    assert wait_until(lambda: not serve_actors(), timeout=120), serve_actors()
    assert wait_until(lambda: not any(pid_alive(p) for p in pids), timeout=60)
    assert wait_until(lambda: all(port_is_free(p) for p in ports), timeout=60)
    assert registry.lookup(name) is None


def test_autoscaling_adds_a_replica_under_a_burst_and_removes_it_after(
    cluster, cache_dir, checkpoints
):
    client, name, url = start(
        cluster,
        str(checkpoints("llama")[0]),
        SLOW_PASS_S,
        min_replicas=1,
        max_replicas=2,
        target_ongoing_requests=1,
        upscale_delay_s=0,
        downscale_delay_s=1,
        api_key="ray-test-key",
    )
    try:
        assert len(client.stats().replicas) == 1
        # The API key guards the HTTP API served by Ray Serve's proxy too.
        body = {"model": name, "prompt": "x", "max_tokens": 2}
        assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 401
        headers = {"authorization": "Bearer ray-test-key"}
        reply = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=60)
        assert reply.status_code == 200, reply.text
        stop, errors = threading.Event(), []
        threads = _slow_streams(client, 6, stop, errors)
        try:
            assert wait_until(lambda: len(client.stats().replicas) == 2, timeout=150)
            listing = io.StringIO()
            with contextlib.redirect_stdout(listing):
                assert mii_main(["list"]) == 0
            [row] = [line for line in listing.getvalue().splitlines() if line.startswith(name)]
            assert row.split()[3] == "2", row  # REPLICAS: as scaled (it said replica_num, 1)
        finally:
            stop.set()
            for t in threads:
                t.join(120)
        assert not errors
        # Idle again: back to min_replicas.
        assert wait_until(lambda: len(client.stats().replicas) == 1, timeout=150)
    finally:
        # SIGTERM (a service manager's stop) stops it as terminate_server() does.
        os.kill(registry.lookup(name)["pid"], signal.SIGTERM)
    assert wait_until(lambda: registry.lookup(name) is None, timeout=120)
    assert wait_until(lambda: not serve_actors(), timeout=120), serve_actors()


def test_tensor_parallel_replica_runs_its_ranks_as_ray_actors(cluster, cache_dir, checkpoints):
    """tensor_parallel=2: rank 1 is a Ray actor in the replica's placement group
    (gloo on CPU), answering as the pipeline. Without ray_address, a caller connected
    to Ray deploys on its cluster. When the deployment process dies without
    stopping, its Serve application removes itself."""
    model = str(checkpoints("llama")[0])
    with mii.pipeline(model) as pipe:
        expected = [r.token_ids for r in pipe(PROMPTS[:2], **GREEDY)]
    client, name, _ = start(None, model, tensor_parallel=2)  # on `cluster`: ray.init here
    try:
        assert [a.token_ids for a in client.generate(PROMPTS[:2], **GREEDY)] == expected
        ranks = [n for n in serve_actors() if n.startswith(f"mii:{name}:") and n.endswith(":rank1")]
        assert len(ranks) == 1
        os.kill(registry.lookup(name)["pid"], signal.SIGKILL)
        # The replica, its rank and the ingress go (Serve's own actors stay: shut down below).
        assert wait_until(lambda: not [n for n in serve_actors() if name in n], timeout=120), (
            serve_actors()
        )
    finally:
        if registry.lookup(name) is not None:
            client.terminate_server()
    serve.shutdown()
    assert wait_until(lambda: not serve_actors(), timeout=120), serve_actors()


def test_a_model_that_fails_to_load_raises_in_the_caller_and_leaves_nothing(
    cluster, cache_dir, tmp_path
):
    with pytest.raises(mii.DeploymentError, match="no-such-model"):  # the replica's error
        start(cluster, str(tmp_path / "no-such-model"))
    assert wait_until(lambda: not serve_actors(), timeout=120), serve_actors()


def test_a_serve_started_by_a_deployment_goes_with_the_last_one_to_end(
    cluster, cache_dir, checkpoints
):
    """A gRPC-only deployment started Serve and a second joined it; terminated in that
    order, they left Serve's controller running on the cluster (user trial): the
    last mii application to end stops the Serve a mii deployment started."""
    model = str(checkpoints("llama")[0])
    grpc_only = {"enable_restful_api": False}
    first, _, _ = start(cluster, model, **grpc_only)
    second, _, _ = start(cluster, model, **grpc_only)
    try:
        first.terminate_server()
        assert "SERVE_CONTROLLER_ACTOR" in serve_actors()  # the second still runs on it
        assert second.generate(PROMPTS[0], **GREEDY)[0].generated_text
    finally:
        second.terminate_server()
    assert wait_until(lambda: not serve_actors(), timeout=120), serve_actors()


def test_mii_serve_ray_address_in_the_foreground(cluster, cache_dir, checkpoints, reference):
    """`mii serve MODEL --ray-address ADDR`: the OpenAI API through Ray Serve, found by
    `mii.client`; a burst past --max-queued-requests gets 429s; Ctrl-C drains and
    removes everything."""
    model, name = str(checkpoints("llama")[0]), f"cli-{os.urandom(4).hex()}"
    http_port = free_port()
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "mii", "serve", model, "--ray-address", cluster),
            *("--ray-num-cpus", "0.5", "--deployment-name", name),
            *("--port", str(http_port), "--grpc-port", str(free_port())),
            *("--max-queued-requests", "2", "--stats-log-interval-s", "0.5"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "MII_PASS_DELAY_S": SLOW_PASS_S},
    )
    try:
        assert wait_until(
            lambda: registry.lookup(name) is not None or server.poll() is not None, timeout=600
        )
        assert server.poll() is None, server.communicate()
        assert registry.lookup(name)["pid"] == server.pid
        body = {"model": model, "prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0}
        reply = httpx.post(f"http://127.0.0.1:{http_port}/v1/completions", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"] == reference[PROMPTS[0]].generated_text
        assert mii.client(name).generate(PROMPTS[0], **GREEDY)[0].token_ids == (
            reference[PROMPTS[0]].token_ids
        )
        # Six at once, two admitted: the others refused at once by the engine (Serve
        # queued them itself, without limit, and every one was served late).
        slow = {**body, "max_tokens": 40, "ignore_eos": True}
        url = f"http://127.0.0.1:{http_port}/v1/completions"
        with ThreadPoolExecutor(6) as burst:
            replies = list(burst.map(lambda _: httpx.post(url, json=slow, timeout=120), range(6)))
        statuses = sorted(r.status_code for r in replies)
        assert set(statuses) == {200, 429} and statuses.count(200) >= 2, statuses
        refused = next(r for r in replies if r.status_code == 429)
        assert "max_queued_requests" in refused.text and refused.headers["retry-after"]
        server.send_signal(signal.SIGINT)
        _, err = server.communicate(timeout=120)
        assert server.returncode == 0 and "stopped on a signal" in err, err[-2000:]
        # the load lines of every deployment (a Ray one wrote neither: user trial)
        assert "[mii] KV cache: " in err and "[mii] prompt throughput: " in err, err[-2000:]
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    assert wait_until(lambda: not serve_actors(), timeout=120), serve_actors()
    assert wait_until(lambda: port_is_free(http_port), timeout=60)


def test_a_ray_address_where_nothing_listens_is_named_at_once(cache_dir, checkpoints):
    """ray.init retried such an address for minutes, past startup_timeout, printing only
    its own connection warnings."""
    address = f"127.0.0.1:{free_port()}"
    with pytest.raises(mii.DeploymentError, match=f"cannot reach a Ray cluster at '{address}'"):
        # (a free gRPC port: the default 50050, taken by another deployment on the
        # machine, was refused first)
        mii.serve(
            str(checkpoints("llama")[0]), ray_address=address, port=free_port(), startup_timeout=120
        )


def test_an_unreachable_cluster_found_through_ray_address_is_named_at_once(cache_dir, checkpoints):
    """With $RAY_ADDRESS (or a `ray start` record left by a cluster stopped without
    `ray stop`) naming an address where nothing listens, ray.init waited for ever,
    deaf to signals and past startup_timeout; an explicit address was checked."""
    address = f"127.0.0.1:{free_port()}"
    # (mii serve: this test process may be connected to a cluster, which mii.serve takes)
    command = [sys.executable, "-m", "mii", "serve", str(checkpoints("llama")[0])]
    command += ["--backend", "ray", "--port", str(free_port()), "--grpc-port", str(free_port())]
    ended = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "RAY_ADDRESS": address},
    )
    assert ended.returncode == 1, ended.stderr[-2000:]
    assert f"cannot reach a Ray cluster at '{address}' ($RAY_ADDRESS)" in ended.stderr


def test_a_busy_http_port_is_refused_before_anything_starts(cluster, cache_dir, checkpoints):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(mii.DeploymentError, match=str(port)):
            mii.serve(
                str(checkpoints("llama")[0]),
                ray_address=cluster,
                enable_restful_api=True,
                restful_api_port=port,
                port=free_port(),
            )
    assert wait_until(lambda: not serve_actors(), timeout=120), serve_actors()


def test_a_starting_deployment_is_listed_found_and_terminated(cluster, cache_dir, never_loading):
    """While Serve's replica loads the model (here: never), the deployment is in
    `mii list` as starting, `mii.client(name)` says it is starting, and `mii terminate`
    stops it and leaves nothing on the cluster (it was invisible until ready)."""
    name = f"ray-starting-{os.urandom(4).hex()}"
    server = subprocess.Popen(
        [
            *(sys.executable, "-m", "mii", "serve", str(never_loading)),
            *("--ray-address", cluster, "--ray-num-cpus", "0.5", "--deployment-name", name),
            *("--port", str(free_port()), "--grpc-port", str(free_port())),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        record = lambda: registry.lookup(name, include_starting=True)  # noqa: E731
        assert wait_until(lambda: record() is not None or server.poll() is not None, timeout=120)
        assert server.poll() is None, server.communicate()
        assert record()["starting"] is True and record()["backend"] == "ray"
        listed = subprocess.run(
            [sys.executable, "-m", "mii", "list", "--json"], capture_output=True, text=True
        )
        [mine] = [d for d in json.loads(listed.stdout) if d["deployment_name"] == name]
        assert mine["health"]["status"] == "starting"
        with pytest.raises(mii.DeploymentNotFoundError, match="still starting"):
            mii.client(name)
        assert mii_main(["terminate", name, "--timeout", "120"]) == 0
        _, err = server.communicate(timeout=60)
        assert server.returncode == 0, err[-2000:]
        assert registry.lookup(name, include_starting=True) is None
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()
    assert wait_until(lambda: not serve_actors(), timeout=120), serve_actors()


def test_a_replica_no_node_can_hold_is_named_at_start(cluster, cache_dir, checkpoints):
    """--ray-num-gpus 1 on a cluster without GPUs: said at once (it waited the whole
    startup timeout, silent); a stop then ends the start and leaves nothing."""
    command = [sys.executable, "-m", "mii", "serve", str(checkpoints("llama")[0])]
    command += ["--ray-address", cluster, "--ray-num-gpus", "1"]
    command += ["--port", str(free_port()), "--grpc-port", str(free_port())]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    said: list[str] = []
    reader = threading.Thread(target=lambda: said.extend(server.stderr), daemon=True)
    reader.start()
    try:
        warned = lambda: any("no node of the Ray cluster" in line for line in said)  # noqa: E731
        assert wait_until(lambda: warned() or server.poll() is not None, timeout=300), said
        [line] = [line for line in said if "no node of the Ray cluster" in line]
        assert "each asks 1 CPU, 1 GPU on one node" in line, line
        assert "the largest nodes have 2 CPU, 0 GPU" in line, line
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=180) == 0, "".join(said)[-2000:]
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()
        reader.join(10)
    assert wait_until(lambda: not serve_actors(), timeout=120), serve_actors()
