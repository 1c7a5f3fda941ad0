"""DeploymentConfig: the one validated description of a deployment."""

from __future__ import annotations

import pytest

from mii.errors import InvalidRequestError
from mii.rpc.deployment_config import DeploymentConfig, ReplicaConfig


def test_defaults_match_mii_serve():
    config = DeploymentConfig.parse("some/model")
    assert config.deployment_name == "model-mii-deployment"  # URL-safe (no "/")
    assert (config.host, config.port) == ("127.0.0.1", 50050)
    assert (config.tensor_parallel, config.replica_num) == (1, 1)
    assert (config.enable_restful_api, config.restful_api_port) == (False, 28080)


def test_an_empty_name_takes_the_default():
    assert DeploymentConfig.parse("m", deployment_name="").deployment_name == "m-mii-deployment"


def test_other_options_are_engine_options():
    config = DeploymentConfig.parse("m", port=50051, max_length=64, kv_block_size=8)
    assert config.port == 50051
    assert config.engine_options == {"max_length": 64, "kv_block_size": 8}
    assert config.engine_config().kv_block_size == 8


def test_a_bad_engine_option_is_named():
    with pytest.raises(InvalidRequestError, match="kv_block_sise"):
        DeploymentConfig.parse("m", kv_block_sise=8)


def test_a_replica_config_survives_json():
    deployment = DeploymentConfig.parse("m", replica_num=2, token_budget=256)
    replica = ReplicaConfig(deployment=deployment, port=1234, gpus=[2, 3])
    again = ReplicaConfig.model_validate_json(replica.model_dump_json())
    assert again == replica
    assert again.deployment.engine_options == {"token_budget": 256}
    assert again.address.endswith(":1234")


def test_one_port_for_both_apis_is_refused_before_anything_starts():
    """gRPC and the HTTP API on the same port: refused naming both (it failed later,
    saying the HTTP port was in use, taken by the deployment's own gRPC server)."""
    with pytest.raises(ValueError, match="restful_api_port and port are both 18571"):
        DeploymentConfig.parse("m", port=18571, enable_restful_api=True, restful_api_port=18571)
    DeploymentConfig.parse("m", port=18571, restful_api_port=18571)  # no HTTP API: fine


@pytest.mark.parametrize(
    "options, field",
    [
        ({"replica_num": 0}, "replica_num"),
        ({"tensor_parallel": 0}, "tensor_parallel"),
        ({"device_map": [0, 0]}, "device_map"),
        ({"device_map": [0], "replica_num": 2}, "device_map"),
        (
            {"port": 18571, "enable_restful_api": True, "restful_api_port": 18571},
            "restful_api_port",
        ),
        ({"tool_call_parser": "nope"}, "tool_call_parser"),
        # a count or a duration is never a boolean (replica_num=True was one replica)
        ({"replica_num": True}, "replica_num"),
        ({"startup_timeout": False}, "startup_timeout"),
        ({"backend": "ray", "ray_num_cpus": True}, "ray_num_cpus"),
    ],
)
def test_every_bad_deployment_option_is_an_invalid_request_naming_it(options, field):
    """replica_num=0 raised a plain ValueError while every other bad option raised
    InvalidRequestError naming its field (user trial): one kind for all."""
    with pytest.raises(InvalidRequestError) as caught:
        DeploymentConfig.parse("m", **options)
    assert caught.value.field == field


def test_a_restarted_replica_gets_fresh_ports(tmp_path, monkeypatch):
    """A restart's process listens on a new gRPC port, and with tensor_parallel > 1
    its ranks meet on a new rendezvous port (a process may have taken the old ones
    while the replica was down); same GPUs, same log."""
    import subprocess

    from mii.rpc import deployment

    started = []
    monkeypatch.setattr(subprocess, "Popen", lambda *a, **k: started.append(a[0]))
    monkeypatch.setattr(deployment, "_gpu_count", lambda: 4)
    config = DeploymentConfig.parse("m", tensor_parallel=2, device_map=[2, 3])
    [replica] = deployment._replica_configs(config)
    first = deployment.ReplicaProcess(0, replica, tmp_path / "r.log", "token")
    again = first.restarted()
    assert again.config.port != replica.port and again.config.tp_master_port not in (
        None,
        replica.tp_master_port,
    )
    assert again.config.gpus == replica.gpus == [2, 3] and again.log_file == first.log_file
    assert ReplicaConfig.model_validate_json(started[-1][-1]) == again.config
    # same replica number, one more start: its sampling stream (replica.py) is a new one
    assert (again.config.index, again.config.start) == (replica.index, replica.start + 1)
    assert again.restarted().config.start == 2


def test_a_starters_startup_error_names_its_type_once(tmp_path):
    """A deployment's own DeploymentError reached mii.serve as "DeploymentError:
    DeploymentError: cannot listen on ..."; other error types keep their name."""
    from mii.rpc.startup_errors import read_startup_error

    log = tmp_path / "deployment.log"
    log.write_text("loading\nMII_STARTUP_ERROR DeploymentError: cannot listen on 127.0.0.1:1\n")
    assert read_startup_error(log, "deployment", 1) == "cannot listen on 127.0.0.1:1"
    log.write_text("MII_STARTUP_ERROR ModelLoadError: model path /x does not exist\n")
    assert read_startup_error(log, "deployment", 1) == (
        "ModelLoadError: model path /x does not exist"
    )


def test_a_starter_killed_by_a_signal_is_said_so(tmp_path):
    """A process killed while it started said "exited with code -9:" and a blank line."""
    from mii.rpc.startup_errors import read_startup_error

    log = tmp_path / "replica0.log"
    log.write_text("")
    assert read_startup_error(log, "replica 0", -9) == "replica 0 was killed by SIGKILL"
    log.write_text("loading the model\n")
    assert read_startup_error(log, "replica 0", -11) == (
        "replica 0 was killed by SIGSEGV:\nloading the model"
    )
    exited = read_startup_error(log, "replica 0", 3)
    assert exited == "replica 0 exited with code 3:\nloading the model"


def test_a_server_reports_mii_errors_in_words_and_others_with_their_type(capsys):
    """The HTTP port in use read "GatewayError: cannot listen on ..." in mii serve's
    error: mii's own errors are worded for the user, their class adds nothing."""
    from mii.rpc.http.server import GatewayError
    from mii.rpc.startup_errors import STARTUP_ERROR, run_reporting_errors

    async def fails(err: Exception) -> None:
        raise err

    assert run_reporting_errors(fails(GatewayError("cannot listen on 127.0.0.1:1"))) == 1
    assert capsys.readouterr().err == f"{STARTUP_ERROR} cannot listen on 127.0.0.1:1\n"
    assert run_reporting_errors(fails(RuntimeError("CUDA error"))) == 1
    assert capsys.readouterr().err == f"{STARTUP_ERROR} RuntimeError: CUDA error\n"


def test_a_recorded_tokenizer_is_the_gateways(llama, tmp_path, monkeypatch):
    """mii generate NAME --chat loads the deployment's tokenizer from its record: the
    same template text as its gateway (a template file's backslashes and quotes kept
    as they are), from another working directory (a relative model path), and while
    the deployment itself runs under its default name (it was refused as "already
    running")."""
    import os

    from mii.demo import chat_prompt_ids
    from mii.rpc import registry
    from mii.rpc.deployment_config import DeploymentConfig
    from mii.rpc.deployment_tokenizer import load_recorded_tokenizer, tokenizer_source
    from mii.rpc.http.server import load_gateway_tokenizer

    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }} it's\\n{% endfor %}")
    monkeypatch.chdir(os.path.dirname(llama))
    config = DeploymentConfig.parse(os.path.basename(llama), chat_template=str(template))
    source = tokenizer_source(config.model, config.engine_options, config.chat_template)
    gateway = load_gateway_tokenizer(config)
    monkeypatch.chdir(tmp_path)
    registry.record(config.deployment_name, {"pid": os.getpid(), "host": "h", "port": 1})
    try:
        recorded = load_recorded_tokenizer(source)
    finally:
        registry.remove(config.deployment_name)
    assert recorded.chat_template == gateway.chat_template == template.read_text()
    assert chat_prompt_ids(recorded, "Hi") == chat_prompt_ids(gateway, "Hi")


def test_a_mistyped_deployment_option_gets_the_option_meant():
    """mii.serve(model, replica_nun=2) said only "unknown engine option 'replica_nun'":
    deployment options are among the names compared too."""
    from mii.errors import InvalidRequestError
    from mii.rpc.deployment_config import DeploymentConfig

    for name, meant in (("replica_nun", "replica_num"), ("max_num_seqz", "max_num_seqs")):
        with pytest.raises(InvalidRequestError) as err:
            DeploymentConfig.parse("m", **{name: 1})
        assert err.value.field == name and f"did you mean {meant!r}?" in str(err.value)
    # a generation option given to mii.serve: it goes with each request
    with pytest.raises(InvalidRequestError) as err:
        DeploymentConfig.parse("m", temperature=0.5)
    assert "client.generate(prompts, temperature=...)" in str(err.value)


def test_deepspeed_mii_forms_of_dtype_and_device_map():
    """DeepSpeed-MII code passes dtype="fp16" / "bf16" and device_map="auto" or
    {"localhost": [[0], [1]]}: they were refused (user trial)."""
    import socket

    from mii.errors import InvalidRequestError

    for given, name in (("fp16", "float16"), ("bf16", "bfloat16"), ("fp32", "float32")):
        assert DeploymentConfig.parse("m", dtype=given).engine_config().dtype == name
    assert DeploymentConfig.parse("m", device_map="auto").device_map is None
    config = DeploymentConfig.parse("m", replica_num=2, device_map={"localhost": [[1], [0]]})
    assert config.device_map == [1, 0]
    host = socket.gethostname()
    two_ranks = DeploymentConfig.parse("m", tensor_parallel=2, device_map={host: [[2, 3]]})
    assert two_ranks.device_map == [2, 3]
    with pytest.raises(InvalidRequestError, match="this machine only") as info:
        DeploymentConfig.parse("m", device_map={"other-host": [[0]]})
    assert info.value.field == "device_map"
    with pytest.raises(InvalidRequestError, match="lists 1 GPUs"):
        DeploymentConfig.parse("m", replica_num=2, device_map={"localhost": [[0]]})


def test_a_rest_port_without_the_rest_api_is_warned_of():
    """mii.serve(restful_api_port=N) without enable_restful_api=True starts no HTTP
    server: said, not silently ignored (DeepSpeed-MII's habit; a user trial)."""
    import warnings

    from mii.rpc.launcher import warn_unused_options

    with pytest.warns(UserWarning, match="enable_restful_api=True"):
        warn_unused_options(DeploymentConfig.parse("m", restful_api_port=28081))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_unused_options(DeploymentConfig.parse("m"))
        both = DeploymentConfig.parse("m", enable_restful_api=True, restful_api_port=5)
        warn_unused_options(both)
