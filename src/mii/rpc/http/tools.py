"""Tool calling on ``/v1/chat/completions``: what a request's ``tools`` and
``tool_choice`` mean for the prompt, the generation and the answer.

- The tools reach the model through its chat template
  (``apply_chat_template(messages, tools=[...])``), whatever ``tool_choice`` is.
- ``"auto"`` (the default when there are tools): the model decides; the answer's
  text is read by the deployment's tool call parser (``--tool-call-parser``,
  :mod:`mii.rpc.http.tool_parsers`). Without a parser it is a 400, as vLLM answers
  it: nothing could find the calls.
- ``"required"`` and a named function need no parser: the generation is
  constrained (the ``json_schema`` option) so that its text *is* the calls, as
  JSON that parses and matches the tools' ``parameters``. Named: the arguments
  object of that function. Required: a list of ``{"name", "parameters"}`` objects,
  one call or more (at most one when ``parallel_tool_calls`` is false).
- ``"none"``: no calls; the answer is content (the tools are still in the prompt).

An answer with calls has ``finish_reason`` ``"tool_calls"`` (a named function's:
``"stop"``, as OpenAI's; one cut by ``max_tokens``: ``"length"``); ``tool_calls`` are in
OpenAI's shape, ids ``call_...``, arguments as JSON text. Streamed, each call is
one delta once its JSON is complete (a named function's arguments are streamed
as they are generated instead), and content around calls streams as content.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

from mii.config import GenerateParams
from mii.constraint_options import CONSTRAINT_FIELDS
from mii.engine.schema_support import schema_problem
from mii.engine.schema_walk import in_2020_12_terms, names_an_earlier_draft, rebuilt
from mii.response import Response
from mii.rpc.http.errors import ApiError
from mii.rpc.http.protocol import ChatCompletionRequest
from mii.rpc.http.tool_parsers import ToolCall, ToolCallStream, ToolParser, get_parser

log = logging.getLogger(__name__)

# A function without ``parameters`` takes none (OpenAI's reading): ``{}``.
NO_PARAMETERS: dict[str, Any] = {"type": "object", "properties": {}, "additionalProperties": False}

_warned_templates: set[int] = set()  # tokenizers warned about a template without tools


@dataclass(frozen=True)
class ToolPlan:
    """How one request uses its tools. ``mode``: "none", "auto", "required" or
    "named" (``function`` is the named one)."""

    mode: str
    tools: list[dict[str, Any]]  # as the chat template takes them
    parser: ToolParser | None = None
    function: str | None = None
    parallel: bool = True

    def generation_options(self) -> dict[str, Any]:
        """The generation options the mode adds: a JSON schema for "required" and
        "named"; special tokens kept in the text for "auto" (a call tag may be one)."""
        # The schema as JSON text: the text crosses gRPC as it is (a dict would not).
        if self.mode == "named":
            return {"json_schema": json.dumps(self._parameters(self.function))}
        if self.mode == "required":
            return {"json_schema": json.dumps(self.required_schema())}
        if self.mode == "auto":
            return {"skip_special_tokens": False}
        return {}

    @property
    def names(self) -> frozenset[str]:
        """The functions a call may name: the request's tools (a parsed call of any
        other stays content, as OpenAI never answers one)."""
        return frozenset(tool["function"]["name"] for tool in self.tools)

    def _parameters(self, name: str | None) -> dict[str, Any]:
        for tool in self.tools:
            if tool["function"]["name"] == name:
                return tool["function"].get("parameters") or NO_PARAMETERS
        raise KeyError(name)

    def required_schema(self) -> dict[str, Any]:
        """The JSON schema of "required" answers: a list of calls of the tools. Each
        tool's parameters sit whole under ``$defs`` (``tool0``, ``tool1``, ...), their
        local ``$ref``s (``#``, ``#/properties/a``, ``#/$defs/A``) pointing there, so that
        they resolve as in the tool's own schema (against the wrapper's root, ``#``
        was the list of calls: a trial)."""
        defs: dict[str, Any] = {}
        calls = []
        for i, tool in enumerate(self.tools):
            name = tool["function"]["name"]
            base = f"#/$defs/tool{i}"
            defs[f"tool{i}"] = _as_wrapper_def(self._parameters(name), base)
            calls.append(
                {
                    "type": "object",
                    "properties": {
                        "name": {"type": "string", "enum": [name]},
                        "parameters": {"$ref": base},
                    },
                    "required": ["name", "parameters"],
                    "additionalProperties": False,
                }
            )
        schema: dict[str, Any] = {
            "type": "array",
            "items": calls[0] if len(calls) == 1 else {"anyOf": calls},
            "minItems": 1,
        }
        if not self.parallel:
            schema["maxItems"] = 1
        schema["$defs"] = defs
        return schema

    def with_own_ids(self, calls: list[ToolCall]) -> list[ToolCall]:
        """``calls`` with ids the served model takes back in a later turn: its
        parser's (Mistral's 9 characters), else OpenAI's shape."""
        return calls if self.parser is None else self.parser.with_own_ids(calls)

    def calls(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """The content and calls of a whole answer ``text``."""
        if self.mode == "auto" and self.parser is not None:
            content, calls = self.parser.parse(text, self.names)
            return content, calls if self.parallel else calls[:1]
        if self.mode == "named":
            # The answer is the call's arguments, whole or cut by max_tokens (then
            # incomplete JSON, finish_reason "length"): a call either way, as it is
            # streamed (its deltas go out before the cut is known) and as vLLM answers.
            arguments = text.strip()
            if arguments:
                return None, self.with_own_ids([ToolCall(str(self.function), arguments)])
        elif self.mode == "required":
            calls = self.with_own_ids(_required_calls(_loads(text)))
            if calls:
                return None, calls
        return text, []

    def message(self, response: Response) -> tuple[dict[str, Any], str | None]:
        """A whole choice's ``message`` and ``finish_reason``."""
        content, calls = self.calls(response.generated_text)
        message: dict[str, Any] = {"role": "assistant", "content": content, "refusal": None}
        if calls:
            message["tool_calls"] = [call.as_openai() for call in calls]
        return message, self.finish_reason(len(calls), response.finish_reason)

    def finish_reason(self, calls: int, generated: str | None) -> str | None:
        """A choice's ``finish_reason`` given its ``calls`` and how its generation
        ended (``generated``): "tool_calls" when it made calls and ended on its own;
        "length" when ``max_tokens`` cut it, calls or not (the answer is incomplete:
        a call may be cut, its fragment left as content); a named function's call
        ends with "stop", as OpenAI's and vLLM's do."""
        if not calls or generated == "length" or self.mode == "named":
            return generated
        return "tool_calls"


def _as_wrapper_def(parameters: Any, base: str) -> Any:
    """A tool's parameters as a definition of the wrapping schema (2020-12), at
    ``base``: each local ``$ref`` ("#...": the tool's own schema) pointing under
    ``base``, an earlier draft's forms (draft-07's tuples) rewritten, its own
    ``$schema`` dropped; values of const, enum, default and examples kept. (Under a
    named tool_choice the tool's schema is the whole schema and keeps its draft.)"""
    earlier = names_an_earlier_draft(parameters)

    def moved(node: dict, path: str) -> dict:
        if earlier:
            in_2020_12_terms(node, path)
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#"):
            node["$ref"] = base + ref[1:]
        return node

    out = rebuilt(parameters, moved)
    if isinstance(out, dict):
        out.pop("$schema", None)
    return out


def _loads(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return None


def _required_calls(value: Any) -> list[ToolCall]:
    """The calls of a "required" answer (a list of {"name", "parameters"})."""
    if not isinstance(value, list):
        return []
    calls = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            return []
        arguments = item.get("parameters", {})
        calls.append(ToolCall(item["name"], json.dumps(arguments, ensure_ascii=False)))
    return calls


def tool_plan(body: ChatCompletionRequest, parser_name: str | None) -> ToolPlan | None:
    """What ``body``'s tools mean (None: it has none); a 400 ApiError naming the field
    for a ``tool_choice`` that cannot be honoured."""
    choice = body.tool_choice
    if not body.tools:
        if choice is not None and choice != "none":
            raise ApiError(400, "tool_choice needs tools (the request has none)", "tool_choice")
        return None
    tools = [tool.model_dump(exclude_none=True) for tool in body.tools]
    names = [t["function"]["name"] for t in tools]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ApiError(400, f"tools name the function {duplicates[0]!r} twice", "tools")
    parallel = body.parallel_tool_calls is not False
    if choice is None or choice == "auto":
        if parser_name is None:
            raise ApiError(
                400,
                'tool_choice "auto" (the default with tools) needs a tool call parser: '
                "start the server with --tool-call-parser (hermes, llama3_json, mistral), "
                'or ask for tool_choice "required" or a named function',
                "tool_choice",
            )
        return ToolPlan("auto", tools, get_parser(parser_name), parallel=parallel)
    # (with the deployment's parser, if any, for the call ids its model takes back)
    parser = None if parser_name is None else get_parser(parser_name)
    if choice in ("none", "required"):
        return ToolPlan(choice, tools, parser, parallel=parallel)
    name = choice.function.name
    if name not in names:
        raise ApiError(
            400,
            f"tool_choice names the function {name!r}, which is not among the tools "
            f"({', '.join(repr(n) for n in names)})",
            "tool_choice",
        )
    return ToolPlan("named", tools, parser, function=name, parallel=parallel)


def add_tool_options(params: dict[str, Any], plan: ToolPlan, renames: dict[str, str]) -> None:
    """Add the generation options of ``plan`` to ``params`` (checked again); a 400
    naming ``tool_choice`` when a forced call would replace a constraint the request
    asked for itself (response_format, guided_*)."""
    options = plan.generation_options()
    if "json_schema" in options:
        if any(params.get(name) for name in CONSTRAINT_FIELDS):
            raise ApiError(
                400,
                'tool_choice "required" or a named function constrains the answer to the '
                "tool call: it cannot be combined with response_format or a guided_* option",
                "tool_choice",
            )
        _check_tool_schemas(plan)
        # A schema the grammar engine cannot compile is the tools' fault: name them.
        renames["json_schema"] = "tools"
    params.update(options)
    GenerateParams.parse(**params)  # InvalidRequestError names the (mii) field


def _check_tool_schemas(plan: ToolPlan) -> None:
    """A 400 naming the tool and the keyword's place in its own ``parameters`` (not in
    the wrapping schema of "required") when a forced call's schema has a keyword the
    grammar engine would not enforce."""
    for i, tool in enumerate(plan.tools):
        name = tool["function"]["name"]
        if plan.mode == "named" and name != plan.function:
            continue
        problem = schema_problem(tool["function"].get("parameters") or NO_PARAMETERS)
        if problem:
            raise ApiError(
                400,
                f"tools[{i}] ({name!r}): its parameters schema cannot be enforced: {problem} "
                "(# is the function's parameters)",
                "tools",
            )


def warn_template_without_tools(tokenizer) -> None:
    """Log once per tokenizer when its chat template never reads ``tools``: the model
    then does not see them (what "auto" needs; "required" and named still work)."""
    template = getattr(tokenizer, "chat_template", None)
    if (
        isinstance(template, str)
        and "tools" not in template
        and id(tokenizer) not in _warned_templates
    ):
        _warned_templates.add(id(tokenizer))
        log.warning(
            "the model's chat template does not use tools: requests' tools are not shown "
            "to the model (give one that does: mii serve --chat-template, "
            "mii.serve(chat_template=...); in Python, set pipe.tokenizer.chat_template)"
        )


class ToolDeltas:
    """The stream deltas of one choice of a request with tools: content and
    ``tool_calls`` deltas in OpenAI's streamed shape."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.reader: ToolCallStream | None = (
            plan.parser.stream(plan.names) if plan.mode == "auto" and plan.parser else None
        )
        self.text = ""  # everything generated (required: parsed at the end)
        self.calls = 0  # calls sent
        self.named_id: str | None = None  # the named call's id, once its first delta is sent

    def feed(self, text: str) -> list[dict[str, Any]]:
        """The deltas that ``text`` (the next piece of the answer) makes known."""
        self.text += text
        if not text:
            return []
        if self.reader is not None:
            return self._events(self.reader.feed(text))
        if self.plan.mode == "named":
            return [self._named_delta(text)]
        if self.plan.mode == "required":
            return []  # the list of calls is parsed whole, at the end
        return [{"content": text}]

    def finish(self, finish_reason: str | None) -> tuple[list[dict[str, Any]], str | None]:
        """The last deltas and the choice's ``finish_reason``."""
        deltas: list[dict[str, Any]] = []
        if self.reader is not None:
            deltas = self._events(self.reader.finish())
        elif self.plan.mode == "named":
            self.calls = int(self.named_id is not None)
        elif self.plan.mode == "required":
            content, calls = self.plan.calls(self.text)
            deltas = self._events(calls or [content])
        return deltas, self.plan.finish_reason(self.calls, finish_reason)

    def _named_delta(self, text: str) -> dict[str, Any]:
        if self.named_id is None:
            [call] = self.plan.with_own_ids([ToolCall(str(self.plan.function), text)])
            self.named_id = call.id
            return {"tool_calls": [call.as_openai(index=0)]}
        return {"tool_calls": [{"index": 0, "function": {"arguments": text}}]}

    def _events(self, events: list[str | ToolCall | None]) -> list[dict[str, Any]]:
        deltas: list[dict[str, Any]] = []
        for event in events:
            if isinstance(event, ToolCall):
                if not self.plan.parallel and self.calls:
                    continue  # parallel_tool_calls false: the first call only
                deltas.append({"tool_calls": [event.as_openai(index=self.calls)]})
                self.calls += 1
            elif event:
                deltas.append({"content": event})
        return deltas


class ToolStreams:
    """The :class:`ToolDeltas` of every choice of a streamed request, made on first use."""

    def __init__(self, plan: ToolPlan) -> None:
        self.plan = plan
        self.choices: dict[int, ToolDeltas] = {}

    def chunks(self, index: int, piece: Response) -> list[tuple[dict[str, Any], str | None]]:
        """(delta, finish_reason) of each chunk that ``piece`` of choice ``index`` makes;
        its end adds a last chunk with an empty delta and the finish reason."""
        deltas = self.choices.setdefault(index, ToolDeltas(self.plan))
        chunks: list[tuple[dict[str, Any], str | None]] = [
            (d, None) for d in deltas.feed(piece.generated_text)
        ]
        if piece.finish_reason is not None:
            last, finish_reason = deltas.finish(piece.finish_reason)
            chunks += [(d, None) for d in last]
            chunks.append(({}, finish_reason))
        return chunks
