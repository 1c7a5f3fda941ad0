"""OpenAI's Responses API (``POST /v1/responses``), through the ``openai`` SDK.

A gateway over a scripted pool (it answers what a model would write) checks that a
Responses request sends the engine exactly the chat route's prompt and options
(``instructions`` as the system message, text parts, function calls and their
outputs, ``text.format``, ``max_output_tokens``), that the answer comes back in
the Responses shapes, whole and as stream events, and that what cannot be served
is a 400 naming the field. A real deployment (test_tool_calling's) checks forced
calls end to end.
"""

from __future__ import annotations

import json
import logging

import httpx
import openai
import pytest

from mii.errors import InvalidRequestError, UnavailableError
from mii.response import Response
from scripted_gateway import ScriptedPool, with_gateway
from test_tool_calling import ALERT, HERMES_ANSWER, PARAMETERS

FLAT_WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather of a city",
    "parameters": PARAMETERS,
}
CHAT_WEATHER = {
    "type": "function",
    "function": {k: v for k, v in FLAT_WEATHER.items() if k != "type"},
}
FLAT_ALERT = {"type": "function", **ALERT["function"]}


def test_a_response_is_the_chat_routes_answer_in_the_responses_shape(llama):
    pool = ScriptedPool("The capital is Paris.")

    async def scenario(client, gateway):
        answer = await client.responses.create(
            model="d",
            instructions="Answer briefly.",
            input=[
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "a"},
                        {"type": "input_text", "text": "b"},
                    ],
                }
            ],
            max_output_tokens=30,
            temperature=0,
        )
        assert answer.object == "response" and answer.id.startswith("resp_")
        assert answer.status == "completed" and answer.incomplete_details is None
        assert answer.completed_at >= answer.created_at  # (it was null)
        assert answer.output_text == "The capital is Paris."
        [message] = answer.output
        assert message.type == "message" and message.role == "assistant"
        assert message.content[0].type == "output_text"
        prompt, params = pool.sent[-1]
        assert answer.usage.input_tokens == len(prompt)
        assert answer.usage.output_tokens == 7 and answer.usage.total_tokens == len(prompt) + 7
        assert params["max_new_tokens"] == 30 and params["do_sample"] is False
        # Valid for the SDK's own types read strictly, not only leniently as create()
        # reads them (its usage lacked cache_write_tokens, which they require).
        raw = await client.responses.with_raw_response.create(model="d", input="hi")
        openai.types.responses.Response.model_validate(json.loads(raw.http_response.text))
        # The same prompt as the chat route's for the same conversation.
        await client.chat.completions.create(
            model="d",
            messages=[
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "a\nb"},
            ],
            max_tokens=30,
        )
        assert pool.sent[-1][0] == prompt

        # A plain text input is one user message; text.format is response_format.
        schema = {"type": "object", "properties": {"x": {"type": "integer"}}}
        await client.responses.create(
            model="d",
            input="hi",
            text={"format": {"type": "json_schema", "name": "x", "schema": schema}},
        )
        prompt, params = pool.sent[-1]
        assert json.loads(params["json_schema"]) == schema
        await client.chat.completions.create(
            model="d", messages=[{"role": "user", "content": "hi"}]
        )
        assert pool.sent[-1][0] == prompt

        # OpenAI's way to ask for logprobs (include) asks for them; so does top_logprobs 0
        # (both answered "logprobs": [], a trial).
        for extra in ({"include": ["message.output_text.logprobs"]}, {"top_logprobs": 0}):
            await client.responses.create(model="d", input="hi", **extra)
            assert pool.sent[-1][1]["logprobs"] == 0, pool.sent[-1][1]
        # truncation "auto": what still does not fit keeps its last tokens, leaving room
        # for max_output_tokens up to a quarter of the window (max_length 4,096 here):
        # without it -1 left 1 token of answer; with a safety cap of 8,000, 192 tokens
        # of a prompt that fitted whole (trials).
        for max_output_tokens, keep in ((None, 3072), (8, 4088), (8000, 3072)):
            await client.responses.create(
                model="d", input="hi", truncation="auto", max_output_tokens=max_output_tokens
            )
            assert pool.sent[-1][1]["truncate_prompt_tokens"] == keep
        reasoning = {"effort": "low", "summary": None, "generate_summary": None}
        echoed = await client.responses.create(model="d", input="hi", reasoning=reasoning)
        assert echoed.reasoning.effort == "low"
        # keys of OpenAI's newer SDKs pass (they were 400 "unknown field": a trial)
        await client.responses.create(model="d", input="hi", reasoning={"context": "auto"})

        # Keys OpenAI's items carry beyond those read here pass (phase, namespace, ...).
        said = {"type": "message", "role": "assistant", "phase": "final_answer", "content": "x"}
        await client.responses.create(model="d", input=[{"role": "user", "content": "hi"}, said])

        # An output's refusal part sent back is the assistant's text (was a 400).
        refused = {"role": "assistant", "content": [{"type": "refusal", "refusal": "No."}]}
        await client.responses.create(model="d", input=[{"role": "user", "content": "hi"}, refused])
        prompt = pool.sent[-1][0]
        said = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "No."}]
        await client.chat.completions.create(model="d", messages=said)
        assert pool.sent[-1][0] == prompt

    with_gateway(llama, pool, scenario)


def words(n: int, start: int = 0) -> str:
    return " ".join(f"w{i}" for i in range(start, start + n))


def test_auto_truncation_leaves_out_the_oldest_turns_not_the_instructions(llama):
    """A conversation past the window loses its oldest turns whole (OpenAI drops input
    items); the instructions stay. It lost its first tokens: the instructions first."""
    pool = ScriptedPool("ok")
    instructions = "Answer in French. " + words(20)
    turns = []
    for i in range(12):
        turns += [
            {"role": "user", "content": f"question {i}: " + words(150, 1000 * i)},
            {"role": "assistant", "content": f"answer {i}: " + words(150, 1000 * i + 500)},
        ]
    turns.append({"role": "user", "content": "the last question"})
    limit = 4096 - 100

    async def scenario(client, gateway):
        async def chat_prompt(messages):  # the chat route's prompt: the oracle
            system = [{"role": "system", "content": instructions}]
            await client.chat.completions.create(model="d", messages=system + messages)
            return pool.sent[-1][0]

        whole = await chat_prompt(turns)
        assert len(whole) > 4096  # (the test's premise: it does not fit)
        await client.responses.create(
            model="d",
            instructions=instructions,
            input=turns,
            truncation="auto",
            max_output_tokens=100,
        )
        sent, params = pool.sent[-1]
        # the fewest oldest turns (a question with its answer) left out that make it fit
        lengths = [len(await chat_prompt(turns[k:])) for k in range(0, len(turns), 2)]
        kept = 2 * next(i for i, n in enumerate(lengths) if n <= limit)
        assert kept > 0 and sent == await chat_prompt(turns[kept:])
        assert len(await chat_prompt(turns[kept - 2 :])) > limit
        assert params["truncate_prompt_tokens"] == limit  # (nothing left to cut)
        # One that fits, leaving a quarter of the window for the answer, is sent whole
        # (a safety cap as large as the window left the prompt nothing).
        assert len(await chat_prompt(turns[-3:])) <= 3072
        await client.responses.create(
            model="d", instructions=instructions, input=turns[-3:], truncation="auto",
            max_output_tokens=100_000,
        )  # fmt: skip
        assert pool.sent[-1][0] == await chat_prompt(turns[-3:])
        # One message alone too long: its last tokens (the engine cuts the prompt).
        await client.responses.create(model="d", input=words(9000), truncation="auto")
        assert pool.sent[-1][1]["truncate_prompt_tokens"] == 3072

    with_gateway(llama, pool, scenario)


def test_auto_truncation_of_a_tool_loop_keeps_the_task_and_whole_calls(llama):
    """One user turn with a long tool loop (an agent): its oldest calls go with their
    results; the user's task, the instructions and the latest call stay."""
    pool = ScriptedPool("ok")
    task = {"role": "user", "content": "find the answer " + words(10)}
    loop = []
    for i in range(30):
        call_id = f"call_{i}"
        loop += [
            {"type": "function_call", "call_id": call_id, "name": "search",
             "arguments": json.dumps({"q": f"query {i}"})},
            {"type": "function_call_output", "call_id": call_id,
             "output": f"result {i}: " + words(200, 1000 * i)},
        ]  # fmt: skip

    async def scenario(client, gateway):
        tools = [{"type": "function", "name": "search", "parameters": {"type": "object"}}]
        await client.responses.create(
            model="d",
            instructions="You are a search agent.",
            input=[task, *loop],
            tools=tools,
            tool_choice="none",  # (the tools shape the prompt either way)
            truncation="auto",
            max_output_tokens=50,
        )
        sent, _ = pool.sent[-1]
        text = await tokens_text(gateway.url, sent)
        assert len(sent) <= 4096 - 50
        assert "You are a search agent." in text and "find the answer" in text
        assert "result 29:" in text and "result 0:" not in text
        # each call kept comes with its result, and each result with its call
        for i in range(30):
            assert (f'"query {i}"' in text) == (f"result {i}:" in text), i

    with_gateway(llama, pool, scenario)


async def tokens_text(url: str, ids) -> str:
    async with httpx.AsyncClient() as http:
        reply = await http.post(f"{url}/detokenize", json={"tokens": ids})
    return reply.json()["prompt"]


def test_a_cut_answer_is_incomplete(llama):
    pool = ScriptedPool("The capital", finish="length")

    async def scenario(client, gateway):
        answer = await client.responses.create(model="d", input="hi", max_output_tokens=2)
        assert answer.status == "incomplete"
        assert answer.incomplete_details.reason == "max_output_tokens"
        assert answer.output[0].status == "incomplete"
        events = [
            e async for e in await client.responses.create(input="hi", model="d", stream=True)
        ]
        assert events[-1].type == "response.incomplete"
        assert events[-1].response.output_text == "The capital"

    with_gateway(llama, pool, scenario)


def test_streamed_events_carry_the_text_as_it_comes(llama):
    text = "The capital of France is Paris."
    pool = ScriptedPool(text, size=4)

    async def scenario(client, gateway):
        stream = await client.responses.create(model="d", input="hi", stream=True)
        events = [event async for event in stream]
        kinds = [e.type for e in events]
        assert kinds[:4] == [
            "response.created",
            "response.in_progress",
            "response.output_item.added",
            "response.content_part.added",
        ]
        deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
        assert len(deltas) == -(-len(text) // 4) and "".join(deltas) == text
        assert kinds[-4:] == [
            "response.output_text.done",
            "response.content_part.done",
            "response.output_item.done",
            "response.completed",
        ]
        assert [e.sequence_number for e in events] == list(range(len(events)))
        assert events[-1].response.output_text == text
        item_ids = {e.item_id for e in events if hasattr(e, "item_id")}
        assert item_ids == {events[-1].response.output[0].id}

    with_gateway(llama, pool, scenario)


def test_tool_calls_are_function_call_items_and_go_back_as_input(llama):
    pool = ScriptedPool(HERMES_ANSWER)

    async def scenario(client, gateway):
        answer = await client.responses.create(
            model="d", input="What is the weather in Paris?", tools=[FLAT_WEATHER, FLAT_ALERT]
        )
        kinds = [item.type for item in answer.output]
        assert kinds == ["message", "function_call", "function_call"]
        assert answer.output[0].content[0].text == "Let me check."
        call = answer.output[1]
        assert call.name == "get_weather" and call.call_id.startswith("call_")
        assert json.loads(call.arguments) == {"city": "Paris", "metric": True}
        prompt = pool.sent[-1][0]
        # The tools reached the template as the chat route's tools do.
        await client.chat.completions.create(
            model="d",
            messages=[{"role": "user", "content": "What is the weather in Paris?"}],
            tools=[CHAT_WEATHER, ALERT],
        )
        assert pool.sent[-1][0] == prompt

        # Streamed: the calls as items with their arguments' events.
        events = [
            e
            async for e in await client.responses.create(
                model="d", input="Weather?", tools=[FLAT_WEATHER, FLAT_ALERT], stream=True
            )
        ]
        done = [e.arguments for e in events if e.type == "response.function_call_arguments.done"]
        assert [json.loads(a) for a in done] == [
            {"city": "Paris", "metric": True},
            {"level": "low"},
        ]
        assert [i.type for i in events[-1].response.output] == kinds

        # The call and its output sent back: the chat route's tool turn.
        history = [
            {"role": "user", "content": "Weather?"},
            {"type": "function_call", "call_id": "call_1", "name": "get_weather",
             "arguments": '{"city": "Paris", "metric": true}'},
            {"type": "function_call_output", "call_id": "call_1", "output": "sunny"},
        ]  # fmt: skip
        await client.responses.create(model="d", input=history, tools=[FLAT_WEATHER])
        prompt = pool.sent[-1][0]
        chat_history = [
            {"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function", "function": {
                    "name": "get_weather", "arguments": '{"city": "Paris", "metric": true}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
        ]  # fmt: skip
        await client.chat.completions.create(model="d", messages=chat_history, tools=[CHAT_WEATHER])
        assert pool.sent[-1][0] == prompt
        assert "sunny" in gateway.app.state.mii.tokenizer.decode(prompt)
        # An answer's items sent back as they came (text, then its call): one
        # assistant turn, as the chat route's message with content and tool_calls.
        said = {"role": "assistant", "content": [{"type": "output_text", "text": "Checking."}]}
        await client.responses.create(
            model="d", input=[history[0], said, *history[1:]], tools=[FLAT_WEATHER]
        )
        prompt = pool.sent[-1][0]
        turn = {**chat_history[1], "content": "Checking."}
        await client.chat.completions.create(
            model="d", messages=[chat_history[0], turn, chat_history[2]], tools=[CHAT_WEATHER]
        )
        assert pool.sent[-1][0] == prompt

    with_gateway(llama, pool, scenario, tool_call_parser="hermes")


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"conversation": "conv_1"}, "conversation"),
        ({"background": True}, "background"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
        ({"tools": [{"type": "web_search"}]}, "tools.0.type"),
        ({"tools": [{"type": "function", "name": "f", "parameters": {"type": "nope"}}]},
         "tools.0.parameters"),
        ({"input": [{"type": "input_image", "image_url": "x"}]}, "input.0.type"),
        ({"input": [{"role": "user", "content": [{"type": "input_image"}]}]}, "input.0.content.0"),
        ({"input": [{"role": "robot", "content": "hi"}]}, "input.0.role"),
        ({"input": [{"type": "function_call", "name": "f"}]}, "input.0.call_id"),
        ({"input": []}, "input"),
        ({"text": {"format": {"type": "xml"}}}, "text.format.type"),
        ({"tool_choice": {"type": "file_search"}}, "tool_choice"),
        ({"frobnicate": 1}, "frobnicate"),
        ({"model": "gpt-9"}, "model"),
        # A lone surrogate in a field the answer echoes: a 500 after generating (a trial)
        ({"metadata": {"k": "\ud800"}}, "metadata"),
        ({"user": "\ud800"}, "user"),
        ({"instructions": "ab\udfff"}, "instructions"),
        ({"text": {"verbosity": "\ud800"}}, "text"),
        # nested past what the answer's echo renders: a 500 after generating (a trial)
        ({"metadata": {"a": json.loads("[" * 900 + "1" + "]" * 900)}}, "metadata"),
        # A misplaced schema constrained nothing (the chat shape, a typo): named instead
        ({"text": {"formats": {"type": "json_object"}}}, "text.formats"),
        ({"text": {"format": {"type": "json_schema", "name": "x", "json_schema": {}}}},
         "text.format.json_schema"),
        ({"text": {"format": {"type": "json_object", "schema": {}}}}, "text.format.schema"),
        ({"text": {"format": {"type": "json_schema", "name": "x", "strict": "yes"}}},
         "text.format.strict"),
        ({"text": {"verbosity": "loud"}}, "text.verbosity"),
        ({"truncation": "bogus"}, "truncation"),
        # a misspelt include asked for nothing, its logprobs left out (a trial)
        ({"include": ["message.output_text.logprob"]}, "include"),
        ({"stream_options": {"bogus": 1}}, "stream_options.bogus"),
        ({"max_tool_calls": -1}, "max_tool_calls"),
        ({"reasoning": {"effort": 5}}, "reasoning.effort"),
        ({"input": [5]}, "input.0"),
        ({"input": [{"role": "user", "content": [{"type": "input_text", "text": 5}]}]},
         "input.0.content.0.text"),
        ({"input": [{"role": "user", "contents": "x"}]}, "input.0.contents"),
        ({"input": [{"type": "function_call_output", "call_id": "c", "ouput": "x"}]},
         "input.0.ouput"),
        # an output of a call never made was answered as if the model had made it (a
        # fuzzer; OpenAI refuses it): named, also after a call of another id
        ({"input": [{"type": "function_call_output", "call_id": "zz", "output": "x"}]},
         "input.0.call_id"),
        ({"input": [{"type": "function_call", "call_id": "a", "name": "f", "arguments": "{}"},
                    {"type": "function_call_output", "call_id": "b", "output": "x"}]},
         "input.1.call_id"),
        # a type that is no string was a 500 (unhashable): a review
        ({"input": [{"type": ["message"], "role": "user", "content": "hi"}]}, "input.0.type"),
        ({"text": {"format": {"type": ["json_schema"]}}}, "text.format.type"),
    ],
)  # fmt: skip
def test_what_cannot_be_served_is_a_400_naming_the_field(llama, fields, param):
    pool = ScriptedPool("x")

    async def scenario(client, gateway):
        body = {"model": "d", "input": "hi", **fields}
        # (as JSON text with \u escapes: the SDK cannot encode a lone surrogate itself)
        async with httpx.AsyncClient(base_url=gateway.url) as http:
            for stream in (False, True):
                reply = await http.post(
                    "/v1/responses",
                    content=json.dumps({**body, "stream": stream}),
                    headers={"content-type": "application/json"},
                )
                assert reply.status_code == (404 if param == "model" else 400), reply.text
                assert reply.json()["error"]["param"] == param, reply.text

    with_gateway(llama, pool, scenario)


def test_fields_that_change_nothing_here_are_logged_as_on_the_chat_route(
    llama, monkeypatch, caplog
):
    """store, reasoning, max_tool_calls, service_tier and include values other than the
    logprobs did nothing, silently (a trial): each is logged once, as chat's are."""
    from mii.rpc.http import field_policy, responses_request

    monkeypatch.setattr(field_policy, "_warned", set())
    monkeypatch.setattr(responses_request, "_warned", set())
    caplog.set_level(logging.WARNING)
    pool = ScriptedPool("x")
    asked = dict(
        store=True,
        reasoning={"effort": "high"},
        max_tool_calls=1,
        service_tier="flex",
        include=["reasoning.encrypted_content", "message.output_text.logprobs"],
    )

    async def scenario(client, gateway):
        for _ in range(2):
            await client.responses.create(model="d", input="hi", **asked)

    with_gateway(llama, pool, scenario)
    said = [r.getMessage() for r in caplog.records if "ignoring the" in r.getMessage()]
    fields = sorted(m.split("'")[1] for m in said if "request field" in m)
    assert fields == ["max_tool_calls", "reasoning", "service_tier", "store"], said
    [include] = [m for m in said if "include values" in m]
    assert "reasoning.encrypted_content" in include and "logprobs" not in include
    assert len(said) == 5  # once each
    assert pool.sent[-1][1]["logprobs"] == 0  # (the logprobs still asked for)


class FailingPool(ScriptedPool):
    """Streams one piece, then the deployment goes away."""

    async def stream(self, prompt, params, timeout=None, announce=False):
        self.sent.append((prompt, params))
        if announce:
            yield None
        yield Response("The", len(prompt), 1, None)
        raise UnavailableError("the replica serving this request stopped")


def test_a_stream_that_fails_midway_ends_with_response_failed(llama):
    """After its error event the stream ends as OpenAI's do: response.failed with the
    error (it ended with the error event alone; a trial)."""

    async def scenario(client, gateway):
        stream = await client.responses.create(model="d", input="hi", stream=True)
        events = [event async for event in stream]
        kinds = [e.type for e in events]
        assert kinds[:2] == ["response.created", "response.in_progress"]
        assert "response.output_text.delta" in kinds
        assert kinds[-2:] == ["error", "response.failed"], kinds
        failed = events[-1].response
        assert failed.status == "failed" and "stopped" in failed.error.message
        assert failed.error.code == "server_error"  # (one of OpenAI's codes)
        assert [e.sequence_number for e in events] == list(range(len(events)))

    with_gateway(llama, FailingPool("x"), scenario)


class TooLongPool(ScriptedPool):
    """Refuses every prompt as the engine refuses one past max_length."""

    async def generate(self, prompts, params, timeout=None):
        raise InvalidRequestError(
            "the prompt has 5000 tokens, more than max_length=4096; shorten the prompt, keep "
            "its last tokens (truncate_prompt_tokens=N, or -1 for as many as fit)",
            field="prompt",
            code="context_length_exceeded",
        )

    async def stream(self, prompt, params, timeout=None, announce=False):
        await self.generate([prompt], params)
        yield None  # (never reached)


def test_a_prompt_too_long_is_context_length_exceeded_with_this_routes_way_out(llama):
    """OpenAI's code for it, which clients branch on, on every route (it was null); the
    Responses route also names its own way out, truncation "auto" (a trial)."""

    async def scenario(client, gateway):
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError) as err:
                await client.responses.create(model="d", input="hi", stream=stream)
            assert err.value.code == "context_length_exceeded" and err.value.param == "input"
            assert 'truncation: "auto"' in err.value.message
        with pytest.raises(openai.BadRequestError) as err:
            await client.completions.create(model="d", prompt="hi")
        assert err.value.code == "context_length_exceeded" and err.value.param == "prompt"
        with pytest.raises(openai.BadRequestError) as err:
            await client.chat.completions.create(
                model="d", messages=[{"role": "user", "content": "hi"}]
            )
        assert err.value.code == "context_length_exceeded"
        assert "truncation" not in err.value.message  # (chat has no such field)

    with_gateway(llama, TooLongPool("x"), scenario)
