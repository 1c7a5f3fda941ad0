"""The REST gateway on a real deployment over loopback: mii's route, the
OpenAI-compatible routes (httpx and the official ``openai`` client), health,
metrics, errors, and aborting the requests of clients that leave."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import uuid
from dataclasses import dataclass

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import mii
from helpers import make_tokenizer
from mii.errors import InvalidRequestError
from mii.rpc import mii_pb2, registry
from mii.rpc.deployment import free_port
from mii.rpc.deployment_config import DeploymentConfig
from mii.rpc.http.chat import chat_prompt_ids
from mii.rpc.http.choices import choice_seed
from mii.rpc.http.server import GatewayError, start_gateway
from mii.rpc.pool import Metrics, NoReplicaError

PROMPTS = ["DeepSpeed is", "Seattle is a city on the west coast"]
NEW = 12
MAX_POSITIONS = 4096  # an unaborted request for all of it runs for many seconds
METRIC_NAMES = [
    "mii_requests_running",
    "mii_requests_waiting",
    "mii_kv_cache_usage",
    "mii_preemptions_total",
    "mii_requests_total",
    "mii_time_to_first_token_seconds",
    "mii_time_per_output_token_seconds",
]


@dataclass
class Served:
    client: mii.rpc.client.MiiClient
    name: str
    model: str
    url: str
    oai: openai.OpenAI
    http: httpx.Client


@pytest.fixture(scope="module")
def model_path(checkpoints):
    return str(checkpoints("llama", max_position_embeddings=MAX_POSITIONS)[0])


@pytest.fixture(scope="module")
def served(model_path, tmp_path_factory):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MII_CACHE_DIR", str(tmp_path_factory.mktemp("mii-cache")))
        # A "/" in the name, as the default org/model-mii-deployment has: /mii/{name} serves it.
        name = f"org/gateway-test-{uuid.uuid4().hex[:8]}"
        rest_port = free_port()
        client = mii.serve(
            model_path,
            deployment_name=name,
            replica_num=1,
            enable_restful_api=True,
            restful_api_port=rest_port,
            port=free_port(),
            max_num_seqs=8,
        )
        info = registry.lookup(name)
        pids = [info["pid"], *info["replica_pids"]]
        url = f"http://127.0.0.1:{rest_port}"
        oai = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        http = httpx.Client(base_url=url, timeout=60)
        try:
            assert info["restful_api_port"] == rest_port
            yield Served(client, name, model_path, url, oai, http)
        finally:
            http.close()
            oai.close()
            client.terminate_server()
            assert not any(registry.pid_alive(p) for p in pids), "deployment processes left"


@pytest.fixture(scope="module")
def pipe(model_path):
    with mii.pipeline(model_path, max_num_seqs=8) as p:
        yield p


def greedy(pipe, prompt: str, **options):
    return pipe([prompt], do_sample=False, **options)[0]


def metric_samples(served: Served) -> dict[tuple[str, tuple], float]:
    response = served.http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, response.text


def finished(served: Served, reason: str) -> float:
    samples, _ = metric_samples(served)
    return samples.get(("mii_requests_total", (("finish_reason", reason),)), 0.0)


def wait_running(served: Served, want: int, timeout: float = 3.0) -> None:
    """Wait until the engine runs ``want`` requests (stats refresh every 0.5 s)."""
    deadline = time.monotonic() + timeout
    while True:
        samples, _ = metric_samples(served)
        running = served.client.stats().running
        if running == want and samples[("mii_requests_running", ())] == want:
            return
        assert time.monotonic() < deadline, f"the engine runs {running} requests, not {want}"
        time.sleep(0.1)


def assert_openai_error(response: httpx.Response, status: int, param: str | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert error["message"]
    assert "code" in error
    return error


# ----- mii's own route ----------------------------------------------------------------


def test_mii_route_matches_pipeline(served, pipe):
    response = served.http.post(
        f"/mii/{served.name}", json={"prompts": PROMPTS, "do_sample": False, "max_new_tokens": NEW}
    )
    assert response.status_code == 200, response.text
    expected = pipe(PROMPTS, do_sample=False, max_new_tokens=NEW)
    got = response.json()
    assert [g["generated_text"] for g in got] == [e.generated_text for e in expected]
    assert [g["token_ids"] for g in got] == [e.token_ids for e in expected]
    assert [g["prompt_length"] for g in got] == [e.prompt_length for e in expected]
    assert [g["generated_length"] for g in got] == [e.generated_length for e in expected]
    assert [g["finish_reason"] for g in got] == [e.finish_reason for e in expected]

    # One prompt as a string; max_length (prompt + answer) passes through.
    cap = expected[0].prompt_length + 3
    response = served.http.post(
        f"/mii/{served.name}",
        json={"prompts": PROMPTS[0], "do_sample": False, "max_length": cap, "ignore_eos": True},
    )
    [only] = response.json()
    assert only["generated_length"] == 3 and only["finish_reason"] == "length"
    assert only["token_ids"] == expected[0].token_ids[:3]


def test_mii_route_errors(served):
    url = f"/mii/{served.name}"
    cases = [
        (f"/mii/not-{served.name}", {"prompts": "x"}, 404, "deployment_name"),
        (url, {"prompts": "x", "top_p": 1.5}, 400, "top_p"),
        (url, {"prompts": "x", "temprature": 0.5}, 400, "temprature"),
        (url, {"prompts": "x", "max_new_tokens": -1}, 400, "max_new_tokens"),
        (url, {"max_new_tokens": 4}, 400, "prompts"),
        (url, {"prompts": [1, -2]}, 400, "prompts"),  # [1, 2] is a token-id prompt
        (url, {"prompts": ["x", [1, 2]]}, 400, "prompts"),  # one kind per request
        # refused by the engine, behind the pool: named as this route names it (the
        # engine's "prompt" is no field of this route's body: a fuzzer)
        (url, {"prompts": "DeepSpeed is " * 3000}, 400, "prompts"),
    ]
    for path, body, status, field in cases:
        response = served.http.post(path, json=body)
        assert response.status_code == status, (body, response.text)
        assert response.json()["error"]["field"] == field, response.text
        assert response.json()["error"]["param"] == field, response.text
        assert response.json()["error"]["message"]
    response = served.http.post(url, content=b'{"prompts": ', headers={"content-type": "json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    # "stream": the HTTP way to a stream, not the Python API's methods (user trial)
    response = served.http.post(url, json={"prompts": "x", "stream": True})
    assert response.status_code == 400 and response.json()["error"]["field"] == "stream"
    assert "/v1/completions" in response.json()["error"]["message"]
    response = served.http.post(url, json={"prompts": "x", "stream": False, "max_new_tokens": 1})
    assert response.status_code == 200, response.text  # what the route does anyway
    # the body's key that was meant, named (user trial: only "missing 'prompts'")
    for sent in ("prompt", "query"):  # OpenAI's name; DeepSpeed-MII's legacy one
        response = served.http.post(url, json={sent: "x"})
        assert response.status_code == 400 and response.json()["error"]["field"] == "prompts"
        message = response.json()["error"]["message"]
        assert f"(it has '{sent}': the field is 'prompts')" in message, message
    message = served.http.post(url, json={"max_new_tokens": 4}).json()["error"]["message"]
    assert message == "missing required field 'prompts'"


def test_mii_route_types_json_options_and_refuses_invalid_unicode(served, pipe):
    # JSON values of another type that validation accepts ("4", 4.0, "false") reach the
    # engine as the declared types: the answer equals the typed request's.
    url = f"/mii/{served.name}"
    body = {"prompts": PROMPTS[0], "max_new_tokens": "4", "do_sample": "false"}
    response = served.http.post(url, json=body)
    assert response.status_code == 200, response.text
    expected = greedy(pipe, PROMPTS[0], max_new_tokens=4)
    assert response.json()[0]["token_ids"] == expected.token_ids
    response = served.http.post(url, json={**body, "max_new_tokens": 4.0})
    assert response.status_code == 200 and response.json()[0]["generated_length"] == 4
    # A lone surrogate cannot be encoded for the replica: 400 naming the prompt, not a 500.
    headers = {"content-type": "application/json"}
    lone = json.dumps({"prompts": "a\ud800b"}).encode()  # ASCII escapes: valid JSON
    response = served.http.post(url, content=lone, headers=headers)
    assert response.status_code == 400 and response.json()["error"]["field"] == "prompts"
    lone = json.dumps({"model": served.model, "prompt": "a\ud800b", "max_tokens": 2}).encode()
    assert_openai_error(
        served.http.post("/v1/completions", content=lone, headers=headers), 400, "prompt"
    )
    # ... nor in a structured output's texts (they were a 500: UnicodeEncodeError)
    chat = {"model": served.model, "messages": [{"role": "user", "content": "Hi"}]}
    for field, value in (("guided_choice", ["\ud800"]), ("guided_regex", "a\ud800")):
        lone = json.dumps({**chat, field: value, "max_tokens": 2}).encode()
        response = served.http.post("/v1/chat/completions", content=lone, headers=headers)
        assert_openai_error(response, 400, field)
        assert "not valid Unicode" in response.text
    lone = json.dumps({"prompts": "a", "choice": ["b\ud800"]}).encode()
    response = served.http.post(url, content=lone, headers=headers)
    assert response.status_code == 400 and response.json()["error"]["field"] == "choice"
    # Bytes that are not UTF-8, or nesting too deep to read: 400 saying so (it was
    # FastAPI's "There was an error parsing the body").
    not_utf8 = b'{"prompt": "\xc3\x28", "max_tokens": 2}'
    deep = b"[" * 100_000
    for body, words in ((not_utf8, "not valid UTF-8"), (deep, "too deeply")):
        for path in (url, "/v1/completions"):
            response = served.http.post(path, content=body, headers=headers)
            assert response.status_code == 400, response.text
            assert words in response.text, response.text


# ----- OpenAI-compatible routes ------------------------------------------------------------


def test_a_requests_id_header_comes_back_on_its_answer(served):
    """X-Request-Id (vLLM: --enable-request-id-headers) is echoed on a whole answer, a
    streamed one, a 400 and the /mii route, and names the OpenAI answers (``cmpl-<it>``,
    as vLLM's); none is made up without one; a value that is too long or not
    printable ASCII is not copied back."""
    chat = {"model": served.model, "messages": [{"role": "user", "content": "Hi"}]}
    traced = {"X-Request-Id": "trace-42/a.b"}
    answer = served.http.post(
        "/v1/chat/completions", json={**chat, "max_tokens": 2}, headers=traced
    )
    assert answer.status_code == 200 and answer.headers["x-request-id"] == "trace-42/a.b"
    assert answer.json()["id"] == "chatcmpl-trace-42/a.b"
    completion = {"model": served.model, "prompt": "Hi", "max_tokens": 1}
    answer = served.http.post("/v1/completions", json=completion, headers=traced)
    assert answer.json()["id"] == "cmpl-trace-42/a.b"
    body = {**chat, "max_tokens": 2, "stream": True}
    with served.http.stream("POST", "/v1/chat/completions", json=body, headers=traced) as stream:
        assert stream.headers["x-request-id"] == "trace-42/a.b"
        text = "".join(stream.iter_text())
        assert "[DONE]" in text and '"id":"chatcmpl-trace-42/a.b"' in text.replace(" ", "")
    refused = served.http.post("/v1/chat/completions", json={**chat, "n": 0}, headers=traced)
    assert refused.status_code == 400 and refused.headers["x-request-id"] == "trace-42/a.b"
    mii_route = served.http.post(f"/mii/{served.name}", json={"prompts": "a"}, headers=traced)
    assert mii_route.headers["x-request-id"] == "trace-42/a.b"
    plain = served.http.post("/v1/chat/completions", json={**chat, "max_tokens": 1})
    assert "x-request-id" not in plain.headers
    assert plain.json()["id"].startswith("chatcmpl-") and "trace" not in plain.json()["id"]
    for unfit in ("x" * 300, "has space"):
        answer = served.http.get("/health", headers={"X-Request-Id": unfit})
        assert answer.status_code == 200 and "x-request-id" not in answer.headers


def test_json_bodies_whatever_the_content_type(served, pipe):
    """curl -d sends application/x-www-form-urlencoded: the body is still read as
    JSON (it was refused as "not a valid dictionary"), on both kinds of routes."""
    expected = greedy(pipe, "DeepSpeed is", max_new_tokens=3).generated_text
    body = json.dumps({"prompts": "DeepSpeed is", "max_new_tokens": 3, "do_sample": False})
    for headers in (
        {"content-type": "application/x-www-form-urlencoded"},
        {"content-type": "text/plain"},
        {},
    ):
        request = served.http.build_request("POST", f"/mii/{served.name}", content=body)
        for key in ("content-type",):
            request.headers.pop(key, None)
        request.headers.update(headers)
        response = served.http.send(request)
        assert response.status_code == 200, (headers, response.text)
        assert response.json()[0]["generated_text"] == expected
    completion = {"model": served.name, "prompt": "DeepSpeed is", "max_tokens": 3, "temperature": 0}
    response = served.http.post(
        "/v1/completions",
        content=json.dumps(completion),
        headers={"content-type": "application/x-www-form-urlencoded"},
    )
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"] == expected


def test_requests_from_other_sites_pages_are_refused(served, pipe):
    """A page of any site can make a browser POST a text/plain or form body (or none)
    to a keyless local server without asking first (no preflight), and such bodies
    are read as JSON: such a request whose Origin is not allowed is 403 naming
    allowed_origins, before any work. The server's own pages, requests a browser
    preflights (JSON bodies: extensions, webviews) and clients that send no Origin
    (curl, SDKs) are served."""
    port = served.url.rsplit(":", 1)[1]
    body = json.dumps({"prompts": "DeepSpeed is", "max_new_tokens": 2, "do_sample": False})
    completion = json.dumps({"model": served.name, "prompt": "DeepSpeed is", "max_tokens": 2})
    simple_types = ("text/plain", "application/x-www-form-urlencoded", None)
    for path, content in ((f"/mii/{served.name}", body), ("/v1/completions", completion)):
        for origin in ("https://evil.example", "null", f"http://127.0.0.1:{int(port) + 1}"):
            for kind in simple_types:
                request = served.http.build_request("POST", path, content=content)
                request.headers.pop("content-type", None)
                request.headers["origin"] = origin
                if kind:
                    request.headers["content-type"] = kind
                response = served.http.send(request)
                assert response.status_code == 403, (path, origin, kind, response.text)
                message = response.json()["error"]["message"]
                assert "allowed_origins" in message and "application/json" in message
            # preflighted by a browser (CORS refuses it there unless allowed): served
            headers = {"content-type": "application/json", "origin": origin}
            response = served.http.post(path, content=content, headers=headers)
            assert response.status_code == 200, (path, origin, response.text)
        # the server's own pages, by either name (a page's requests carry its Host)
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", None):
            origin = {"origin": f"http://{host}", "host": host} if host else {}
            headers = {"content-type": "text/plain", **origin}
            response = served.http.post(path, content=content, headers=headers)
            assert response.status_code == 200, (path, host, response.text)
    assert served.http.get("/v1/models", headers={"origin": "https://evil.example"}).is_success


def test_models(served):
    models = served.oai.models.list()
    assert [m.id for m in models.data] == [served.model]
    assert models.data[0].object == "model"
    assert served.http.get("/v1/models").json()["object"] == "list"
    # A base URL ending in "/" (it was a 404 "the model '' does not exist").
    assert served.http.get("/v1/models/").json() == served.http.get("/v1/models").json()
    assert served.http.get(f"/v1/models/{served.model}").json()["id"] == served.model


def test_openapi_schema_has_unique_operation_ids():
    """/openapi.json: every operation has an id of its own (GET and POST /ping shared
    one, and FastAPI warned "Duplicate Operation ID" into the server's log)."""
    import warnings

    from mii.rpc.http.app import build_app
    from mii.rpc.http.state import GatewayState

    app = build_app(
        GatewayState(
            pool=None, deployment_name="d", model="m", max_length=8, tokenizer=None, created=0
        )
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        schema = app.openapi()
    ids = [op["operationId"] for path in schema["paths"].values() for op in path.values()]
    assert len(ids) == len(set(ids)) and "/ping" in schema["paths"]
    assert set(schema["paths"]["/ping"]) == {"get", "post"}


def test_completions_greedy_and_streaming(served, pipe):
    ref = greedy(pipe, PROMPTS[0], max_new_tokens=NEW)
    completion = served.oai.completions.create(
        model=served.model, prompt=PROMPTS[0], max_tokens=NEW, temperature=0
    )
    assert completion.object == "text_completion" and completion.id.startswith("cmpl-")
    assert completion.model == served.model
    [choice] = completion.choices
    assert choice.text == ref.generated_text
    assert choice.finish_reason == ref.finish_reason
    assert completion.usage.prompt_tokens == ref.prompt_length
    assert completion.usage.completion_tokens == ref.generated_length
    assert completion.usage.total_tokens == ref.prompt_length + ref.generated_length

    chunks = list(
        served.oai.completions.create(
            model=served.model,
            prompt=PROMPTS[0],
            max_tokens=NEW,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.generated_text
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert [r for r in reasons if r] == [ref.finish_reason] and reasons[-1] is not None
    assert chunks[-1].choices == []
    assert chunks[-1].usage.prompt_tokens == ref.prompt_length
    assert chunks[-1].usage.completion_tokens == ref.generated_length

    # vLLM's continuous_usage_stats: every chunk carries the usage so far (it was
    # accepted and ignored: null in every chunk but the last).
    chunks = list(
        served.oai.completions.create(
            model=served.model,
            prompt=PROMPTS[0],
            max_tokens=NEW,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True, "continuous_usage_stats": True},
        )
    )
    assert all(c.usage.prompt_tokens == ref.prompt_length for c in chunks)
    counted = [c.usage.completion_tokens for c in chunks]
    assert counted == sorted(counted) and counted[-1] == ref.generated_length
    assert 1 <= counted[0] < ref.generated_length  # the first chunk: its own tokens only
    assert all(
        c.usage.total_tokens == ref.prompt_length + c.usage.completion_tokens for c in chunks
    )

    # Several prompts; the deployment name is accepted as the model.
    refs = pipe(PROMPTS, do_sample=False, max_new_tokens=NEW)
    completion = served.oai.completions.create(
        model=served.name, prompt=PROMPTS, max_tokens=NEW, temperature=0
    )
    assert [c.index for c in completion.choices] == [0, 1]
    assert [c.text for c in completion.choices] == [r.generated_text for r in refs]
    assert completion.usage.prompt_tokens == sum(r.prompt_length for r in refs)


def test_completion_options(served, pipe):
    ref = greedy(pipe, PROMPTS[1], max_new_tokens=NEW, ignore_eos=True)

    def create(**options):
        options = {"model": served.model, "prompt": PROMPTS[1], "temperature": 0, **options}
        return served.oai.completions.create(**options)

    short = create(max_tokens=5, extra_body={"ignore_eos": True})
    assert short.usage.completion_tokens == 5 and short.choices[0].finish_reason == "length"
    assert (
        short.choices[0].text
        == served.http.post(
            f"/mii/{served.name}",
            json={
                "prompts": PROMPTS[1],
                "do_sample": False,
                "max_new_tokens": 5,
                "ignore_eos": True,
            },
        ).json()[0]["generated_text"]
    )

    text = ref.generated_text
    assert len(text) >= 6, f"greedy text too short to pick a stop string from: {text!r}"
    stop = text[3:6]
    stopped = create(max_tokens=NEW, stop=[stop], extra_body={"ignore_eos": True})
    assert stopped.choices[0].text == text[: text.index(stop)]
    assert stopped.choices[0].finish_reason == "stop"
    # vLLM's stop_reason: the stop string found (streamed: on the finishing chunk);
    # the stop token id; None for a finish by length.
    assert stopped.choices[0].model_extra["stop_reason"] == stop
    chunks = list(create(max_tokens=NEW, stop=[stop], stream=True, extra_body={"ignore_eos": True}))
    assert [c.choices[0].model_extra["stop_reason"] for c in chunks][-1] == stop
    assert all(c.choices[0].model_extra["stop_reason"] is None for c in chunks[:-1])
    token = ref.token_ids[2]
    by_token = create(max_tokens=NEW, extra_body={"ignore_eos": True, "stop_token_ids": [token]})
    assert by_token.choices[0].model_extra["stop_reason"] == token
    assert short.choices[0].model_extra["stop_reason"] is None
    # vLLM's truncate_prompt_tokens: the prompt's last N tokens only.
    ids = served.http.post("/tokenize", json={"prompt": PROMPTS[1]}).json()["tokens"]
    cut = create(max_tokens=4, extra_body={"truncate_prompt_tokens": 3, "ignore_eos": True})
    tail = create(prompt=ids[-3:], max_tokens=4, extra_body={"ignore_eos": True})
    assert cut.usage.prompt_tokens == 3 and cut.choices[0].text == tail.choices[0].text
    # echoed, the prompt is the kept tokens' text, which its logprobs and offsets follow
    # (it was the whole prompt, while the logprobs covered the last 3 tokens)
    echoed = create(
        max_tokens=1, echo=True, logprobs=0, extra_body={"truncate_prompt_tokens": 3}
    ).choices[0]
    kept_text = served.http.post("/detokenize", json={"tokens": ids[-3:]}).json()["prompt"]
    assert echoed.text.startswith(kept_text) and not echoed.text.startswith(PROMPTS[1])
    offsets, tokens = echoed.logprobs.text_offset, echoed.logprobs.tokens
    assert [echoed.text[o : o + len(t)] for o, t in zip(offsets, tokens)] == tokens
    # vLLM's include_stop_str_in_output: the text ends with the stop string.
    kept = create(max_tokens=NEW, stop=[stop], extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == text[: text.index(stop) + len(stop)]
    body = {"prompts": PROMPTS[1], "stop": stop, "do_sample": False, "ignore_eos": True}
    whole = served.http.post(f"/mii/{served.name}", json={**body, "max_new_tokens": NEW})
    assert whole.json()[0]["stop_reason"] == stop

    echoed = create(max_tokens=NEW, echo=True, extra_body={"ignore_eos": True})
    assert echoed.choices[0].text == PROMPTS[1] + text

    # n samples with a seed: reproducible, distinct choices, choice 0 = the seed itself.
    sampled = dict(max_tokens=NEW, temperature=1.5, seed=1234, extra_body={"ignore_eos": True})
    first, again = create(n=2, **sampled), create(n=2, **sampled)
    texts = [c.text for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1]
    assert texts == [c.text for c in again.choices]
    assert texts[0] != texts[1]
    assert create(n=1, **sampled).choices[0].text == texts[0]
    assert first.usage.completion_tokens == 2 * NEW


def test_chat_completions(served, pipe):
    messages = [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "DeepSpeed is"},
    ]
    prompt = "system: Answer briefly.\nuser: DeepSpeed is\nassistant:"  # the fallback template
    ref = greedy(pipe, prompt, max_new_tokens=NEW)
    chat = served.oai.chat.completions.create(
        model=served.model, messages=messages, max_tokens=NEW, temperature=0
    )
    assert chat.object == "chat.completion" and chat.id.startswith("chatcmpl-")
    [choice] = chat.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == ref.generated_text
    # OpenAI's message shape: its refusal field, null
    assert "refusal" in choice.message.model_fields_set and choice.message.refusal is None
    assert choice.finish_reason == ref.finish_reason
    assert chat.usage.prompt_tokens == ref.prompt_length
    assert chat.usage.completion_tokens == ref.generated_length

    chunks = list(
        served.oai.chat.completions.create(
            model=served.model,
            messages=messages,
            max_completion_tokens=NEW,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert content == ref.generated_text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref.finish_reason
    assert chunks[-1].usage.completion_tokens == ref.generated_length
    assert all(c.usage is None for c in chunks[:-1])  # without continuous_usage_stats
    streamed = served.http.post(
        "/v1/chat/completions",
        json={
            "model": served.model,
            "messages": messages,
            "max_tokens": NEW,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True},
        },
    )
    events = [json.loads(line[6:]) for line in streamed.text.splitlines() if line[6:7] == "{"]
    role = events[0]  # the role chunk: the prompt counted, nothing generated yet
    assert role["choices"][0]["delta"]["role"] == "assistant"
    assert role["usage"]["prompt_tokens"] == ref.prompt_length
    assert role["usage"]["completion_tokens"] == 0
    assert events[-1]["usage"]["completion_tokens"] == ref.generated_length
    # n=2: as vLLM, each chunk carries its own choice's usage (the last chunk, both)
    body = {
        "model": served.model,
        "messages": messages,
        "max_tokens": 4,
        "n": 2,
        "seed": 5,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True, "continuous_usage_stats": True},
    }
    streamed = served.http.post("/v1/chat/completions", json=body)
    events = [json.loads(line[6:]) for line in streamed.text.splitlines() if line[6:7] == "{"]
    roles = [e for e in events if e["choices"] and "role" in e["choices"][0]["delta"]]
    assert len(roles) == 2 and all(e["usage"]["completion_tokens"] == 0 for e in roles)
    assert all(e["usage"]["prompt_tokens"] == ref.prompt_length for e in events)
    for index in (0, 1):
        own = [e for e in events if e["choices"] and e["choices"][0]["index"] == index]
        counted = [e["usage"]["completion_tokens"] for e in own]
        assert counted == sorted(counted) and counted[-1] == 4, (index, counted)
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 8

    # A conversation too long to tokenize whole, cut to its last tokens: served (it
    # was refused by the character check before truncate_prompt_tokens was read).
    limit = pipe.engine.core.intake.max_prompt_chars
    long_turn = [{"role": "user", "content": "DeepSpeed is " * (limit // 12 + 1)}]
    body = {"model": served.model, "messages": long_turn, "max_tokens": 2}
    assert_openai_error(served.http.post("/v1/chat/completions", json=body), 400, "messages")
    greedy_body = {**body, "truncate_prompt_tokens": 5, "temperature": 0}
    cut = served.http.post("/v1/chat/completions", json=greedy_body)
    assert cut.status_code == 200 and cut.json()["usage"]["prompt_tokens"] == 5, cut.text
    # ... whose 5 tokens are the whole conversation's last 5 (only its last characters
    # were tokenized): the same answer as those ids sent as a completion
    text = "".join(f"{m['role']}: {m['content']}\n" for m in long_turn) + "assistant:"
    last = pipe.tokenizer(text).input_ids[-5:]
    same = {"model": served.model, "prompt": last, "max_tokens": 2, "temperature": 0}
    completion = served.http.post("/v1/completions", json=same).json()
    assert cut.json()["choices"][0]["message"]["content"] == completion["choices"][0]["text"]

    # Content given as text parts; n=2 with a seed.
    parts = [{"role": "user", "content": [{"type": "text", "text": "DeepSpeed is"}]}]
    chat = served.oai.chat.completions.create(
        model=served.model, messages=parts, max_tokens=4, n=2, seed=7
    )
    assert [c.index for c in chat.choices] == [0, 1]


def test_vllm_fields_at_their_no_op_values_are_served_and_others_refused(served):
    """vLLM's request fields that mii does not implement: its clients' defaults are
    served (they change nothing), any other value is 400 naming the field."""
    post = served.http.post
    ok = {"model": served.model, "prompt": "DeepSpeed is", "max_tokens": 2}
    chat = {**ok, "messages": [{"role": "user", "content": "hi"}]}
    del chat["prompt"]
    no_ops = {
        "use_beam_search": False,
        "length_penalty": 1.0,
        "include_stop_str_in_output": False,
        "priority": 0,
        "truncate_prompt_tokens": None,
        "prompt_logprobs": None,
        "allowed_token_ids": [],
        "bad_words": [],
        "return_tokens_as_token_ids": False,
        "request_id": "from-a-vllm-client",
        # what vLLM-based clients (RL frameworks, disaggregated setups) send by default
        "spaces_between_special_tokens": True,
        "include_reasoning": True,
        "return_token_ids": False,
        "chat_template": None,
        "cache_salt": None,
        "kv_transfer_params": None,
        "vllm_xargs": None,
        "logits_processors": None,
        "documents": None,
        "mm_processor_kwargs": None,
        "structural_tag": None,
        "prompt_embeds": None,
    }
    reply = post("/v1/completions", json={**ok, **no_ops, "add_special_tokens": True})
    assert reply.status_code == 200, reply.text
    reply = post("/v1/chat/completions", json={**chat, **no_ops, "add_special_tokens": False})
    assert reply.status_code == 200, reply.text
    asked = {
        "use_beam_search": True,
        "length_penalty": 0.5,
        "priority": 1,
        "bad_words": ["x"],
        "spaces_between_special_tokens": False,
        "return_token_ids": True,
        "chat_template": "{{ messages }}",
        "cache_salt": "tenant-a",
        "kv_transfer_params": {"do_remote_decode": True},
        "documents": [{"text": "x"}],
    }
    for field, value in asked.items():
        for route, body in (("/v1/completions", ok), ("/v1/chat/completions", chat)):
            error = assert_openai_error(post(route, json={**body, field: value}), 400, field)
            assert "not supported" in error["message"], error
    # Token-id prompts are not tokenized: add_special_tokens changes nothing there.
    ids = {**ok, "prompt": [5, 6, 7], "add_special_tokens": False}
    assert post("/v1/completions", json=ids).status_code == 200
    bad = [("/v1/completions", {**ok, "add_special_tokens": False}, "add_special_tokens")]
    bad.append(("/v1/chat/completions", {**chat, "add_special_tokens": True}, "add_special_tokens"))
    bad.append(("/v1/chat/completions", {**chat, "echo": True}, "echo"))
    for route, body, field in bad:
        assert_openai_error(post(route, json=body), 400, field)


def test_openai_invalid_requests(served):
    post = served.http.post
    ok = {"model": served.model, "prompt": "DeepSpeed is", "max_tokens": 2}
    chat = {"model": served.model, "messages": [{"role": "user", "content": "hi"}]}
    assert_openai_error(post("/v1/completions", json={**ok, "top_p": 1.5}), 400, "top_p")
    assert_openai_error(post("/v1/completions", json={**ok, "frobnicate": 1}), 400, "frobnicate")
    assert_openai_error(post("/v1/completions", json={**ok, "max_tokens": -1}), 400, "max_tokens")
    assert_openai_error(post("/v1/completions", json={**ok, "min_tokens": -1}), 400, "min_tokens")
    for field in ("max_tokens", "n", "top_k"):  # true was read as 1
        assert_openai_error(post("/v1/completions", json={**ok, field: True}), 400, field)
    # ... and inside lists and maps: token id 1, a bias of 1.0 (were 200s)
    for field, value in (
        ("stop_token_ids", [True]),
        ("allowed_token_ids", [5, False]),
        ("logit_bias", {"5": True}),
    ):
        for route, body in (("/v1/completions", ok), ("/v1/chat/completions", chat)):
            assert_openai_error(post(route, json={**body, field: value}), 400, field)
    for field, value in (("stream", "yes"), ("echo", 1), ("ignore_eos", "off")):
        # pydantic read these as booleans
        error = assert_openai_error(post("/v1/completions", json={**ok, field: value}), 400, field)
        assert "true or false" in error["message"], error
    usage = {**ok, "stream": True, "stream_options": {"include_usage": "yes"}}
    field = "stream_options.include_usage"
    assert_openai_error(post("/v1/completions", json=usage), 400, field)
    # null is "not set" (clients send unset options as null; OpenAI allows it for n,
    # stream, echo): each field takes its default, which was a 400 "got None".
    unset = ("n", "stream", "echo", "ignore_eos", "min_tokens", "skip_special_tokens")
    unset += ("include_stop_str_in_output", "use_beam_search", "length_penalty", "priority")
    nulls = {**ok, **dict.fromkeys(unset), "stream_options": None}
    reply = post("/v1/completions", json=nulls)
    assert reply.status_code == 200, reply.text
    assert len(reply.json()["choices"]) == 1 and reply.json()["usage"]["completion_tokens"] <= 2
    no_usage = {**ok, "stream": True, "stream_options": {"include_usage": None}}
    assert post("/v1/completions", json=no_usage).status_code == 200
    unset = ("n", "stream", "ignore_eos", "min_tokens", "continue_final_message", "echo")
    reply = post("/v1/chat/completions", json={**chat, "max_tokens": 2, **dict.fromkeys(unset)})
    assert reply.status_code == 200, reply.text
    # ... but where null means something it keeps that meaning (max_tokens: no limit),
    # and a required field is still required.
    assert_openai_error(post("/v1/completions", json={**ok, "prompt": None}), 400, "prompt")
    # Too many choices: the field to change is named (it was "n" for 1,025 prompts).
    many = {**ok, "prompt": ["a"] * 1025}
    error = assert_openai_error(post("/v1/completions", json=many), 400, "prompt")
    assert "1025 prompts" in error["message"], error
    assert_openai_error(
        post("/v1/completions", json={**ok, "prompt": ["a", "b"], "n": 513}), 400, "n"
    )
    too_few = {**ok, "min_tokens": 5, "max_tokens": 2}
    error = assert_openai_error(post("/v1/completions", json=too_few), 400, "max_tokens")
    assert "min_tokens" in error["message"] and "min_new_tokens" not in error["message"]
    # ... but what the caller sent is quoted as sent, mii's option names included.
    stops = {**chat, "stop": ["prompt", "min_new_tokens", ""]}
    error = assert_openai_error(post("/v1/chat/completions", json=stops), 400, "stop")
    assert "['prompt', 'min_new_tokens', '']" in error["message"], error
    # "" alone and [] are no stop string (clients' blank defaults).
    for blank in ("", []):
        reply = post("/v1/chat/completions", json={**chat, "max_tokens": 1, "stop": blank})
        assert reply.is_success, reply.text
    # A text part without its text names the part's key (it said "got a 'text' part").
    parts = {**chat, "messages": [{"role": "user", "content": [{"type": "text"}]}]}
    text_part = post("/v1/chat/completions", json=parts)
    error = assert_openai_error(text_part, 400, "messages.0.content.0.text")
    assert "needs its 'text'" in error["message"], error
    # An assistant's refusal part (in histories saved from OpenAI) is its text, as
    # vLLM reads it (it was a 400 "only text content"); without its text, 400.
    said = [{"role": "user", "content": "hi"}]
    as_text = [*said, {"role": "assistant", "content": "I can't help with that."}]
    as_refusal = [
        *said,
        {
            "role": "assistant",
            "content": [{"type": "refusal", "refusal": "I can't help with that."}],
        },
    ]
    tokens = [
        post("/tokenize", json={"model": served.model, "messages": m}).json()["tokens"]
        for m in (as_text, as_refusal)
    ]
    assert tokens[0] == tokens[1]
    assert post("/v1/chat/completions", json={**chat, "messages": as_refusal}).status_code == 200
    empty = [*said, {"role": "assistant", "content": [{"type": "refusal"}]}]
    empty_reply = post("/v1/chat/completions", json={**chat, "messages": empty})
    assert_openai_error(empty_reply, 400, "messages.1.content.0.refusal")
    # vLLM's "no top-k" values are accepted (its clients send them as defaults);
    # other values below 1 are refused, naming top_k.
    for no_top_k in (-1, 0):
        assert post("/v1/completions", json={**ok, "top_k": no_top_k}).status_code == 200
    error = assert_openai_error(post("/v1/completions", json={**ok, "top_k": -2}), 400, "top_k")
    assert "-1 or 0 for every token" in error["message"], error  # not "greater than 0"
    # A message's role is never empty; an assistant's tool_calls are calls.
    for message, param in (
        ({"role": "", "content": "hi"}, "messages.0.role"),
        ({"role": "assistant", "tool_calls": "garbage"}, "messages.0.tool_calls"),
        ({"role": "assistant", "tool_calls": [{"bogus": 1}]}, "messages.0.tool_calls.0.function"),
    ):
        reply = post("/v1/chat/completions", json={**chat, "messages": [message]})
        assert_openai_error(reply, 400, param)
    assert_openai_error(post("/v1/completions", json={**ok, "temperature": -1}), 400, "temperature")
    assert_openai_error(post("/v1/completions", json={**ok, "logprobs": 21}), 400, "logprobs")
    assert_openai_error(post("/v1/completions", json={**ok, "n": 0}), 400, "n")
    assert_openai_error(post("/v1/completions", json={**ok, "prompt": [1, -2]}), 400, "prompt")
    error = assert_openai_error(
        post("/v1/completions", json={**ok, "model": "gpt-9"}), 404, "model"
    )
    assert error["code"] == "model_not_found"
    # it lists what the model field may say: the deployment's name works too
    assert repr(served.name) in error["message"], error
    bad_json = post(
        "/v1/completions", content=b"{oops", headers={"content-type": "application/json"}
    )
    assert_openai_error(bad_json, 400, None)
    # Refused by the engine behind the pool (prompt longer than max_length), whole and streamed.
    long = {**ok, "prompt": "DeepSpeed is " * 3000}
    assert_openai_error(post("/v1/completions", json=long), 400, "prompt")
    assert_openai_error(post("/v1/completions", json={**long, "stream": True}), 400, "prompt")
    assert_openai_error(
        post("/v1/chat/completions", json={**chat, "messages": []}), 400, "messages"
    )
    assert_openai_error(
        post("/v1/chat/completions", json={**chat, "max_completion_tokens": -2}),
        400,
        "max_completion_tokens",
    )
    assert_openai_error(
        post("/v1/chat/completions", json={**chat, "tools": [{}]}), 400, "tools.0.type"
    )
    assert_openai_error(post("/v1/chat/completions", json={**chat, "top_p": 0}), 400, "top_p")
    assert_openai_error(post("/v1/nowhere", json={}), 404, None)

    with pytest.raises(openai.BadRequestError) as err:
        served.oai.completions.create(model=served.model, prompt="x", top_p=2.0)
    assert err.value.body["param"] == "top_p"
    with pytest.raises(openai.NotFoundError):
        served.oai.chat.completions.create(model="nope", messages=chat["messages"])


# ----- health, metrics, aborts ---------------------------------------------------------------


def test_openai_seed_is_a_64_bit_integer(served):
    """OpenAI's seed is any signed 64-bit integer; beyond that range it is refused
    (it was reduced mod 2**63, so 2**63 sampled as seed 0)."""
    body = {"model": served.name, "prompt": "DeepSpeed is", "max_tokens": 2}
    for seed in (2**63, -(2**63) - 1, 2**70):
        response = served.http.post("/v1/completions", json={**body, "seed": seed})
        assert_openai_error(response, 400, "seed")
    for seed in (-1, 2**63 - 1):
        response = served.http.post("/v1/completions", json={**body, "seed": seed})
        assert response.status_code == 200, response.text


def test_health_and_metrics(served):
    health = served.http.get("/health")
    assert health.status_code == 200
    assert health.json()["status"] == "ok" and health.json()["healthy_replicas"] == 1
    # vLLM's liveness and version routes
    for method in ("GET", "POST"):
        ping = served.http.request(method, "/ping")
        assert ping.status_code == 200 and ping.json() == {"status": "ok"}
    for path in ("/health", "/ping"):  # uptime monitors' probe (it was a 405: a fuzzer)
        head = served.http.head(path)
        assert head.status_code == 200 and head.content == b"", (path, head)
    assert served.http.get("/version").json() == {"version": mii.__version__}

    before = finished(served, "length")
    response = served.http.post(
        f"/mii/{served.name}", json={"prompts": "x", "max_new_tokens": 2, "ignore_eos": True}
    )
    assert response.status_code == 200
    assert finished(served, "length") == before + 1
    _, text = metric_samples(served)
    for name in METRIC_NAMES:
        assert name in text, name
    assert 'mii_requests_total{finish_reason="length"}' in text
    # no *_created series (prometheus_client's: a timestamp that read as a count, one
    # per series, and not documented; vLLM exports none either): a trial
    assert "_created" not in text


def test_streaming_client_that_leaves_aborts_its_request(served):
    before = finished(served, "length")
    body = {
        "model": served.model,
        "prompt": PROMPTS[0],
        "max_tokens": MAX_POSITIONS - 64,
        "ignore_eos": True,
        "stream": True,
    }
    with served.http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        lines = response.iter_lines()  # kept: dropping it would close the connection
        events = 0
        while events < 3:
            line = next(lines)
            if line.startswith("data: {"):
                events += 1
                assert "error" not in json.loads(line[6:])
        wait_running(served, 1)  # still generating (it would for many seconds)
    # Leaving the block closed the connection mid-stream.
    wait_running(served, 0)
    assert finished(served, "length") == before, "the request ran to the end"


def test_waiting_client_that_leaves_aborts_its_request(served):
    before = finished(served, "length")
    body = {"prompts": PROMPTS[0], "max_new_tokens": MAX_POSITIONS - 64, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # it would run for many seconds
        served.http.post(f"/mii/{served.name}", json=body, timeout=1.0)
    wait_running(served, 0)
    assert finished(served, "length") == before, "the request ran to the end"


def test_streamed_prompts_are_answered_once_each_is_accepted(served):
    """A streamed request of several text prompts, one too long for max_length: 400
    naming the prompt, every time (the answer used to start with the short prompt's
    first piece, then carry the long one's refusal as an error event), and nothing
    left running. Prompts that fit stream as before, every choice's pieces in."""
    too_long = "hello world " * MAX_POSITIONS
    body = {"model": served.model, "max_tokens": 3, "stream": True, "ignore_eos": True}
    for prompts in ([PROMPTS[0], too_long], [too_long, PROMPTS[0]]):
        for _ in range(3):
            reply = served.http.post("/v1/completions", json={**body, "prompt": prompts})
            assert_openai_error(reply, 400, "prompt")
    wait_running(served, 0)
    reply = served.http.post("/v1/completions", json={**body, "prompt": PROMPTS[:2], "n": 2})
    assert reply.status_code == 200, reply.text
    chunks = [json.loads(line[6:]) for line in reply.text.splitlines() if line[6:7] == "{"]
    finishes = {c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]}
    assert finishes == {0, 1, 2, 3}


class _RefusesLater:
    """A pool whose prompt "bad" is refused a moment after the others stream."""

    def __init__(self) -> None:
        self.replicas = [type("R", (), {"healthy": True})()]
        self.metrics = Metrics()
        self.closed: list[object] = []

    async def stream(self, prompt, params, timeout=None, announce=False):
        from mii.response import Response

        try:
            if prompt == "bad":
                await asyncio.sleep(0.3)
                raise InvalidRequestError("the prompt has too many tokens", field="prompt")
            if announce:
                yield None
            yield Response("ok", 1, 1, None)
            await asyncio.sleep(30)  # still generating when the request is refused
            yield Response("", 1, 1, "length")
        finally:
            self.closed.append(prompt)


def test_a_late_refusal_of_one_prompt_is_the_streamed_requests_400(llama):
    """The gateway waits for every choice's acceptance, not just the first piece
    of whichever answers first: a refusal that arrives after another prompt's first
    piece is still the request's 400, and the other prompt's request is closed."""
    pool = _RefusesLater()

    async def scenario():
        config = DeploymentConfig(model=llama, restful_api_port=free_port())
        info = mii_pb2.ModelInfoReply(deployment_name="d", model=llama, max_length=256)
        gateway = await start_gateway(pool, info, config)
        try:
            async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:
                body = {"prompt": ["good", "bad"], "stream": True, "max_tokens": 2}
                assert_openai_error(await http.post("/v1/completions", json=body), 400, "prompt")
        finally:
            await gateway.stop()

    asyncio.run(scenario())
    assert sorted(pool.closed) == ["bad", "good"]


class _AcceptsThenFails:
    """A pool whose requests are accepted, then fail before any token (a replica
    lost with no other to retry on)."""

    def __init__(self) -> None:
        self.replicas = [type("R", (), {"healthy": True})()]
        self.metrics = Metrics()
        self.started, self.choices = 0, 1  # the test sets the request's choices

    async def stream(self, prompt, params, timeout=None, announce=False):
        self.started += 1
        if announce:
            yield None
        while self.started < self.choices:  # fail once every choice was accepted
            await asyncio.sleep(0.01)
        raise NoReplicaError("no replica of this deployment is available")


def test_a_single_streamed_choice_still_starts_at_its_first_piece(llama):
    """Acceptance is awaited only for several choices: one choice that fails before
    its first token is a 503 (which clients retry), as before, not an error event in
    a 200; several choices started once accepted, so theirs is an event."""

    async def scenario():
        config = DeploymentConfig(model=llama, restful_api_port=free_port())
        info = mii_pb2.ModelInfoReply(deployment_name="d", model=llama, max_length=256)
        pool = _AcceptsThenFails()
        gateway = await start_gateway(pool, info, config)
        try:
            async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:
                body = {"prompt": "a", "stream": True, "max_tokens": 2}
                reply = await http.post("/v1/completions", json=body)
                assert reply.status_code == 503, reply.text
                assert reply.json()["error"]["code"] == "no_replica_available"
                pool.started, pool.choices = 0, 2
                reply = await http.post("/v1/completions", json={**body, "n": 2})
                assert reply.status_code == 200 and "no_replica_available" in reply.text
        finally:
            await gateway.stop()

    asyncio.run(scenario())


# ----- pieces without a deployment --------------------------------------------------------------


def test_chat_template_and_fallback():
    tokenizer = make_tokenizer()
    messages = [{"role": "user", "content": "hi"}]
    assert chat_prompt_ids(tokenizer, messages) == tokenizer("user: hi\nassistant:").input_ids
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    # The template's ids as they are: its BOS once (the engine adds none to ids).
    ids = tokenizer("<|user|>hi<|assistant|>").input_ids
    assert ids[0] == tokenizer.bos_token_id
    assert chat_prompt_ids(tokenizer, messages) == ids
    tokenizer.chat_template = "{{ raise_exception('roles must alternate') }}"
    with pytest.raises(InvalidRequestError, match="roles must alternate") as err:
        chat_prompt_ids(tokenizer, messages)
    assert err.value.field == "messages"


def test_choice_seeds():
    assert choice_seed(None, 1) is None
    assert choice_seed(42, 0) == 42
    seeds = {choice_seed(42, i) for i in range(8)}
    assert len(seeds) == 8 and all(0 <= s < 2**63 for s in seeds)
    assert choice_seed(42, 3) == choice_seed(42, 3)
    assert 0 <= choice_seed(-5, 0) < 2**63


def test_port_in_use_is_reported():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        info = mii_pb2.ModelInfoReply(deployment_name="d", model="m")
        config = DeploymentConfig(model="m", restful_api_port=port)
        with pytest.raises(GatewayError, match=f"{port}.*in use"):
            asyncio.run(start_gateway(None, info, config))


class _Replica:
    healthy = False


class _DownPool:
    """A pool whose every replica is out of rotation."""

    def __init__(self) -> None:
        self.replicas = [_Replica()]
        self.metrics = Metrics()

    async def generate(self, prompts, params, timeout=None):
        raise NoReplicaError("no replica of this deployment is available")

    async def stream(self, prompt, params, timeout=None, announce=False):
        raise NoReplicaError("no replica of this deployment is available")
        yield


class _Stated:
    def __init__(self, state: str) -> None:
        self.state, self.healthy = state, state == "serving"


def test_choices_that_need_replicas_out_of_rotation(llama):
    """n choices that fit only in every replica at once: with a replica given up on
    (failed) they never fit (400 naming n); with one restarting they fit once it is
    back (503 with Retry-After; this was a 429 "holds 4 requests" on an idle server)."""
    from scripted_gateway import ScriptedPool, with_gateway

    pool = ScriptedPool("x")
    body = {"model": "d", "prompt": "a", "n": 5, "max_tokens": 2}

    async def scenario(client, gateway):
        async with httpx.AsyncClient(base_url=gateway.url) as http:
            for states, status in [
                (("serving", "serving"), 200),
                (("serving", "failed"), 400),
                (("serving", "restarting"), 503),
                (("unresponsive", "serving"), 503),
                # none alive: the pool's own answer (a real pool's 503: no replica),
                # not a 400 blaming the request
                (("failed", "failed"), 200),
            ]:
                pool.replicas = [_Stated(s) for s in states]
                response = await http.post("/v1/completions", json=body)
                assert response.status_code == status, (states, response.text)
                if status != 200:
                    assert response.json()["error"]["param"] == "n"
                if status == 503:
                    assert int(response.headers["retry-after"]) > 0

    with_gateway(llama, pool, scenario, replica_num=2, max_queued_requests=4)


def test_texts_too_long_for_max_length_are_refused_before_tokenizing(llama):
    """The chat, Responses and /tokenize routes refuse a text longer than max_length
    tokens can hold by its length (as the engine does for completions): an 8 MB chat
    message took ~45 s of the gateway's CPU to tokenize before its 400."""
    from scripted_gateway import ScriptedPool, with_gateway

    pool = ScriptedPool("x")
    huge = "word " * 400_000  # 2 MB: far beyond 4,096 tokens of any vocabulary here

    async def scenario(client, gateway):
        async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:
            for path, body, field in [
                ("/v1/chat/completions", {"messages": [{"role": "user", "content": huge}]},
                 "messages"),
                ("/v1/responses", {"input": huge}, "input"),
                ("/tokenize", {"prompt": huge}, "prompt"),
                ("/tokenize", {"messages": [{"role": "user", "content": huge}]}, "messages"),
            ]:  # fmt: skip
                response = await http.post(path, json=body)
                assert response.status_code == 400, (path, response.text)
                error = response.json()["error"]
                assert error["param"] == field and "max_length" in error["message"], error
        assert pool.sent == []

    with_gateway(llama, pool, scenario)


def test_no_healthy_replica_gives_503(model_path):
    async def scenario():
        config = DeploymentConfig(model=model_path, restful_api_port=free_port())
        info = mii_pb2.ModelInfoReply(deployment_name="down", model=model_path, max_length=64)
        gateway = await start_gateway(_DownPool(), info, config)
        try:
            async with httpx.AsyncClient(base_url=gateway.url) as http:
                health = await http.get("/health")
                assert health.status_code == 503 and health.json()["status"] == "unavailable"
                assert (await http.get("/ping")).status_code == 503
                whole = await http.post("/mii/down", json={"prompts": "x"})
                assert whole.status_code == 503 and whole.json()["error"]["message"]
                for stream in (False, True):
                    body = {"prompt": "x", "stream": stream}
                    response = await http.post("/v1/completions", json=body)
                    assert response.status_code == 503
                    assert response.json()["error"]["type"] == "server_error"
        finally:
            await gateway.stop()

    asyncio.run(scenario())


def test_preemptions_are_a_counter_that_never_goes_down():
    """/metrics declared mii_preemptions_total a gauge (the replicas' summed count, which
    drops when a replica restarts): Prometheus' rate() needs a counter."""
    from prometheus_client import generate_latest

    from mii.rpc import mii_pb2
    from mii.rpc.metrics import Metrics

    metrics = Metrics()
    for summed in (0, 3, 5, 2, 4):  # 5 -> 2: a replica with 3 restarted from 0
        metrics.export_pool(mii_pb2.StatsReply(preemptions=summed), healthy=1)
    text = generate_latest(metrics.registry).decode()
    assert "# TYPE mii_preemptions_total counter" in text
    assert "mii_preemptions_total 7.0" in text


def test_a_replica_out_of_rotation_keeps_its_preemptions_in_the_sum():
    """Preemptions were summed over the replicas in rotation only: one that missed a
    health check left the sum and, back, was counted again (100 -> 300 exported)."""
    from prometheus_client import generate_latest

    from mii.rpc import mii_pb2
    from mii.rpc.metrics import Metrics
    from mii.rpc.pool import summed_stats

    a, b = mii_pb2.StatsReply(preemptions=100), mii_pb2.StatsReply(preemptions=0)
    metrics = Metrics()
    for live in ([a, b], [b], [a, b], [b], [a, b]):  # a drops out of rotation twice
        metrics.export_pool(summed_stats(live, [a, b]), healthy=len(live))
    assert "mii_preemptions_total 100.0" in generate_latest(metrics.registry).decode()
