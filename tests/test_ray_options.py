"""The Ray backend without a Ray cluster: its options, its optional dependency, its wire format."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

import mii
from mii.cli.commands import build_parser
from mii.cli.serve import serve_config
from mii.errors import DeploymentError, InvalidRequestError
from mii.ray_backend.application import check_scaling, replica_options, scaling
from mii.rpc.deployment import free_port
from mii.rpc.deployment_config import DeploymentConfig


def test_mii_imports_without_ray():
    code = "import sys, mii, mii.rpc.launcher, mii.cli; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_backend_ray_without_ray_says_how_to_install_it(monkeypatch, llama):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as if not installed
    with pytest.raises(DeploymentError, match=r"pip install 'mii\[ray\]'"):
        mii.serve(llama, backend="ray")


def test_ray_address_selects_the_ray_backend(llama):
    args = build_parser().parse_args(["serve", llama, "--ray-address", "10.0.0.1:6379"])
    config = serve_config(args)
    assert config.on_ray and config.ray_address == "10.0.0.1:6379"
    assert serve_config(build_parser().parse_args(["serve", llama, "--backend", "ray"])).on_ray
    assert not serve_config(build_parser().parse_args(["serve", llama])).on_ray


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"max_replicas": 2}, "max_replicas"),  # the local backend has a fixed replica_num
        ({"backend": "local", "ray_address": "auto"}, "ray_address"),
        ({"backend": "ray", "min_replicas": 3, "max_replicas": 2}, "min_replicas"),
        ({"backend": "ray", "max_replicas": 0}, "max_replicas"),
    ],
)
def test_bad_ray_options_name_the_field(llama, options, field):
    with pytest.raises((InvalidRequestError, ValueError), match=field):
        DeploymentConfig.parse(llama, **options)


def test_autoscaling_and_placement_follow_the_options(llama):
    fixed = DeploymentConfig.parse(llama, backend="ray", replica_num=3)
    assert scaling(fixed) == {"num_replicas": 3}
    auto = DeploymentConfig.parse(llama, backend="ray", max_replicas=4, upscale_delay_s=5)
    config = scaling(auto)["autoscaling_config"]
    assert (config["min_replicas"], config["initial_replicas"], config["max_replicas"]) == (1, 1, 4)
    assert config["upscale_delay_s"] == 5 and config["look_back_period_s"] == 5
    # tensor_parallel=2 on GPUs: one bundle per rank, packed on one node.
    tp = DeploymentConfig.parse(llama, backend="ray", tensor_parallel=2)
    options = replica_options(tp, num_gpus=1.0)
    assert options["placement_group_bundles"] == [{"CPU": 1.0, "GPU": 1.0}, {"GPU": 1.0}]
    assert options["placement_group_strategy"] == "STRICT_PACK"
    assert options["ray_actor_options"]["num_gpus"] == 1.0


def test_serve_writes_access_lines_only_where_the_local_gateway_would(llama):
    """Two Serve log lines per request, probes and scrapes included, flooded a Ray
    deployment's log (user trial); the local gateway logs requests at uvicorn info."""
    quiet = replica_options(DeploymentConfig.parse(llama, backend="ray"), num_gpus=0)
    assert quiet["logging_config"] == {"enable_access_log": False}
    loud = DeploymentConfig.parse(llama, backend="ray", uvicorn_log_level="info")
    assert replica_options(loud, num_gpus=0)["logging_config"] == {"enable_access_log": True}


def test_autoscaling_config_passes_ray_serve_keys_and_bad_ones_fail_before_starting(llama):
    config = DeploymentConfig.parse(
        llama, backend="ray", autoscaling_config={"metrics_interval_s": 1, "max_replicas": 3}
    )
    autoscaling = scaling(config)["autoscaling_config"]
    assert autoscaling["metrics_interval_s"] == 1 and autoscaling["max_replicas"] == 3
    args = ["serve", llama, "--ray-address", "auto", "--autoscaling-config", "upscaling_factor=2"]
    assert serve_config(build_parser().parse_args(args)).autoscaling_config == {
        "upscaling_factor": 2.0
    }
    # Ray Serve's string-valued keys (they were refused: "Input should be a valid number")
    args = ["serve", llama, "--ray-address", "auto", "--autoscaling-config",
            "aggregation_function=max,look_back_period_s=5"]  # fmt: skip
    given = serve_config(build_parser().parse_args(args)).autoscaling_config
    assert given == {"aggregation_function": "max", "look_back_period_s": 5.0}
    config = DeploymentConfig.parse(
        llama, backend="ray", autoscaling_config={"aggregation_function": "max"}
    )
    assert scaling(config)["autoscaling_config"]["aggregation_function"] == "max"
    again = DeploymentConfig.model_validate_json(config.model_dump_json())  # to the replicas
    assert again.autoscaling_config == {"aggregation_function": "max"}
    with pytest.raises(InvalidRequestError, match="autoscaling_config"):
        mii.serve(llama, backend="ray", autoscaling_config={"aggregation_function": "most"})
    with pytest.raises(InvalidRequestError, match="autoscaling_config") as err:
        mii.serve(llama, backend="ray", autoscaling_config={"no_such_key": 1})
    assert err.value.field == "autoscaling_config"
    # `mii serve` runs the deployment in its own process, past mii.serve's check: a typo
    # there was dropped without a word and the deployment started (user trial)
    from mii.cli.errors import CliError
    from mii.cli.serve import serve

    bad = ["serve", llama, "--ray-address", "auto", "--autoscaling-config", "upscale_delay=5"]
    with pytest.raises(CliError, match=r"upscale_delay \(did you mean 'upscale_delay_s'"):
        serve(build_parser().parse_args(bad))


def test_pieces_and_errors_cross_nodes_as_json():
    """What a replica sends (mii.ray_backend.wire) is plain data: it survives JSON."""
    import json

    from mii.errors import ReplicaError, ServerOverloadedError, UnavailableError
    from mii.ray_backend.wire import error_from_wire, error_to_wire, piece_from_wire, piece_to_wire
    from mii.response import Response, TokenLogprob

    top = [(5, -0.1), (7, -2.5)]
    piece = Response(
        "hi",
        3,
        2,
        "stop",
        token_ids=[5, 6],
        logprobs=[TokenLogprob(5, -0.1, top), TokenLogprob(6, -0.3, [])],
        prompt_logprobs=[None, TokenLogprob(2, -1.0, top), TokenLogprob(3, -2.0, [])],
        prompt_token_ids=[1, 2, 3],
        cached_tokens=1,
    )
    assert piece_from_wire(json.loads(json.dumps(piece_to_wire(piece)))) == piece
    errors = [
        InvalidRequestError("top_p must be <= 1", "top_p"),
        ServerOverloadedError("full", 3.0),
        UnavailableError("rank 1 failed"),
        ReplicaError("boom"),
    ]
    for err in errors:
        back = error_from_wire(json.loads(json.dumps(error_to_wire(err))))
        assert type(back) is type(err) and str(back) == str(err)
    assert error_from_wire(error_to_wire(errors[0])).field == "top_p"
    too_long = InvalidRequestError("the prompt has 9 tokens", "prompt", "context_length_exceeded")
    assert error_from_wire(error_to_wire(too_long)).code == "context_length_exceeded"
    assert error_from_wire(error_to_wire(errors[1])).retry_after == 3.0


def test_replicas_get_the_switches_as_set_and_no_secrets(monkeypatch):
    """MII_* switches reach Ray replicas as the caller set them (an empty directory
    stays empty, not "None"; RANK:N stays RANK:N), never the API key; a bad value
    fails in the caller."""
    from mii.ray_backend.application import forwarded_env

    monkeypatch.setenv("MII_GGUF_CACHE_DIR", "")
    monkeypatch.setenv("MII_TP_FAIL_AT_PASS", "1:2")
    monkeypatch.setenv("MII_GEMV", "torch")
    monkeypatch.setenv("MII_API_KEY", "secret")
    env = forwarded_env()
    assert env["MII_GGUF_CACHE_DIR"] == "" and env["MII_TP_FAIL_AT_PASS"] == "1:2"
    assert env["MII_GEMV"] == "torch" and "MII_API_KEY" not in env
    # The HTTP ingress gets them too: it loads the tokenizer (a GGUF converted again
    # into $HOME without MII_CACHE_DIR, a hub model fetched despite HF_HUB_OFFLINE).
    from mii.ray_backend.application import ingress_options, replica_options
    from mii.rpc.deployment_config import DeploymentConfig

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = DeploymentConfig.parse("m")
    for options in (ingress_options(config), replica_options(config, 0)):
        shipped = options["ray_actor_options"]["runtime_env"]["env_vars"]
        assert shipped["MII_GEMV"] == "torch" and shipped["HF_HUB_OFFLINE"] == "1"
        assert "MII_API_KEY" not in shipped
    monkeypatch.setenv("MII_GEMV", "cuda")
    with pytest.raises(ValueError, match="MII_GEMV must be"):
        forwarded_env()


def test_serve_proxy_gets_the_gateway_keep_alive(monkeypatch):
    """Ray Serve's HTTP proxy is started with the deployment's keep-alive (its own
    default, 90 s, is the idle expiry of Go's net/http clients: the race the option
    avoids), host and port; Ray itself is not started."""
    from ray import serve

    from mii.ray_backend.deployment import start_serve

    started = {}

    def no_serve():
        raise RuntimeError("Serve is not running")

    monkeypatch.setattr(serve, "status", no_serve)
    monkeypatch.setattr(serve, "start", lambda **kwargs: started.update(kwargs))
    config = DeploymentConfig(model="m", backend="ray", http_keep_alive_timeout=42.0)
    assert start_serve(config)
    assert started["http_options"]["keep_alive_timeout_s"] == 42.0
    assert started["http_options"]["port"] == config.restful_api_port
    default = DeploymentConfig(model="m", backend="ray")
    assert start_serve(default)
    assert started["http_options"]["keep_alive_timeout_s"] == default.http_keep_alive_timeout > 90


def test_serve_running_on_another_http_port_is_refused(monkeypatch):
    """Serve left running on the cluster (its first deployment killed) kept its HTTP
    port; a new deployment's --port was ignored with Serve's warning, and mii announced
    and recorded a URL where nothing listened (user trial)."""
    from types import SimpleNamespace

    import ray.serve.context
    from ray import serve

    from mii.errors import DeploymentError
    from mii.ray_backend import deployment
    from mii.ray_backend.deployment import start_serve

    monkeypatch.setattr(deployment, "_head_is_here", lambda: False)  # (no Ray here)
    proxies = {"head": "HEALTHY"}
    monkeypatch.setattr(serve, "status", lambda: SimpleNamespace(applications={}, proxies=proxies))
    monkeypatch.setattr(serve, "start", lambda **kwargs: None)
    client = SimpleNamespace(http_config=SimpleNamespace(host="127.0.0.1", port=29410))
    monkeypatch.setattr(ray.serve.context, "_get_global_client", lambda **kw: client)
    http = {"backend": "ray", "enable_restful_api": True}
    config = DeploymentConfig(model="m", restful_api_port=29414, **http)
    with pytest.raises(DeploymentError) as err:
        start_serve(config)
    assert "on 127.0.0.1:29410, not on 127.0.0.1:29414" in str(err.value)
    assert "--port 29410" in str(err.value)
    other_host = DeploymentConfig(model="m", restful_api_port=29410, host="0.0.0.0", **http)
    with pytest.raises(DeploymentError) as err:
        start_serve(other_host)
    assert "not on 0.0.0.0:29410" in str(err.value)
    # Serve's own host and port: it connects to that Serve (no bind check: its proxy
    # holds the port, so following the refusal's advice worked only off the head node)
    monkeypatch.setattr(deployment, "_head_is_here", lambda: True)
    with socket.socket() as proxy:  # Serve's proxy, listening on its port
        proxy.bind(("127.0.0.1", 0))
        proxy.listen()
        client.http_config.port = proxy.getsockname()[1]
        same = DeploymentConfig(model="m", restful_api_port=client.http_config.port, **http)
        # joined, not started: its end must leave that Serve running (it shut down a
        # Serve the platform had started; user trial)
        assert start_serve(same) is False
    without_http = DeploymentConfig(model="m", backend="ray", enable_restful_api=False)
    assert start_serve(without_http) is False

    # Beside another application (its HTTP API refuses a second one by name at
    # serve.run): joined, not started.
    def serve_status(apps):
        return lambda: SimpleNamespace(applications=apps, proxies=proxies)

    monkeypatch.setattr(serve, "status", serve_status({"g": 1}))
    assert start_serve(same) is False and start_serve(without_http) is False
    # ... refused before serve.run where one holds the root (serve.run's refusal came
    # after ~60 lines of the controller's traceback: user trial), naming it
    apps = {"g": {"route_prefix": None}, "web-app": {"route_prefix": "/"}}
    client.get_serve_details = lambda: {"applications": apps}
    with pytest.raises(DeploymentError, match=r"'web-app' at /.*enable_restful_api=False"):
        start_serve(same)
    assert start_serve(without_http) is False
    apps["web-app"]["route_prefix"] = "/web"
    assert start_serve(same) is False  # the root is free: joined
    # ... and where the proxy is on another port (it announced a port where nothing
    # listened), without advice to shut down the Serve the others run on
    elsewhere = DeploymentConfig(model="m", restful_api_port=client.http_config.port + 1, **http)
    with pytest.raises(DeploymentError, match=r"HTTP proxy on 127.0.0.1") as err:
        start_serve(elsewhere)
    assert "enable_restful_api=False" in str(err.value)
    assert "serve shutdown" not in str(err.value)
    monkeypatch.setattr(serve, "status", serve_status({}))
    proxies.clear()  # a Serve started without the HTTP API (review): no proxy at all
    with pytest.raises(DeploymentError, match="HTTP proxy off") as err:
        start_serve(same)
    assert "serve shutdown" in str(err.value) and "--port" not in str(err.value)
    # ... also beside a gRPC-only deployment's application: it announced a dead port
    monkeypatch.setattr(serve, "status", serve_status({"g": 1}))
    with pytest.raises(DeploymentError, match="HTTP proxy off"):
        start_serve(same)
    monkeypatch.setattr(serve, "status", serve_status({}))
    # no Serve yet (serve.status() then answers an empty status, no error): started
    monkeypatch.setattr(ray.serve.context, "_get_global_client", lambda **kw: None)
    assert start_serve(DeploymentConfig(model="m", restful_api_port=free_port(), **http))


def test_serve_start_outlasts_serves_fixed_proxy_wait(monkeypatch):
    """serve.start waits a fixed 60 s for its HTTP proxy and raises TimeoutError; a
    loaded head took longer (the module's Ray tests on 2 cores beside 3 busy
    processes). The deployment connects to the controller again and waits for the
    proxy within its own startup_timeout; any other TimeoutError still fails."""
    from types import SimpleNamespace

    from ray import serve

    from mii.ray_backend import deployment

    calls, states = [], iter(["STARTING", "STARTING", "HEALTHY"])

    def status():
        if not calls:  # before the first start: Serve is not running
            raise RuntimeError("Serve is not running")
        return SimpleNamespace(applications={}, proxies={"node": next(states)})

    def start(**kwargs):
        calls.append(kwargs)
        if len(calls) == 1:
            raise TimeoutError("HTTP proxies not available after 60s.")

    monkeypatch.setattr(serve, "status", status)
    monkeypatch.setattr(serve, "start", start)
    monkeypatch.setattr(deployment.time, "sleep", lambda s: None)
    config = DeploymentConfig(model="m", backend="ray")
    assert deployment.start_serve(config) and len(calls) == 2
    assert next(states, None) is None  # it waited until the proxy was healthy

    def other_timeout(**kwargs):
        raise TimeoutError("something else")

    monkeypatch.setattr(serve, "start", other_timeout)
    calls.clear()
    with pytest.raises(TimeoutError, match="something else"):
        deployment.start_serve(config)


def test_auto_without_a_cluster_names_mii_s_option_not_ray_s(monkeypatch):
    """ray_address="auto" with no cluster passed on Ray's text, which names its own
    `--address` flag; the error names mii's option and the ways out."""
    import ray

    from mii.ray_backend import connect as connecting
    from mii.rpc.deployment_config import DeploymentConfig

    def no_cluster(**_):
        raise ConnectionError("Could not find any running Ray instance (`--address`)")

    from ray._private import auto_init_hook

    # (connect turns Ray's auto-init off for the deployment's process: restored after)
    monkeypatch.setattr(auto_init_hook, "enable_auto_connect", auto_init_hook.enable_auto_connect)
    monkeypatch.setattr(connecting, "_check_found_cluster", lambda address: None)
    monkeypatch.setattr(ray, "init", no_cluster)
    config = DeploymentConfig.parse("m", backend="ray", ray_address="auto")
    with pytest.raises(mii.DeploymentError, match="--ray-address / ray_address=") as err:
        connecting.connect(config)
    assert "ray start --head" in str(err.value)


@pytest.mark.parametrize(
    ("options", "bounds"),
    [
        ({"replica_num": 3, "max_replicas": 2}, "1..2"),
        ({"replica_num": 2, "min_replicas": 3}, "3.."),
    ],
)
def test_a_replica_num_outside_the_autoscaling_bounds_is_refused(llama, options, bounds):
    """Ray started max_replicas where replica_num asked for more, without a word (the
    banner said 3 replicas, 2 ran: a user trial)."""
    with pytest.raises(InvalidRequestError, match=rf"replica_num \(\d\).*\({bounds}") as err:
        DeploymentConfig.parse(llama, backend="ray", **options)
    assert err.value.field == "replica_num"
    within = DeploymentConfig.parse(llama, backend="ray", replica_num=2, max_replicas=4)
    assert scaling(within)["autoscaling_config"]["initial_replicas"] == 2


def test_an_explicit_replica_num_below_min_replicas_is_refused_and_a_left_out_one_starts_there(
    llama,
):
    """`--min-replicas 2 --max-replicas 3 --replica-num 1` became 2 replicas without a
    word (1 was read as unset) while `--replica-num 4` was refused (user trial)."""
    with pytest.raises(InvalidRequestError, match=r"replica_num \(1\).*\(2\.\.3\)") as err:
        DeploymentConfig.parse(llama, backend="ray", replica_num=1, min_replicas=2, max_replicas=3)
    assert err.value.field == "replica_num"
    left_out = DeploymentConfig.parse(llama, backend="ray", min_replicas=2, max_replicas=3)
    assert left_out.replica_num == 2  # what the banner and `mii list` say
    assert DeploymentConfig.model_validate_json(left_out.model_dump_json()) == left_out
    assert scaling(left_out)["autoscaling_config"]["initial_replicas"] == 2
    # ... min_replicas through autoscaling_config too (Ray refused "min_replicas (2) must
    # be less than or equal to initial_replicas (1)!", replica_num never given: a review)
    for extra in ({"min_replicas": 2, "max_replicas": 4}, {"min_replicas": 2.0}):
        keys = DeploymentConfig.parse(llama, backend="ray", autoscaling_config=extra)
        check_scaling(keys)
        assert keys.replica_num == 2
        assert scaling(keys)["autoscaling_config"]["initial_replicas"] == 2
    with pytest.raises(InvalidRequestError, match=r"\(2\.\.no limit\)"):
        DeploymentConfig.parse(
            llama, backend="ray", replica_num=1, autoscaling_config={"min_replicas": 2}
        )


@pytest.mark.parametrize(
    ("options", "field"),
    [
        ({"min_replicas": 0}, "min_replicas"),
        ({"autoscaling_config": {"min_replicas": 0}}, "autoscaling_config"),
        ({"autoscaling_config": {"min_replicas": "0"}}, "autoscaling_config"),
    ],
)
def test_scale_to_zero_is_refused_saying_why(llama, options, field):
    """`--min-replicas 0` said only pydantic's "greater than or equal to 1"; through
    autoscaling_config it reached Ray, which stopped the last replica."""
    with pytest.raises(InvalidRequestError, match=r"at least 1.*no scale to zero") as err:
        check_scaling(DeploymentConfig.parse(llama, backend="ray", **options))
    assert err.value.field == field


def test_an_address_ray_cannot_read_names_mii_s_option(monkeypatch):
    """`--ray-address nonsense` said only Ray's "Invalid address format: nonsense"."""
    from ray._private import auto_init_hook

    from mii.ray_backend import connect as connecting
    from mii.rpc.deployment_config import DeploymentConfig

    monkeypatch.setattr(auto_init_hook, "enable_auto_connect", auto_init_hook.enable_auto_connect)
    config = DeploymentConfig.parse("m", backend="ray", ray_address="nonsense")
    with pytest.raises(
        mii.DeploymentError, match=r"ray_address='nonsense' \(--ray-address\)"
    ) as err:
        connecting.connect(config)
    assert "Invalid address format" in str(err.value) and "ray start --head" in str(err.value)
