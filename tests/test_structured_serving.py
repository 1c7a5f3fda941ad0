"""Structured output through every server surface (issue 18, items 1, 4): OpenAI's
``response_format`` (json_object, json_schema) on ``/v1/completions`` and
``/v1/chat/completions``, vLLM's ``guided_json``, ``guided_regex``,
``guided_choice``, ``guided_grammar`` and ``structured_outputs``, mii's REST
route and gRPC (``json_schema``, ``regex``, ``choice``, ``grammar``); bad
constraints are a 400 / INVALID_ARGUMENT naming the field, and the deployment
keeps serving.

One deployment (one replica) of a tiny random Llama with a ChatML template: the
constraint alone makes its answers valid.
"""

from __future__ import annotations

import json
import re

import grpc
import httpx
import jsonschema
import pytest

from chat_tokenizers import chatml_tokenizer
from helpers import save_checkpoint, served_deployment, tiny_config
from json_schemas import generate_schemas
from mii.errors import InvalidRequestError
from mii.rpc import mii_pb2, mii_pb2_grpc
from mii.rpc.status import FIELD_METADATA

PROMPT = "DeepSpeed is"
USER = [{"role": "user", "content": "Describe a person as JSON."}]
SCHEMA = generate_schemas(3, seed=11)[2]
PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 99},
    },
    "required": ["name", "age"],
    "additionalProperties": False,
}
REGEX = r"[A-Z][a-z]{1,4} [0-9]{2}"
BUDGET = 200


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tok = chatml_tokenizer()
    path = tmp_path_factory.mktemp("structured-llama")
    save_checkpoint(path, tiny_config("llama", tok), tok)
    cache = tmp_path_factory.mktemp("mii-cache")
    with served_deployment(str(path), cache, "structured", max_num_seqs=8) as deployment:
        yield deployment


def valid(text: str, schema: dict) -> bool:
    jsonschema.validate(json.loads(text), schema)
    return True


def matches(pattern: str):
    return lambda text: re.fullmatch(pattern, text) is not None


def test_response_format_on_chat_and_completions(served):
    json_schema = {"name": "person", "schema": PERSON, "strict": True}
    for response_format, schema in (
        ({"type": "json_schema", "json_schema": json_schema}, PERSON),
        ({"type": "json_object"}, {"type": "object"}),
    ):
        chat = served.oai.chat.completions.create(
            model=served.name,
            messages=USER,
            max_tokens=BUDGET,
            response_format=response_format,
            n=2,
            seed=3,
        )
        for choice in chat.choices:
            assert choice.finish_reason == "stop"
            valid(choice.message.content, schema)
        completion = served.oai.completions.create(
            model=served.name,
            prompt=PROMPT,
            max_tokens=BUDGET,
            extra_body={"response_format": response_format},
        )
        assert completion.choices[0].finish_reason == "stop"
        valid(completion.choices[0].text, schema)
    # Streamed: the deltas join to a valid object.
    stream = served.oai.chat.completions.create(
        model=served.name,
        messages=USER,
        max_tokens=BUDGET,
        response_format={"type": "json_schema", "json_schema": json_schema},
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    valid(text, PERSON)


def test_vllm_fields(served):
    cases = [
        ({"guided_json": SCHEMA}, lambda t: valid(t, SCHEMA)),
        ({"guided_json": json.dumps(SCHEMA)}, lambda t: valid(t, SCHEMA)),
        ({"guided_regex": REGEX}, matches(REGEX)),
        ({"guided_choice": ["left", "right"]}, lambda t: t in ("left", "right")),
        ({"guided_grammar": 'root ::= "x" [0-9]+'}, matches(r"x\d+")),
        ({"structured_outputs": {"json": SCHEMA}}, lambda t: valid(t, SCHEMA)),
        ({"structured_outputs": {"regex": REGEX}}, matches(REGEX)),
        ({"structured_outputs": {"choice": ["up", "down"]}}, lambda t: t in ("up", "down")),
        (  # vLLM's backend tuning keys: accepted (a schema's objects get only its properties)
            {
                "structured_outputs": {
                    "json": SCHEMA,
                    "disable_additional_properties": True,
                    "disable_any_whitespace": True,
                }
            },
            lambda t: valid(t, SCHEMA),
        ),
        (  # vLLM's backend hint: accepted, no effect
            {"guided_choice": ["on", "off"], "guided_decoding_backend": "xgrammar"},
            lambda t: t in ("on", "off"),
        ),
    ]
    for extra, check in cases:
        completion = served.oai.completions.create(
            model=served.name, prompt=PROMPT, max_tokens=BUDGET, seed=1, extra_body=extra
        )
        choice = completion.choices[0]
        assert choice.finish_reason == "stop", (extra, choice.text)
        assert check(choice.text), (extra, choice.text)
        chat = served.oai.chat.completions.create(
            model=served.name, messages=USER, max_tokens=BUDGET, extra_body=extra
        )
        assert check(chat.choices[0].message.content), extra


def assert_400(response: httpx.Response, param: str, words: str = "") -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param, response.text
    assert words in error["message"], response.text


NEVER_ENDS = {
    "type": "object",
    "properties": {"a": {"type": "string", "pattern": r"[^\s\S]"}},
    "required": ["a"],
}


def test_patterns_with_characters_json_escapes(served):
    """A pattern naming a line feed, a quote and a backslash: the openai SDK's parsed
    answer holds them (xgrammar wrote them raw: unparseable JSON), in a response
    format and in a forced tool call's arguments."""
    pattern = r'^a\n"[0-9]"\\$'
    schema = {
        "type": "object",
        "properties": {"s": {"type": "string", "pattern": pattern}},
        "required": ["s"],
        "additionalProperties": False,
    }
    chat = served.oai.chat.completions.create(
        model=served.name,
        messages=USER,
        max_tokens=BUDGET,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": schema}},
        seed=5,
    )
    value = json.loads(chat.choices[0].message.content)["s"]
    assert re.fullmatch(pattern, value), value
    tool = {"type": "function", "function": {"name": "note", "parameters": schema}}
    call = served.oai.chat.completions.create(
        model=served.name,
        messages=USER,
        max_tokens=BUDGET,
        tools=[tool],
        tool_choice={"type": "function", "function": {"name": "note"}},
        seed=5,
    )
    arguments = json.loads(call.choices[0].message.tool_calls[0].function.arguments)
    assert re.fullmatch(pattern, arguments["s"]), arguments


def test_bad_constraints_are_400_naming_the_field(served):
    completion = {"model": served.name, "prompt": PROMPT, "max_tokens": 4}
    chat = {"model": served.name, "messages": USER, "max_tokens": 4}
    bad = [
        ({"response_format": {"type": "json_schema"}}, "response_format.json_schema", ""),
        ({"response_format": {"type": "xml"}}, "response_format.type", "xml"),
        # read as plain text, or the schema dropped, before (a user trial)
        ({"response_format": {}}, "response_format.type", "type None is not supported"),
        (
            {"response_format": {"type": "json_object", "schema": {"type": "object"}}},
            "response_format.schema",
            "json_schema",
        ),
        (
            {"response_format": {"type": "json_object", "json_schema": {"schema": {}}}},
            "response_format.json_schema",
            "json_schema",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"strict": "yes"}}},
            "response_format.json_schema.strict",
            "true or false",
        ),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": 5}}},
            "response_format.json_schema.name",
            "a string",
        ),
        (  # a misspelt key: the schema constrained nothing (a user trial)
            {"response_format": {"type": "json_schema", "json_schema": {"Schema": {}}}},
            "response_format.json_schema.Schema",
            "takes name, description, schema and strict",
        ),
        (  # compiled by the replica's engine: its error names the request's field
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 5}}}},
            "response_format",
            "",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "array", "contains": {}}},
                }
            },
            "response_format",
            "contains",
        ),
        ({"guided_regex": "a(b"}, "guided_regex", "parenthesis"),
        ({"guided_grammar": "root ::= "}, "guided_grammar", ""),
        ({"guided_choice": []}, "guided_choice", ""),
        ({"guided_json": "{oops"}, "guided_json", "JSON"),
        ({"structured_outputs": {"regex": "(?!x)y"}}, "structured_outputs.regex", "lookaround"),
        ({"structured_outputs": {"xml": "<a/>"}}, "structured_outputs.xml", "xml"),
        ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "at most one"),
        ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex", ""),
        # no text matches these (a 500 before: sampling had no token to choose)
        ({"guided_regex": r"[^\s\S]"}, "guided_regex", "matches no text"),
        ({"guided_grammar": 'root ::= root "a"'}, "guided_grammar", "matches no text"),
        # ... and this one only from inside the string it opens
        ({"guided_json": NEVER_ENDS, "max_tokens": 12}, "guided_json", "admits no further text"),
    ]
    for extra, param, words in bad:
        for route, body in (("/v1/completions", completion), ("/v1/chat/completions", chat)):
            assert_400(served.http.post(route, json={**body, **extra}), param, words)
    streamed = {**completion, "stream": True, "guided_regex": "a(b"}
    assert_400(served.http.post("/v1/completions", json=streamed), "guided_regex")
    # Stuck after the stream began: an error event naming the field, then [DONE]
    streamed = {**completion, "stream": True, "max_tokens": 12, "guided_json": NEVER_ENDS}
    events = served.http.post("/v1/completions", json=streamed).text.split("\n\n")
    error = json.loads(events[-3].removeprefix("data: "))["error"]
    assert error["param"] == "guided_json" and error["type"] == "invalid_request_error", error
    assert events[-2] == "data: [DONE]"
    # The deployment still serves.
    ok = served.http.post("/v1/completions", json={**completion, "guided_choice": ["fine"]})
    assert ok.status_code == 200 and ok.json()["choices"][0]["text"] == "fine"


def test_rest_route_and_grpc(served):
    url = f"/mii/{served.name}"
    body = {
        "prompts": [PROMPT, "Seattle is"],
        "max_new_tokens": BUDGET,
        "json_schema": SCHEMA,
        "seed": 2,
    }
    response = served.http.post(url, json=body)
    assert response.status_code == 200, response.text
    for answer in response.json():
        assert answer["finish_reason"] == "stop"
        valid(answer["generated_text"], SCHEMA)
    for extra, field in (
        ({"json_schema": {"type": "nonsense"}}, "json_schema"),
        ({"regex": "a(b"}, "regex"),
    ):
        plain = {k: v for k, v in body.items() if k != "json_schema"}
        refused = served.http.post(url, json={**plain, **extra})
        assert refused.status_code == 400 and refused.json()["error"]["field"] == field

    # mii.client (gRPC)
    for options, check in (
        ({"json_schema": SCHEMA}, lambda t: valid(t, SCHEMA)),
        ({"regex": REGEX}, matches(REGEX)),
        ({"choice": ["a b", "c"]}, lambda t: t in ("a b", "c")),
        ({"grammar": 'root ::= "[" [0-9] "]"'}, matches(r"\[\d\]")),
    ):
        [answer] = served.client.generate([PROMPT], max_new_tokens=BUDGET, seed=2, **options)
        assert answer.finish_reason == "stop"
        assert check(answer.generated_text), (options, answer.generated_text)
    for options, field in (({"regex": "a(b"}, "regex"), ({"grammar": "x"}, "grammar")):
        with pytest.raises(InvalidRequestError) as err:
            served.client.generate([PROMPT], max_new_tokens=2, **options)
        assert err.value.field == field

    # Raw gRPC: the typed fields 40-44.
    with grpc.insecure_channel(served.client.address) as channel:
        stub = mii_pb2_grpc.MiiStub(channel)
        options_pb = mii_pb2.GenerationOptions(max_new_tokens=BUDGET, choice=["p", "q"])
        reply = stub.Generate(mii_pb2.GenerateRequest(prompts=[PROMPT], options=options_pb))
        assert reply.responses[0].generated_text in ("p", "q")
        for bad, field in (
            (mii_pb2.GenerationOptions(json_schema="{oops"), "json_schema"),
            (mii_pb2.GenerationOptions(regex="a(b"), "regex"),
            (mii_pb2.GenerationOptions(regex="a", json_object=True), None),
        ):
            with pytest.raises(grpc.RpcError) as err:
                stub.Generate(mii_pb2.GenerateRequest(prompts=[PROMPT], options=bad))
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            if field is not None:
                assert dict(err.value.trailing_metadata())[FIELD_METADATA] == field
