"""Tool calling, without a server (issue 18 item 3): the output parsers on strings,
the streamed deltas, the JSON schema of "required", and tools in a chat template."""

from __future__ import annotations

import json

import pytest

from chat_tokenizers import hermes_tokenizer
from mii.response import Response
from mii.rpc.http.chat import chat_prompt
from mii.rpc.http.protocol import ChatCompletionRequest, ChatMessage
from mii.rpc.http.tool_parsers import HERMES, LLAMA3_JSON, MISTRAL, TOOL_PARSERS, get_parser
from mii.rpc.http.tools import ToolDeltas, ToolPlan, tool_plan

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}
TIME = {"type": "function", "function": {"name": "get_time"}}


def _call(name: str, **arguments) -> str:
    return json.dumps({"name": name, "arguments": arguments})


def _summary(calls):
    return [(c.name, json.loads(c.arguments)) for c in calls]


def test_hermes_calls_after_text():
    text = (
        "Let me look that up.\n"
        f"<tool_call>\n{_call('get_weather', city='Paris', days=2)}\n</tool_call>\n"
        f"<tool_call>\n{_call('get_time')}\n</tool_call>"
    )
    content, calls = HERMES.parse(text)
    assert content == "Let me look that up."
    assert _summary(calls) == [("get_weather", {"city": "Paris", "days": 2}), ("get_time", {})]
    assert all(c.id.startswith("call_") and len(c.id) == 29 for c in calls)
    assert len({c.id for c in calls}) == 2
    item = calls[0].as_openai()
    assert item["type"] == "function" and isinstance(item["function"]["arguments"], str)


def test_hermes_only_calls_has_no_content_and_an_open_last_call_counts():
    content, calls = HERMES.parse(f"<tool_call>{_call('get_time')}")  # EOS before the end tag
    assert content is None and _summary(calls) == [("get_time", {})]
    # Arguments given as JSON text, and "parameters" for "arguments", are read too.
    text = '<tool_call>{"name": "f", "arguments": "{\\"a\\": 1}"}</tool_call>'
    assert _summary(HERMES.parse(text)[1]) == [("f", {"a": 1})]


@pytest.mark.parametrize(
    "text",
    [
        "Sure! <tool_call>{not json}</tool_call> done",
        '<tool_call>{"arguments": {}}</tool_call>',  # no name
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
        "<tool_call>",
        "plain text, no call at all",
        "a < b and <tool but not a call",
    ],
)
def test_malformed_or_absent_calls_keep_the_text_as_content(text):
    assert HERMES.parse(text) == (text, [])


def test_a_malformed_call_beside_a_good_one_stays_content():
    text = f"<tool_call>{{oops</tool_call><tool_call>{_call('get_time')}</tool_call>"
    content, calls = HERMES.parse(text)
    assert content == "<tool_call>{oops</tool_call>"
    assert _summary(calls) == [("get_time", {})]


def test_llama3_json_calls():
    one = '{"name": "get_weather", "parameters": {"city": "Rome"}}'
    assert _summary(LLAMA3_JSON.parse(one)[1]) == [("get_weather", {"city": "Rome"})]
    content, calls = LLAMA3_JSON.parse(f' <|python_tag|>{one}; {{"name": "get_time"}}')
    assert content is None and _summary(calls) == [
        ("get_weather", {"city": "Rome"}),
        ("get_time", {}),
    ]
    content, calls = LLAMA3_JSON.parse(f"Checking.<|python_tag|>{one}")
    assert content == "Checking." and len(calls) == 1
    for text in ['{"name": "f", "parameters": {', "The answer is {1}.", "Hi", '{"x": 1}']:
        assert LLAMA3_JSON.parse(text) == (text, [])


def test_mistral_calls():
    """Mistral's v3 tokenizer format: [TOOL_CALLS] then a JSON array, to the end of
    the answer; ids of 9 letters and digits (Mistral's templates refuse others)."""
    calls_json = json.dumps(
        [
            {"name": "get_weather", "arguments": {"city": "Rome"}},
            {"name": "get_time", "arguments": {}},
        ]
    )
    for size in (1, 4, 1000):
        events = _stream(MISTRAL, f"Let me check.[TOOL_CALLS] {calls_json}", size)
        content = "".join(e for e in events if isinstance(e, str))
        calls = [e for e in events if not isinstance(e, str)]
        assert content == "Let me check." and _summary(calls) == [
            ("get_weather", {"city": "Rome"}),
            ("get_time", {}),
        ]
        assert all(len(c.id) == 9 and c.id.isalnum() for c in calls)
    content, calls = MISTRAL.parse(f"[TOOL_CALLS]{calls_json}", frozenset({"get_weather"}))
    assert calls == []  # a call of a function not among the tools: all stays content
    for text in ["[TOOL_CALLS][]", "[TOOL_CALLS] not json", "Plain [1, 2] answer", "[TOOL_CALL"]:
        assert MISTRAL.parse(text) == (text, [])


def test_forced_calls_take_the_parsers_ids():
    """With --tool-call-parser mistral, "required" and named calls get ids of 9
    letters and digits too (Mistral's template refuses call_... in the next turn)."""
    for parser, short in ((MISTRAL, True), (HERMES, False), (None, False)):
        named = ToolPlan("named", [WEATHER], parser, function="get_weather")
        required = ToolPlan("required", [WEATHER], parser)
        calls = (
            named.calls('{"city": "Rome"}')[1]
            + required.calls(json.dumps([{"name": "get_weather", "parameters": {"city": "Oslo"}}]))[
                1
            ]
        )
        assert len(calls) == 2
        assert all((len(c.id) == 9 and c.id.isalnum()) == short for c in calls), parser


def test_registry():
    assert set(TOOL_PARSERS) >= {"hermes", "llama3_json", "mistral"}
    with pytest.raises(ValueError, match="hermes"):
        get_parser("nope")


def _stream(parser, text: str, size: int):
    reader, events = parser.stream(), []
    for start in range(0, len(text), size):
        events += reader.feed(text[start : start + size])
    return events + reader.finish()


@pytest.mark.parametrize("size", [1, 3, 7, 1000])
def test_streamed_events_hold_back_a_possible_tag(size):
    text = (
        f"Hi <tool_call>{_call('get_time')}</tool_call>\n<tool_call>{_call('f', a=1)}</tool_call>\n"
    )
    events = _stream(HERMES, text, size)
    content = "".join(e for e in events if isinstance(e, str))
    assert content.rstrip() == "Hi" and "<" not in content  # whitespace by a call may go
    assert _summary([e for e in events if not isinstance(e, str)]) == [
        ("get_time", {}),
        ("f", {"a": 1}),
    ]
    # Text that only looked like a tag's start is sent, whole, in the end.
    plain = "a <tool b <tool_cal"
    assert "".join(_stream(HERMES, plain, size)) == plain


@pytest.mark.parametrize(
    "text",
    [
        f"Sure!\n<tool_call>{_call('get_time')}</tool_call>\nDone.",
        f"Sure!  \n\n<tool_call>{_call('get_time')}</tool_call>  after\n",
        f"A\n<tool_call>not json</tool_call>\nB <tool_call>{_call('f', a=1)}</tool_call>",
        "no calls at all,\n  just text \n",
        # content only after the calls: its leading space went whole, not streamed (trial)
        f"<tool_call>{_call('f', a=1)}</tool_call> after text",
        f"\n<tool_call>{_call('f', a=1)}</tool_call>\n\n<tool_call>{_call('g')}</tool_call>\n B",
        f"<tool_call>{_call('f', a=1)}</tool_call>\n <tool_call>not json</tool_call> B",
        f"<tool_call>{_call('f', a=1)}</tool_call>\n <tool_c",
        # the answer's own leading spaces: streamed as they come, so whole too (trial)
        f"  lead  <tool_call>{_call('f', a=1)}</tool_call>\n\n",
    ],
)
def test_how_an_answer_is_cut_into_pieces_never_changes_its_content(text):
    """Content and calls are the same read whole or in pieces of any size (the
    whitespace before a call went when it came in its own piece and stayed when it
    came with the text before it: 'Sure!\n\nDone.' whole, 'Sure!\nDone.' streamed)."""

    def read(size):
        events = _stream(HERMES, text, size)
        content = "".join(e for e in events if isinstance(e, str))
        return content, _summary([e for e in events if not isinstance(e, str)])

    whole = read(len(text))
    assert all(read(size) == whole for size in (1, 2, 3, 5, 8))
    if not whole[1]:
        assert whole[0] == text  # an answer without calls is its text exactly
    else:  # streamed content is the whole answer's (the route's non-streamed content)
        assert (whole[0] or None) == HERMES.parse(text)[0]


def _plan(mode, tools=(WEATHER, TIME), **extra):
    return ToolPlan(mode, [dict(t) for t in tools], **extra)


def test_auto_deltas_in_openai_stream_shape():
    deltas = ToolDeltas(_plan("auto", parser=HERMES))
    out = []
    for piece in ["Hello <tool", "_call>", _call("get_time"), "</tool_call>"]:
        out += deltas.feed(piece)
    last, finish = deltas.finish("stop")
    out += last
    assert out[0] == {"content": "Hello"}  # the space before the call goes, as whole
    call = out[1]["tool_calls"][0]
    assert call["index"] == 0 and call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_time", "arguments": "{}"}
    assert finish == "tool_calls" and len(out) == 2
    # Without calls the content is the text and the finish reason the engine's.
    deltas = ToolDeltas(_plan("auto", parser=HERMES))
    assert deltas.feed("no calls") == [{"content": "no calls"}]
    assert deltas.finish("length") == ([], "length")


def test_named_deltas_stream_the_arguments():
    deltas = ToolDeltas(_plan("named", function="get_weather"))
    first = deltas.feed('{"city": ')
    second = deltas.feed('"Oslo"}')
    head = first[0]["tool_calls"][0]
    assert head["function"] == {"name": "get_weather", "arguments": '{"city": '}
    assert second == [{"tool_calls": [{"index": 0, "function": {"arguments": '"Oslo"}'}}]}]
    assert deltas.finish("stop") == ([], "stop")  # a named call ends "stop", as OpenAI's


def test_an_answer_cut_by_max_tokens_ends_with_length_whatever_its_calls():
    """A call, then a second one cut by max_tokens: the first is a call, the cut one's
    fragment content, and finish_reason "length" (not "tool_calls": the answer is
    incomplete), whole and streamed; an answer that ended on its own keeps "tool_calls"."""
    text = f"<tool_call>{_call('get_time')}</tool_call>\n<tool_call>" + '{"name": "get_w'
    for generated, expected in (("length", "length"), ("stop", "tool_calls")):
        plan = _plan("auto", parser=HERMES)
        message, finish = plan.message(Response(text, 3, 20, finish_reason=generated))
        assert finish == expected
        assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_time"]
        assert message["content"] == '<tool_call>{"name": "get_w'
        deltas = ToolDeltas(plan)
        out = [d for piece in text for d in deltas.feed(piece)]
        last, finish = deltas.finish(generated)
        assert finish == expected and len([d for d in out + last if "tool_calls" in d]) == 1


@pytest.mark.parametrize("size", [1, 4, 1000])
@pytest.mark.parametrize(
    "text",
    [
        "Use the tag <tool_call> like this. Done.",  # a tag in prose, never closed
        'Let me check. <tool_call>\n{"name',  # a call cut by max_tokens
        "Say <tool_call>not json</tool_call> then stop.",  # malformed: stays content
    ],
)
def test_text_that_is_not_a_call_streams_exactly_as_written(text, size):
    """Whitespace before a tag is dropped only when the tag opens a call: streamed,
    an answer without calls is its text exactly, as the whole answer's content is."""
    assert HERMES.parse(text) == (text, [])
    assert "".join(_stream(HERMES, text, size)) == text
    bare = '  {"name": "get_time"'  # llama3_json: a bare object that never completes
    assert "".join(_stream(LLAMA3_JSON, bare, size)) == bare == LLAMA3_JSON.parse(bare)[0]


@pytest.mark.parametrize("size", [1, 1000])
def test_a_call_of_a_function_not_among_the_tools_stays_content(size):
    """The parser reads calls of any name; a request's answer only has calls of its
    tools (OpenAI never answers others): one naming another function stays content,
    as written, whole and streamed, beside a call of a tool that still counts."""
    stray = f"<tool_call>{_call('launch_missiles')}</tool_call>"
    good = f"<tool_call>{_call('get_time')}</tool_call>"
    plan = _plan("auto", parser=HERMES)
    message, finish = plan.message(Response(stray, 3, 20, finish_reason="stop"))
    assert (message["content"], finish, "tool_calls" in message) == (stray, "stop", False)
    message, finish = plan.message(Response(f"{stray}\n{good}", 3, 20, finish_reason="stop"))
    assert message["content"] == stray and finish == "tool_calls"
    assert [c["function"]["name"] for c in message["tool_calls"]] == ["get_time"]
    deltas = ToolDeltas(plan)
    text = f"{stray}\n{good}"
    pieces = [text[start : start + size] for start in range(0, len(text), size)]
    out = [d for piece in pieces for d in deltas.feed(piece)]
    last, finish = deltas.finish("stop")
    out += last
    assert "".join(d.get("content", "") for d in out) == stray and finish == "tool_calls"
    assert [d["tool_calls"][0]["function"]["name"] for d in out if "tool_calls" in d] == [
        "get_time"
    ]


def test_required_schema_and_answers():
    plan = _plan("required", parallel=False)
    schema = plan.required_schema()
    assert schema["type"] == "array" and schema["minItems"] == 1 and schema["maxItems"] == 1
    names = [s["properties"]["name"]["enum"] for s in schema["items"]["anyOf"]]
    assert names == [["get_weather"], ["get_time"]]
    # A function without parameters takes none.
    assert schema["items"]["anyOf"][1]["properties"]["parameters"] == {"$ref": "#/$defs/tool1"}
    assert schema["$defs"]["tool1"]["additionalProperties"] is False
    text = '[{"name": "get_weather", "parameters": {"city": "Oslo"}}]'
    message, finish = plan.message(Response(text, 3, 9, "stop"))
    assert finish == "tool_calls" and message["content"] is None
    assert message["tool_calls"][0]["function"] == {
        "name": "get_weather",
        "arguments": '{"city": "Oslo"}',
    }
    # Cut off by max_tokens: the text, as content, and the engine's finish reason.
    message, finish = plan.message(Response('[{"name": "get_w', 3, 9, "length"))
    assert finish == "length" and message == {
        "role": "assistant",
        "content": '[{"name": "get_w',
        "refusal": None,
    }
    named = _plan("named", function="get_weather")
    assert (
        json.loads(named.generation_options()["json_schema"]) == WEATHER["function"]["parameters"]
    )


def test_required_schema_keeps_each_tools_references_reachable():
    """Tools whose parameters hold ``$defs`` (pydantic's nested models, as
    ``openai.pydantic_function_tool`` writes them) or point at themselves (``#``, a
    recursive tree; ``#/properties/a``): nested in the list of calls, their ``$ref``s
    pointed at the top of the answer's schema (xgrammar refused "Cannot find field
    '$defs'"; ``#`` was the list of calls: a trial). Each tool's parameters sit whole
    under ``$defs``, their references moved there; values (const, enum) and property
    names that look like keywords stay as they are."""
    pytest.importorskip("pydantic")
    from pydantic import BaseModel

    class Location(BaseModel):
        city: str
        country: str

    class Trip(BaseModel):
        start: Location
        stops: list[Location]

    def tool(name, parameters):
        return {"type": "function", "function": {"name": name, "parameters": parameters}}

    tree = {
        "type": "object",
        "properties": {
            "v": {"type": "integer", "minimum": 2, "maximum": 2},
            "w": {"$ref": "#/properties/v"},
            "kids": {"type": "array", "items": {"$ref": "#"}, "maxItems": 1},
            "definitions": {"const": {"$ref": "#/$defs/A"}},
        },
        "required": ["v", "w", "kids"],
        "additionalProperties": False,
    }
    tools = (tool("plan_trip", Trip.model_json_schema()), tool("tree", tree), WEATHER)
    schema = _plan("required", tools=tools).required_schema()
    assert sorted(schema["$defs"]) == ["tool0", "tool1", "tool2"]
    trip = schema["$defs"]["tool0"]
    assert trip["properties"]["start"] == {"$ref": "#/$defs/tool0/$defs/Location"}
    moved = schema["$defs"]["tool1"]["properties"]
    assert moved["w"] == {"$ref": "#/$defs/tool1/properties/v"}
    assert moved["kids"]["items"] == {"$ref": "#/$defs/tool1"}
    assert moved["definitions"] == {"const": {"$ref": "#/$defs/A"}}  # a value, kept
    xgrammar = pytest.importorskip("xgrammar")
    from xgrammar.testing import _is_grammar_accept_string as accepts

    grammar = xgrammar.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)
    leaf = {"v": 2, "w": 2, "kids": []}
    value = {**leaf, "kids": [leaf]}
    assert accepts(grammar, json.dumps([{"name": "tree", "parameters": value}]))
    from mii.engine.schema_support import unsupported_schema_feature

    assert unsupported_schema_feature(schema) is None


def _body(**fields):
    return ChatCompletionRequest(messages=[{"role": "user", "content": "hi"}], **fields)


def test_tool_plan_modes():
    assert tool_plan(_body(), None) is None
    assert tool_plan(_body(tool_choice="none"), None) is None
    assert tool_plan(_body(tools=[WEATHER]), "hermes").parser is HERMES
    assert tool_plan(_body(tools=[WEATHER], tool_choice="required"), None).mode == "required"
    named = {"type": "function", "function": {"name": "get_weather"}}
    plan = tool_plan(_body(tools=[WEATHER], tool_choice=named, parallel_tool_calls=False), None)
    assert (plan.mode, plan.function, plan.parallel) == ("named", "get_weather", False)


def test_tools_reach_the_chat_template():
    tok = hermes_tokenizer()
    messages = [ChatMessage(role="user", content="Weather in Paris?")]
    without = chat_prompt(tok, messages)
    ids = chat_prompt(tok, messages, tools=[WEATHER, TIME])
    text = tok.decode(ids)
    assert len(ids) > len(without)
    assert "<tools>" in text and '"name": "get_weather"' in text and "The weather of a city" in text
    # The next turn: the assistant's call (arguments as JSON text, as OpenAI sends them)
    # and the tool's result render as the template writes them.
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
    }
    history = [
        *messages,
        ChatMessage(role="assistant", content=None, tool_calls=[call]),
        ChatMessage(role="tool", content="sunny, 21 C", tool_call_id="call_1"),
    ]
    text = tok.decode(chat_prompt(tok, history, tools=[WEATHER]))
    assert (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>' in text
    )
    assert "<tool_response>\nsunny, 21 C\n</tool_response>" in text
    assert text.endswith("<|im_start|>assistant\n")


def test_tools_without_a_chat_template_and_a_template_that_ignores_them(caplog):
    from chat_tokenizers import chatml_tokenizer
    from mii.rpc.http import tools as tools_module

    tok = chatml_tokenizer()
    messages = [ChatMessage(role="user", content="hi")]
    template = tok.chat_template
    tok.chat_template = None  # the fallback text puts the tools first
    text = tok.decode(chat_prompt(tok, messages, tools=[TIME]), skip_special_tokens=True)
    assert text.startswith('tools: [{"type": "function", "function": {"name": "get_time"}}]\n')
    tok.chat_template = template  # ChatML without tools: the model cannot see them
    caplog.set_level("WARNING", logger=tools_module.__name__)
    for _ in range(2):
        tools_module.warn_template_without_tools(tok)
    assert len([r for r in caplog.records if "does not use tools" in r.getMessage()]) == 1
    tools_module.warn_template_without_tools(hermes_tokenizer())  # uses them: silent
    # (the tools module's records: chat's own "no chat template" warning, given once per
    # process, is among them when this test runs first)
    assert len([r for r in caplog.records if r.name == tools_module.__name__]) == 1
