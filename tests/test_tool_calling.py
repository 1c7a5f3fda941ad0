"""Tool calling on /v1/chat/completions (issue 18 item 3), on loopback.

- A gateway over a scripted pool (it answers what a tool-calling model would
  write) checks the route: the prompt carries the tools, ``auto`` answers are read
  by the hermes parser, whole and streamed, and bad input is a 400 naming the field.
- A real deployment of a tiny random-weight model checks that ``"required"`` and a
  named function give calls whose arguments validate against the parameters
  (the constraint alone guarantees it), through the ``openai`` SDK, streamed and
  not, and LangChain's ``bind_tools``.
"""

from __future__ import annotations

import json
import uuid

import httpx
import jsonschema
import openai
import pytest

import mii
from chat_tokenizers import QWEN_TOOLS_TEMPLATE, hermes_tokenizer
from helpers import save_checkpoint, tiny_config
from mii.cli import build_parser
from mii.cli.errors import CliError
from mii.cli.serve import serve_config
from mii.rpc.deployment import free_port
from mii.rpc.deployment_config import DeploymentConfig
from scripted_gateway import ScriptedPool, with_gateway

PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Oslo", "Rome"]},
        "metric": {"type": "boolean"},
    },
    "required": ["city", "metric"],
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather of a city",
        "parameters": PARAMETERS,
    },
}
ALERT = {
    "type": "function",
    "function": {
        "name": "set_alert",
        "parameters": {
            "type": "object",
            "properties": {"level": {"enum": ["low", "high"]}},
            "required": ["level"],
            "additionalProperties": False,
        },
    },
}
TOOLS = [WEATHER, ALERT]
USER = [{"role": "user", "content": "What is the weather in Paris?"}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}

HERMES_ANSWER = (
    "Let me check.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "metric": true}}\n'
    '</tool_call>\n<tool_call>\n{"name": "set_alert", "arguments": {"level": "low"}}\n</tool_call>'
)


def test_auto_tool_calls_are_parsed_whole_and_streamed(llama):
    pool = ScriptedPool(HERMES_ANSWER)

    async def scenario(client, gateway):
        answer = await client.chat.completions.create(
            model="d", messages=USER, tools=TOOLS, max_tokens=50
        )
        choice = answer.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content == "Let me check."
        calls = choice.message.tool_calls
        assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
            ("get_weather", {"city": "Paris", "metric": True}),
            ("set_alert", {"level": "low"}),
        ]
        assert all(c.id.startswith("call_") and c.type == "function" for c in calls)
        prompt, params = pool.sent[-1]
        # The tools reached the model through the template; tags stay in the text.
        assert params["skip_special_tokens"] is False and "json_schema" not in params
        tokenizer = gateway.app.state.mii.tokenizer
        text = tokenizer.decode(prompt)
        assert "<tools>" in text and "The weather of a city" in text and '"set_alert"' in text

        stream = await client.chat.completions.create(
            model="d", messages=USER, tools=TOOLS, max_tokens=50, stream=True
        )
        content, calls, finish = "", {}, None
        async for chunk in stream:
            delta = chunk.choices[0].delta
            content += delta.content or ""
            for call in delta.tool_calls or ():
                assert call.id.startswith("call_") and call.type == "function"
                calls[call.index] = (call.function.name, json.loads(call.function.arguments))
            finish = chunk.choices[0].finish_reason or finish
        assert content.strip() == "Let me check." and "<" not in content
        assert calls == {
            0: ("get_weather", {"city": "Paris", "metric": True}),
            1: ("set_alert", {"level": "low"}),
        }
        assert finish == "tool_calls"

        # parallel_tool_calls false: the first call only.
        one = await client.chat.completions.create(
            model="d", messages=USER, tools=TOOLS, parallel_tool_calls=False
        )
        assert [c.function.name for c in one.choices[0].message.tool_calls] == ["get_weather"]
        # "none": the text is the content, as the model wrote it.
        none = await client.chat.completions.create(
            model="d", messages=USER, tools=TOOLS, tool_choice="none"
        )
        assert none.choices[0].message.content == HERMES_ANSWER
        assert not none.choices[0].message.tool_calls
        assert none.choices[0].finish_reason == "stop"

    with_gateway(llama, pool, scenario, tool_call_parser="hermes")


def test_required_and_named_send_a_schema_and_read_the_json(llama):
    pool = ScriptedPool('{"city": "Oslo", "metric": false}')

    async def scenario(client, gateway):
        named = await client.chat.completions.create(
            model="d", messages=USER, tools=TOOLS, tool_choice=NAMED
        )
        assert json.loads(pool.sent[-1][1]["json_schema"]) == PARAMETERS
        call = named.choices[0].message.tool_calls[0]
        assert call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Oslo", "metric": False}
        assert named.choices[0].finish_reason == "stop"  # a named call: as OpenAI's and vLLM's

        pool.text = '[{"name": "set_alert", "parameters": {"level": "high"}}]'
        required = await client.chat.completions.create(
            model="d", messages=USER, tools=TOOLS, tool_choice="required"
        )
        schema = json.loads(pool.sent[-1][1]["json_schema"])
        assert schema["type"] == "array" and len(schema["items"]["anyOf"]) == 2
        call = required.choices[0].message.tool_calls[0]
        assert (call.function.name, json.loads(call.function.arguments)) == (
            "set_alert",
            {"level": "high"},
        )
        assert required.choices[0].message.content is None

        # Streamed: the answer opens with content null, as OpenAI's (it was "", which the
        # SDK's stream helper made the final message's content, with an empty content event).
        async with client.chat.completions.stream(
            model="d", messages=USER, tools=TOOLS, tool_choice="required"
        ) as stream:
            kinds = [event.type async for event in stream]
            final = await stream.get_final_completion()
        assert "content.delta" not in kinds
        assert final.choices[0].message.content is None
        assert final.choices[0].message.tool_calls[0].function.name == "set_alert"
        chunks = [
            c
            async for c in await client.chat.completions.create(
                model="d", messages=USER, tools=TOOLS, tool_choice="none", stream=True
            )
        ]
        assert chunks[0].choices[0].delta.content == ""  # not forced: vLLM's opening

    with_gateway(llama, pool, scenario)  # no parser: "required" and named need none


def test_a_named_call_cut_by_max_tokens_is_a_call_streamed_and_whole(llama):
    """Streamed, a named call's arguments go out as tool_calls deltas before any
    cut is known; the whole answer was the cut JSON as content, no tool_calls (an
    app showed raw JSON to its user in one mode only). Now a call in both, with
    finish_reason "length"; a cut "required" list stays content in both."""
    cut = '{"city": "Paris, Fr'
    pool = ScriptedPool(cut, finish="length")

    async def scenario(client, gateway):
        whole = await client.chat.completions.create(
            model="d", messages=USER, tools=TOOLS, tool_choice=NAMED
        )
        [choice] = whole.choices
        assert choice.finish_reason == "length" and choice.message.content is None
        [call] = choice.message.tool_calls
        assert (call.function.name, call.function.arguments) == ("get_weather", cut)

        stream = await client.chat.completions.create(
            model="d", messages=USER, tools=TOOLS, tool_choice=NAMED, stream=True
        )
        chunks = [c async for c in stream]
        deltas = [d for c in chunks for d in (c.choices[0].delta.tool_calls or [])]
        assert deltas[0].function.name == "get_weather"
        assert "".join(d.function.arguments for d in deltas) == cut
        assert chunks[-1].choices[0].finish_reason == "length"

        # The Responses API: the call's item is the incomplete one, whole and streamed.
        named = {"type": "function", "name": "get_weather"}
        flat = {"type": "function", **WEATHER["function"]}
        answer = await client.responses.create(
            model="d", input="Weather?", tools=[flat], tool_choice=named
        )
        [item] = answer.output
        assert (item.type, item.status, item.arguments) == ("function_call", "incomplete", cut)
        assert answer.status == "incomplete"
        events = [
            e
            async for e in await client.responses.create(
                model="d", input="Weather?", tools=[flat], tool_choice=named, stream=True
            )
        ]
        [done] = [e.item for e in events if e.type == "response.output_item.done"]
        assert (done.type, done.status) == ("function_call", "incomplete")
        assert events[-1].type == "response.incomplete"

        pool.text = '[{"name": "set_alert", "param'
        for stream in (False, True):
            answer = await client.chat.completions.create(
                model="d", messages=USER, tools=TOOLS, tool_choice="required", stream=stream
            )
            if stream:
                chunks = [c async for c in answer]
                content = "".join(c.choices[0].delta.content or "" for c in chunks)
                assert not any(c.choices[0].delta.tool_calls for c in chunks)
                assert chunks[-1].choices[0].finish_reason == "length"
            else:
                content = answer.choices[0].message.content
                assert answer.choices[0].message.tool_calls is None
                assert answer.choices[0].finish_reason == "length"
            assert content == pool.text

    with_gateway(llama, pool, scenario)


def test_bad_tool_requests_are_400_naming_the_field(llama):
    pool = ScriptedPool("x")

    async def scenario(client, gateway):
        async def param_of(**fields) -> str:
            with pytest.raises(openai.BadRequestError) as err:
                await client.chat.completions.create(model="d", messages=USER, **fields)
            return err.value.body["param"]

        unknown = {"type": "function", "function": {"name": "nope"}}
        assert await param_of(tools=TOOLS, tool_choice=unknown) == "tool_choice"
        assert await param_of(tool_choice="required") == "tool_choice"
        assert await param_of(tool_choice=NAMED) == "tool_choice"
        # Without --tool-call-parser "auto" (the default with tools) cannot be honoured.
        assert await param_of(tools=TOOLS) == "tool_choice"
        assert await param_of(tools=TOOLS, tool_choice="auto") == "tool_choice"
        bad_schema = {"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}
        assert await param_of(tools=[bad_schema]) == "tools.0.function.parameters"
        # Arguments are an object: a string or array schema was accepted, and its call's
        # arguments ('"11:9"', '[0]') broke LangChain's parsing (user trial).
        for kind in ("string", "array", ["string", "null"]):
            scalar = {"type": "function", "function": {"name": "f", "parameters": {"type": kind}}}
            assert await param_of(tools=[scalar]) == "tools.0.function.parameters"
        assert await param_of(tools=[{"type": "function"}]) == "tools.0.function"
        # strict is true or false, as response_format's is ("yes" was taken: a user trial)
        loose = {"type": "function", "function": {"name": "f", "strict": "yes"}}
        assert await param_of(tools=[loose]) == "tools.0.function.strict"
        assert await param_of(tools=[{"type": "retrieval", "function": {"name": "f"}}]) == (
            "tools.0.type"
        )
        assert await param_of(tools=[WEATHER, WEATHER], tool_choice="required") == "tools"
        assert await param_of(tools=TOOLS, tool_choice="sometimes") == "tool_choice"
        # a named choice without its function says what a named choice is
        with pytest.raises(openai.BadRequestError) as err:
            await client.chat.completions.create(
                model="d", messages=USER, tools=TOOLS, tool_choice={"type": "function"}
            )
        assert err.value.body["param"] == "tool_choice"
        assert '"function": {"name": ...}' in err.value.body["message"]
        assert await param_of(tools=TOOLS, parallel_tool_calls="maybe") == "parallel_tool_calls"
        # A keyword the grammar engine would not enforce (pydantic's set[int]) is named
        # where the user wrote it: which tool, and the path inside its parameters.
        unique = {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}
        sets = {"type": "object", "properties": {"xs": unique}}
        tagged = {"type": "function", "function": {"name": "tag", "parameters": sets}}
        for choice in ("required", {"type": "function", "function": {"name": "tag"}}):
            with pytest.raises(openai.BadRequestError) as err:
                await client.chat.completions.create(
                    model="d", messages=USER, tools=[*TOOLS, tagged], tool_choice=choice
                )
            assert err.value.body["param"] == "tools"
            message = err.value.body["message"]
            assert f"tools[{len(TOOLS)}] ('tag')" in message and "#/properties/xs" in message
        # A forced call is a constraint of its own: not with response_format too.
        json_object = {"type": "json_object"}
        assert await param_of(tools=TOOLS, tool_choice=NAMED, response_format=json_object) == (
            "tool_choice"
        )
        # A tool result's call id is a string when given (5 reached the template).
        result = {"role": "tool", "tool_call_id": 5, "content": "22"}
        with pytest.raises(openai.BadRequestError) as err:
            await client.chat.completions.create(model="d", messages=[*USER, result])
        assert err.value.body["param"] == "messages.1.tool_call_id"
        assert not pool.sent  # nothing reached the engine

    with_gateway(llama, pool, scenario)


def test_tool_call_parser_option_and_flags(llama, tmp_path, monkeypatch):
    monkeypatch.setenv("MII_CACHE_DIR", str(tmp_path))
    assert DeploymentConfig.parse(llama, tool_call_parser="hermes").tool_call_parser == "hermes"
    with pytest.raises(ValueError, match="llama3_json"):
        DeploymentConfig.parse(llama, tool_call_parser="mistral-ish")
    # mii serve: --tool-call-parser, and vLLM's --enable-auto-tool-choice beside it.
    parse = build_parser().parse_args
    flags = ["serve", "m", "--enable-auto-tool-choice", "--tool-call-parser", "llama3_json"]
    assert serve_config(parse(flags)).tool_call_parser == "llama3_json"
    with pytest.raises(CliError, match="--tool-call-parser"):
        serve_config(parse(["serve", "m", "--enable-auto-tool-choice"]))
    with pytest.raises(CliError, match="hermes"):
        serve_config(parse(["serve", "m", "--tool-call-parser", "nope"]))


# ----- a real deployment --------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    tok = hermes_tokenizer()
    path = tmp_path_factory.mktemp("tool-calling-llama")
    save_checkpoint(path, tiny_config("llama", tok, max_position_embeddings=2048), tok)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MII_CACHE_DIR", str(tmp_path_factory.mktemp("mii-cache")))
        port = free_port()
        client = mii.serve(
            str(path),
            deployment_name=f"tools-{uuid.uuid4().hex[:8]}",
            enable_restful_api=True,
            restful_api_port=port,
            port=free_port(),
            max_num_seqs=4,
            num_kv_blocks=256,  # the tools make prompts of ~700 tokens
            tool_call_parser="hermes",
        )
        try:
            yield f"http://127.0.0.1:{port}/v1", str(path)
        finally:
            client.terminate_server()


def _check_call(name: str, arguments: str) -> None:
    """The call names a tool and its arguments validate against its parameters."""
    tool = next(t for t in TOOLS if t["function"]["name"] == name)
    jsonschema.validate(json.loads(arguments), tool["function"]["parameters"])


def test_forced_tool_calls_validate_on_a_real_model(served):
    url, model = served
    oai = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=120)
    common = {"model": model, "messages": USER, "tools": TOOLS, "max_tokens": 120, "seed": 3}
    # "required" with parallel calls may list calls until max_tokens on random weights:
    # one call (the schema's maxItems) keeps the answer complete.
    for choice, extra in [(NAMED, {}), ("required", {"parallel_tool_calls": False})]:
        answer = oai.chat.completions.create(**common, **extra, tool_choice=choice, n=2)
        for c in answer.choices:
            assert c.finish_reason == ("stop" if choice is NAMED else "tool_calls"), c
            assert c.message.tool_calls
            assert len(c.message.tool_calls) == 1
            for call in c.message.tool_calls:
                _check_call(call.function.name, call.function.arguments)
                if choice is NAMED:
                    assert call.function.name == "get_weather"
        # Streamed: tool_calls deltas, put together by their index.
        calls: dict[int, list[str]] = {}
        finish = None
        streamed = oai.chat.completions.create(**common, **extra, tool_choice=choice, stream=True)
        for chunk in streamed:
            for call in chunk.choices[0].delta.tool_calls or ():
                entry = calls.setdefault(call.index, ["", ""])
                entry[0] += call.function.name or ""
                entry[1] += call.function.arguments or ""
            finish = chunk.choices[0].finish_reason or finish
        assert finish == ("stop" if choice is NAMED else "tool_calls") and calls
        for name, arguments in calls.values():
            _check_call(name, arguments)
    # The next turn: the call and its result (role "tool") go back in the messages.
    first = oai.chat.completions.create(**common, tool_choice=NAMED).choices[0].message
    history = [
        *USER,
        first.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": first.tool_calls[0].id, "content": "sunny, 21 C"},
    ]
    again = oai.chat.completions.create(**{**common, "messages": history}, tool_choice="none")
    assert again.choices[0].finish_reason in ("stop", "length")
    # A valid JSON schema that the grammar engine cannot enforce: 400 naming the tools.
    odd = {"type": "object", "not": {"required": ["x"]}}
    odd_tools = [{"type": "function", "function": {"name": "f", "parameters": odd}}]
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError) as err:
            oai.chat.completions.create(
                **{**common, "tools": odd_tools}, tool_choice="required", stream=stream
            )
        assert err.value.body["param"] == "tools", err.value.body
    # A tool written in draft-07 (its own "$schema"): its tuple is a tuple under
    # "required" too, whose wrapping schema is 2020-12 (it was refused there, naming
    # the wrapper's path, while a named choice took it: a user trial).
    pair = [{"type": "integer", "minimum": 0, "maximum": 9}, {"enum": ["a", "b"]}]
    tuple_schema = {
        "$schema": "http://json-schema.org/draft-07/schema#",
        "type": "object",
        "properties": {"pt": {"type": "array", "items": pair, "additionalItems": False}},
        "required": ["pt"],
        "additionalProperties": False,
    }
    tuple_tools = [{"type": "function", "function": {"name": "at", "parameters": tuple_schema}}]
    for choice in ("required", {"type": "function", "function": {"name": "at"}}):
        answer = oai.chat.completions.create(
            **{**common, "tools": tuple_tools}, tool_choice=choice, parallel_tool_calls=False
        )
        [call] = answer.choices[0].message.tool_calls
        arguments = json.loads(call.function.arguments)
        jsonschema.Draft7Validator(tuple_schema).validate(arguments)
        assert len(arguments["pt"]) <= 2
    # /tokenize takes tools too, and gives the ids the chat route sent.
    base = url.removesuffix("/v1")
    tokenized = httpx.post(f"{base}/tokenize", json={"messages": history, "tools": TOOLS}).json()
    assert tokenized["count"] == again.usage.prompt_tokens
    text = httpx.post(f"{base}/detokenize", json={"tokens": tokenized["tokens"]}).json()["prompt"]
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in text
    assert '"arguments": {"city": ' in text and "The weather of a city" in text
    oai.close()


def test_the_responses_api_forces_calls_on_a_real_model(served):
    """POST /v1/responses with a named function and with "required": function_call
    items whose arguments validate, whole and streamed; text.format's schema holds."""
    url, model = served
    oai = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=120)
    flat = [{"type": "function", **tool["function"]} for tool in TOOLS]
    common = {"model": model, "input": USER, "tools": flat, "max_output_tokens": 120}
    for choice in ({"type": "function", "name": "get_weather"}, "required"):
        extra = {"parallel_tool_calls": False} if choice == "required" else {}
        answer = oai.responses.create(**common, **extra, tool_choice=choice)
        calls = [item for item in answer.output if item.type == "function_call"]
        assert answer.status == "completed" and calls, answer.output
        for call in calls:
            _check_call(call.name, call.arguments)
        events = list(oai.responses.create(**common, **extra, tool_choice=choice, stream=True))
        done = [e for e in events if e.type == "response.output_item.done"]
        assert events[-1].type == "response.completed" and done
        for event in done:
            _check_call(event.item.name, event.item.arguments)
    text = {"format": {"type": "json_schema", "name": "weather", "schema": PARAMETERS}}
    answer = oai.responses.create(model=model, input="Weather?", text=text, max_output_tokens=80)
    assert answer.status == "completed"
    jsonschema.validate(json.loads(answer.output_text), PARAMETERS)
    oai.close()


def test_langchain_bind_tools_returns_a_parsed_call(served):
    from langchain_openai import ChatOpenAI

    url, model = served
    llm = ChatOpenAI(base_url=url, api_key="x", model=model, max_tokens=120, max_retries=0)
    bound = llm.bind_tools([WEATHER], tool_choice="get_weather")
    message = bound.invoke("What is the weather in Paris?")
    assert [c["name"] for c in message.tool_calls] == ["get_weather"]
    jsonschema.validate(message.tool_calls[0]["args"], PARAMETERS)


# ----- the real SmolLM2 model ------------------------------------------------------------

CITY = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "the city name"}},
            "required": ["city"],
        },
    },
}


def test_a_real_model_fills_the_forced_call(smollm2, tmp_path, monkeypatch):
    """SmolLM2-135M-Instruct (ChatML) with Qwen2.5's tool template: the forced call's
    arguments are the city the user asked about, through the SDK and LangChain."""
    from langchain_openai import ChatOpenAI

    monkeypatch.setenv("MII_CACHE_DIR", str(tmp_path / "cache"))
    template = tmp_path / "qwen_tools.jinja"
    template.write_text(QWEN_TOOLS_TEMPLATE)
    port = free_port()
    client = mii.serve(
        smollm2,
        deployment_name=f"tools-smollm2-{uuid.uuid4().hex[:8]}",
        enable_restful_api=True,
        restful_api_port=port,
        port=free_port(),
        device="cpu",
        max_num_seqs=2,
        chat_template=str(template),
    )
    try:
        url = f"http://127.0.0.1:{port}/v1"
        question = "What is the weather like in Paris today?"
        oai = openai.OpenAI(base_url=url, api_key="x", max_retries=0, timeout=120)
        answer = oai.chat.completions.create(
            model=smollm2,
            messages=[{"role": "user", "content": question}],
            tools=[CITY],
            tool_choice="required",
            temperature=0,
            max_tokens=40,
        )
        oai.close()
        calls = answer.choices[0].message.tool_calls
        assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [
            ("get_weather", {"city": "Paris"})
        ]
        llm = ChatOpenAI(base_url=url, api_key="x", model=smollm2, temperature=0, max_tokens=40)
        message = llm.bind_tools([CITY], tool_choice="get_weather").invoke(question)
        assert message.tool_calls[0]["name"] == "get_weather"
        assert message.tool_calls[0]["args"] == {"city": "Paris"}
    finally:
        client.terminate_server()
