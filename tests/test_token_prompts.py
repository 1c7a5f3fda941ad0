"""Token-id prompts, /tokenize and /detokenize, and the OpenAI field policy (issue 16,
items 3 and 5).

- ``prompt`` on ``/v1/completions`` may be token ids (``list[int]``, one prompt) or
  several (``list[list[int]]``), as OpenAI and vLLM take it; so may the prompts of
  the pipeline, the Python client and ``/mii/{name}`` (a flat list is one prompt).
- ``/tokenize`` and ``/detokenize`` answer vLLM's shapes; chat tokenization gives
  exactly the ids the chat route sends.
- OpenAI fields that change nothing generated are accepted, ignored and logged
  once; names outside the specification get 400 naming them.

One deployment (one replica, REST on) serves a tiny Llama whose tokenizer adds BOS
and has a ChatML template that reads one extra variable.
"""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import pytest

import mii
from chat_tokenizers import CHATML_TEMPLATE, chatml_tokenizer
from helpers import save_checkpoint, served_deployment, tiny_config
from mii.errors import InvalidRequestError
from mii.prompts import prompt_batch
from mii.rpc import mii_pb2, registry
from mii.rpc.convert import prompt_list
from mii.rpc.deployment import free_port
from mii.rpc.deployment_config import DeploymentConfig
from mii.rpc.http import field_policy
from mii.rpc.http.server import start_gateway
from mii.rpc.pool import Metrics

NEW = 6
GREEDY = {"do_sample": False, "max_new_tokens": NEW, "ignore_eos": True}
TEXTS = ["DeepSpeed is", "Seattle is a city"]
CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "DeepSpeed is"},
]
# ChatML whose system turn may come from a template variable (chat_template_kwargs).
TEMPLATE = (
    "{% if persona %}{{ '<|im_start|>system\\n' + persona + '<|im_end|>\\n' }}{% endif %}"
    + CHATML_TEMPLATE
)


@pytest.fixture(scope="module")
def tok():
    tok = chatml_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("token-prompts-llama")
    save_checkpoint(path, tiny_config("llama", tok), tok)
    return str(path)


@pytest.fixture(scope="module")
def pipe(model_path):
    with mii.pipeline(model_path, max_num_seqs=4) as p:
        yield p


@pytest.fixture(scope="module")
def served(model_path, tmp_path_factory):
    cache = tmp_path_factory.mktemp("mii-cache")
    with served_deployment(model_path, cache, "token-prompts", max_num_seqs=4) as deployment:
        yield deployment


def assert_400(response: httpx.Response, param: str) -> dict:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param, response.text
    return error


def template_ids(tok, messages, **options) -> list[int]:
    options = {"add_generation_prompt": True, **options}
    encoded = tok.apply_chat_template(messages, tokenize=True, return_dict=True, **options)
    return list(encoded["input_ids"])


# ----- the shapes of a prompt ------------------------------------------------------------


def test_prompt_shapes():
    assert prompt_batch("a") == ["a"]
    assert prompt_batch([5, 6]) == [[5, 6]]  # one prompt, not two
    assert prompt_batch(((5, 6), [7])) == [[5, 6], [7]]
    assert prompt_batch(["a", [7]]) == ["a", [7]]  # the engine takes a mix
    with pytest.raises(InvalidRequestError, match="all texts or all token-id") as err:
        prompt_list(["a", [7]])  # one request on the wire holds one kind
    assert err.value.field == "prompts"
    for bad in (None, 5, b"a", [], [[]], [1, "a"], [True], [-1], [2**63], [[1], None], {"a": 1}):
        with pytest.raises(InvalidRequestError) as err:
            prompt_batch(bad)
        assert err.value.field == "prompts", bad
    with pytest.raises(InvalidRequestError, match="booleans are not token ids"):
        prompt_batch([True, False])  # (read as two prompts: the message said only "got True")


def test_completions_name_their_choices_cap_before_the_prompt_limit():
    """/v1/completions: past 1,024 prompts (the choices cap, prompts times n) the 400
    says that cap, for 1,025 prompts as for 2,000; 256 prompts (lm-evaluation-harness's
    --batch_size 256) are one request; one token-id prompt of 2,000 ids is one prompt."""
    from pydantic import ValidationError

    from mii.rpc.http.protocol import MAX_CHOICES, CompletionRequest

    for count in (MAX_CHOICES + 1, 2000):
        for prompt in (["a"] * count, [[5]] * count):
            with pytest.raises(ValidationError, match=f"at most {MAX_CHOICES} choices"):
                CompletionRequest(prompt=prompt)
    assert len(CompletionRequest(prompt=["a"] * MAX_CHOICES).prompt) == MAX_CHOICES
    assert MAX_CHOICES >= 256 and len(CompletionRequest(prompt=[[5, 6]] * 256).prompt) == 256
    assert CompletionRequest(prompt=[5] * 2000).prompt == [5] * 2000


def test_pipeline_and_engine_take_token_ids(pipe, tok):
    ids = [tok(t).input_ids for t in TEXTS]
    by_text = pipe(TEXTS, **GREEDY)
    [one] = pipe(ids[0], **GREEDY)  # a flat list is one prompt
    assert (one.generated_text, one.prompt_length) == (by_text[0].generated_text, len(ids[0]))
    assert [r.token_ids for r in pipe(ids, **GREEDY)] == [r.token_ids for r in by_text]
    # AsyncEngine.generate reads prompts the same way (run on the pipeline's loop).
    [again] = pipe._runner.submit(pipe.engine.generate(ids[0], **GREEDY)).result()
    assert again.token_ids == one.token_ids


# ----- /v1/completions with token ids ---------------------------------------------------------


def test_completions_take_token_ids(served, pipe, tok):
    oai, model = served.oai, served.model
    ids = [tok(t).input_ids for t in TEXTS]
    refs = pipe(TEXTS, **GREEDY)
    options = dict(model=model, max_tokens=NEW, temperature=0, extra_body={"ignore_eos": True})

    one = oai.completions.create(prompt=ids[0], **options)
    assert [c.text for c in one.choices] == [refs[0].generated_text]
    assert one.usage.prompt_tokens == len(ids[0])
    assert one.usage.completion_tokens == NEW

    both = oai.completions.create(prompt=ids, **options)
    assert [c.index for c in both.choices] == [0, 1]
    assert [c.text for c in both.choices] == [r.generated_text for r in refs]
    assert both.usage.prompt_tokens == len(ids[0]) + len(ids[1])

    # echo: the decoded prompt (special tokens skipped) before the text.
    echoed = oai.completions.create(prompt=ids[1], echo=True, **options)
    assert echoed.choices[0].text == TEXTS[1] + refs[1].generated_text

    chunks = list(
        oai.completions.create(
            prompt=ids[0], stream=True, stream_options={"include_usage": True}, **options
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == refs[0].generated_text
    assert chunks[-1].usage.prompt_tokens == len(ids[0])

    # Raw HTTP, as lm-eval's local-completions sends it.
    body = {"model": model, "prompt": ids, "max_tokens": NEW, "temperature": 0, "ignore_eos": True}
    response = served.http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    assert [c["text"] for c in response.json()["choices"]] == [r.generated_text for r in refs]


def test_bad_token_id_prompts_get_400_naming_prompt(served, tok):
    post = served.http.post
    ok = {"model": served.model, "max_tokens": 2}
    vocab = len(tok)
    for prompt in ([], [[]], [-1], [vocab], [[1], [vocab + 5]], [1, "a"], [[1], "a"], [True],
                   [1.5], [2**64], [[1, 2], 3], {"ids": [1]}):  # fmt: skip
        assert_400(post("/v1/completions", json={**ok, "prompt": prompt}), "prompt")
    # The message names the id outside the vocabulary and the vocabulary's size, on
    # the HTTP routes and in the engine (the pipeline, gRPC) alike.
    message = post("/v1/completions", json={**ok, "prompt": [1, vocab + 5]}).text
    assert f"token id {vocab + 5}," in message and f"[0, {vocab})" in message, message
    with pytest.raises(mii.InvalidRequestError) as engine_said:
        served.client.generate([1, vocab + 5], max_new_tokens=2)
    assert f"token id {vocab + 5}," in str(engine_said.value) and f"[0, {vocab})" in str(
        engine_said.value
    )
    # Streamed, refused whole before the first event (a good prompt first).
    stream = {**ok, "prompt": [[1, 2], [vocab]], "stream": True}
    assert_400(post("/v1/completions", json=stream), "prompt")


class _UnreachablePool:
    """A pool that no request may reach (a call fails the request with a 500)."""

    def __init__(self) -> None:
        self.replicas = []
        self.metrics = Metrics()

    async def generate(self, prompts, params, timeout=None):
        raise AssertionError("the request reached the pool")

    def stream(self, prompt, params, timeout=None, announce=False):
        raise AssertionError("the request reached the pool")


def test_unknown_ids_are_refused_by_the_gateway(model_path, tok):
    """Before any replica is asked: a streamed request of several prompts is refused
    whole, whichever of its prompts would have failed first in the engine."""

    async def scenario():
        config = DeploymentConfig(model=model_path, restful_api_port=free_port())
        info = mii_pb2.ModelInfoReply(deployment_name="d", model=model_path, max_length=256)
        gateway = await start_gateway(_UnreachablePool(), info, config)
        try:
            async with httpx.AsyncClient(base_url=gateway.url, timeout=60) as http:
                for stream in (False, True):
                    body = {"prompt": [[1, 2], [len(tok)]], "stream": stream}
                    assert_400(await http.post("/v1/completions", json=body), "prompt")
        finally:
            await gateway.stop()

    asyncio.run(scenario())


def test_client_and_mii_route_take_token_ids(served, pipe, tok):
    client = served.client
    ids = [tok(t).input_ids for t in TEXTS]
    refs = [r.token_ids for r in pipe(TEXTS, **GREEDY)]
    assert [r.token_ids for r in client.generate(ids[0], **GREEDY)] == refs[:1]
    assert [r.token_ids for r in client.generate(ids, **GREEDY)] == refs
    assert [t for p in client.stream(ids[1], **GREEDY) for t in p.token_ids] == refs[1]
    answers = asyncio.run(client.agenerate(ids, **GREEDY))
    assert [r.token_ids for r in answers] == refs
    with pytest.raises(InvalidRequestError, match="all texts or all token-id"):
        client.generate([TEXTS[0], ids[1]], **GREEDY)

    url = f"/mii/{served.name}"
    for prompts, want in ((ids[0], refs[:1]), (ids, refs)):
        response = served.http.post(url, json={"prompts": prompts, **GREEDY})
        assert response.status_code == 200, response.text
        assert [r["token_ids"] for r in response.json()] == want
        assert response.json()[0]["prompt_length"] == len(ids[0])
    for prompts in ([TEXTS[0], ids[1]], [-3], [[]]):
        response = served.http.post(url, json={"prompts": prompts, **GREEDY})
        assert response.status_code == 400 and response.json()["error"]["field"] == "prompts"


# ----- /tokenize and /detokenize ---------------------------------------------------------------


def test_tokenize_and_detokenize_a_prompt(served, tok):
    http = served.http
    text = TEXTS[1]
    answer = http.post("/tokenize", json={"model": served.model, "prompt": text}).json()
    ids = tok(text).input_ids
    assert ids[0] == tok.bos_token_id
    assert answer == {"count": len(ids), "max_model_len": 256, "tokens": ids}
    # The ids a completion of that text is given: its usage counts them.
    completion = served.oai.completions.create(model=served.model, prompt=text, max_tokens=1)
    assert completion.usage.prompt_tokens == answer["count"]

    bare = http.post(
        "/tokenize", json={"prompt": text, "add_special_tokens": False, "return_token_strs": True}
    ).json()
    assert bare["tokens"] == ids[1:]
    assert bare["token_strs"] == tok.convert_ids_to_tokens(ids[1:])
    assert http.post("/detokenize", json={"tokens": bare["tokens"]}).json() == {"prompt": text}
    assert http.post("/detokenize", json={"tokens": ids}).json() == {"prompt": tok.decode(ids)}


def test_tokenize_messages_gives_the_chat_routes_ids(served, tok):
    http = served.http
    ids = template_ids(tok, CHAT)
    answer = http.post("/tokenize", json={"model": served.model, "messages": CHAT}).json()
    assert answer["tokens"] == ids and answer["count"] == len(ids)
    chat = served.oai.chat.completions.create(model=served.model, messages=CHAT, max_tokens=1)
    assert chat.usage.prompt_tokens == len(ids)

    def tokens(**options):
        response = http.post("/tokenize", json={"messages": CHAT, **options})
        assert response.status_code == 200, response.text
        return response.json()["tokens"]

    assert tokens(add_generation_prompt=False) == template_ids(
        tok, CHAT, add_generation_prompt=False
    )
    assert tokens(continue_final_message=True) == template_ids(
        tok, CHAT, add_generation_prompt=False, continue_final_message=True
    )
    assert tokens(add_special_tokens=True) == [tok.bos_token_id, *ids]  # ChatML has no BOS
    persona = {"persona": "You are terse."}
    assert tokens(chat_template_kwargs=persona) == template_ids(tok, CHAT, **persona)
    assert tokens(chat_template_kwargs=persona) != ids
    # Text parts are joined with a line break (as vLLM: separate blocks do not run together).
    parts = [{"role": "user", "content": [{"type": "text", "text": t} for t in ("a", "b")]}]
    joined = [{"role": "user", "content": "a\nb"}]
    assert tokens(messages=parts) == template_ids(tok, joined)


def test_tokenize_errors_name_the_field(served, tok):
    post = served.http.post
    cases = [
        ("/tokenize", {}, "prompt"),
        ("/tokenize", {"prompt": "a", "messages": CHAT}, "prompt"),
        ("/tokenize", {"prompt": 5}, "prompt"),
        ("/tokenize", {"prompt": "a\ud800"}, "prompt"),
        ("/tokenize", {"prompt": "a", "frobnicate": 1}, "frobnicate"),
        ("/tokenize", {"prompt": "a", "add_generation_prompt": True}, "add_generation_prompt"),
        ("/tokenize", {"messages": []}, "messages"),
        ("/tokenize", {"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        (
            "/tokenize",
            {"messages": CHAT, "add_generation_prompt": True, "continue_final_message": True},
            "continue_final_message",
        ),
        (
            "/tokenize",
            {"messages": CHAT, "chat_template_kwargs": {"tokenize": False}},
            "chat_template_kwargs",
        ),
        (
            "/tokenize",
            {"messages": CHAT, "add_special_tokens": True, "chat_template_kwargs": {"tools": 1}},
            "chat_template_kwargs",
        ),
        ("/detokenize", {}, "tokens"),
        ("/detokenize", {"tokens": [1, -1]}, "tokens"),
        ("/detokenize", {"tokens": [len(tok)]}, "tokens"),
        ("/detokenize", {"tokens": [2**70]}, "tokens"),
        ("/detokenize", {"tokens": ["1"]}, "tokens.0"),
        ("/detokenize", {"tokens": [True]}, "tokens.0"),
        ("/detokenize", {"tokens": [1.0]}, "tokens.0"),
        ("/detokenize", {"tokens": "1 2"}, "tokens"),
        ("/detokenize", {"tokens": [1], "skip": True}, "skip"),
    ]
    for path, body, param in cases:
        # json.dumps escapes the lone surrogate (httpx's json= cannot encode it).
        response = post(
            path, content=json.dumps(body), headers={"content-type": "application/json"}
        )
        assert_400(response, param)
    for path, body in (("/tokenize", {"prompt": "a"}), ("/detokenize", {"tokens": [1]})):
        response = post(path, json={**body, "model": "gpt-9"})
        assert response.status_code == 404 and response.json()["error"]["param"] == "model"


# ----- the field policy ---------------------------------------------------------------------------

IGNORED = {
    "user": "someone",
    "safety_identifier": "hash",
    "metadata": {"run": "7", "nested": {"a": 1}},
    "store": False,
    "service_tier": "auto",
    "prompt_cache_key": "k",
    "prompt_cache_retention": "24h",
    "prompt_cache_options": {"mode": "implicit", "ttl": "30m"},
    "prediction": {"type": "content", "content": "x"},
    "reasoning_effort": "low",
    "verbosity": "low",
}
CHAT_ONLY = {"modalities": ["text"]}  # parallel_tool_calls is honoured (tool calling)


def test_ignored_fields_are_accepted_and_logged_once(served):
    http, model = served.http, served.model
    base = {"model": model, "prompt": TEXTS[0], "max_tokens": 2}
    stream_options = {"include_usage": True, "continuous_usage_stats": True}
    stream_options["include_obfuscation"] = False
    for _ in range(2):
        response = http.post("/v1/completions", json={**base, **IGNORED})
        assert response.status_code == 200, response.text
        chat = {"model": model, "messages": CHAT, "max_tokens": 2, **IGNORED, **CHAT_ONLY}
        response = http.post("/v1/chat/completions", json=chat)
        assert response.status_code == 200, response.text
        streamed = {**base, "stream": True, "stream_options": stream_options}
        with http.stream("POST", "/v1/completions", json=streamed) as response:
            assert response.status_code == 200
            assert response.read().endswith(b"data: [DONE]\n\n")
    # The SDK's own parameters.
    served.oai.chat.completions.create(
        model=model, messages=CHAT, max_tokens=2, user="u", store=False, metadata={"a": "b"}
    )
    log = registry.log_path(served.name).read_text()
    sent = {**IGNORED, **CHAT_ONLY, **{f"stream_options.{k}": v for k, v in stream_options.items()}}
    # Values that ask for nothing (clients' defaults) are ignored without a warning.
    quiet = {"store", "service_tier", "modalities", "stream_options.include_obfuscation"}
    for name, value in sent.items():
        if name in ("stream_options.include_usage", "stream_options.continuous_usage_stats"):
            continue  # honoured, not ignored
        lines = [ln for ln in log.splitlines() if f"OpenAI request field {name!r}" in ln]
        assert len(lines) == (0 if name in quiet else 1), (name, value, lines)

    # Outside the specification and mii's extensions: 400 naming the name.
    assert_400(http.post("/v1/completions", json={**base, "frobnicate": 1}), "frobnicate")
    bad_stream = {**base, "stream": True, "stream_options": {"include_usage": True, "x": 1}}
    assert_400(http.post("/v1/completions", json=bad_stream), "stream_options.x")
    # In the specification but asking for what this server cannot do: 400 too.
    chat = {"model": model, "messages": CHAT}
    for field, value in [
        ("modalities", ["text", "audio"]),
        ("audio", {"voice": "alloy", "format": "wav"}),
        ("web_search_options", {}),
        ("moderation", {"model": "omni-moderation-latest"}),
        ("functions", [{"name": "f"}]),
        ("function_call", {"name": "f"}),
        ("user", 5),
        ("store", "maybe"),
    ]:
        assert_400(http.post("/v1/chat/completions", json={**chat, field: value}), field)
    # null: asks for nothing (the SDK sends what its caller passes)
    response = http.post("/v1/chat/completions", json={**chat, "max_tokens": 2, "moderation": None})
    assert response.status_code == 200, response.text


def test_each_ignored_field_is_logged_once_per_process(monkeypatch, caplog):
    monkeypatch.setattr(field_policy, "_warned", set())
    caplog.set_level(logging.WARNING, logger=field_policy.__name__)
    from mii.rpc.http.protocol import CompletionRequest

    body = CompletionRequest(prompt="a", user="u", store=True, stream=True, stream_options={})
    assert field_policy.warn_ignored(body) == ["store", "user"]
    field_policy.warn_ignored(body)
    assert [r.getMessage().split("'")[1] for r in caplog.records] == ["store", "user"]
    # Values that ask for nothing (clients' defaults) are ignored without a warning.
    caplog.clear()
    monkeypatch.setattr(field_policy, "_warned", set())
    quiet = CompletionRequest(prompt="a", store=False, metadata=None, service_tier="auto")
    assert field_policy.warn_ignored(quiet) == ["metadata", "service_tier", "store"]
    assert caplog.records == []
    assert all(field in field_policy.IGNORED_FIELDS for field in ("user", "store", "metadata"))
