"""OpenAI's Responses API request (``POST /v1/responses``) and its meaning as a chat
completion request.

A Responses request is a chat request written otherwise: ``input`` (a text, or a
list of items: messages, the model's earlier ``function_call`` items and their
``function_call_output`` items), ``instructions`` (a system message before them),
``max_output_tokens``, ``text.format`` (``response_format``), flat function
``tools`` and ``tool_choice``. :func:`chat_body` rewrites it as the body of
``/v1/chat/completions``, so that both routes share one prompt, one set of
options and one tool-call parser; 400s name the Responses fields.

This server keeps no state between requests: ``previous_response_id``,
``conversation``, stored ``prompt`` templates and ``background`` runs are refused
(send the whole conversation in ``input``); ``store`` is accepted and nothing is
stored. Built-in tools (web search, file search, ...) and non-text input parts
are refused.
"""

from __future__ import annotations

import logging
from typing import Any, Literal

from pydantic import ConfigDict, Field, field_validator

from mii.rpc.http.errors import ApiError
from mii.rpc.http.field_policy import ServiceFields, warn_ignored
from mii.rpc.http.request_fields import RequestFields
from mii.rpc.http.structured import check_schema_spec_types

log = logging.getLogger(__name__)

# Chat fields (and what is under them) -> the Responses request's names, for 400s.
_FIELD_NAMES = {
    "max_completion_tokens": "max_output_tokens",
    "max_tokens": "max_output_tokens",
    "response_format.json_schema": "text.format",
    "response_format": "text.format",
    "messages": "input",
    "logprobs": "top_logprobs",
}


def responses_field(field: str) -> str:
    """The Responses request's name of the chat request's ``field`` (dotted)."""
    if field.startswith("tools.") and ".function" in field:  # tools.0.function.parameters
        return field.replace(".function", "", 1)
    for chat, ours in _FIELD_NAMES.items():
        if field == chat or field.startswith(chat + "."):
            return ours + field[len(chat) :]
    return field


# OpenAI's ``include`` values; only the logprobs change an answer here (the others
# ask for the outputs of built-in tools and images, which this server has none of).
LOGPROBS_INCLUDE = "message.output_text.logprobs"
INCLUDE_VALUES = (
    LOGPROBS_INCLUDE,
    "reasoning.encrypted_content",
    "message.input_image.image_url",
    "computer_call_output.output.image_url",
    "code_interpreter_call.outputs",
    "file_search_call.results",
    "web_search_call.results",
    "web_search_call.action.sources",
)


class ResponsesStreamOptions(RequestFields):
    # The Responses route's stream_options (no docstring: it would change the served
    # /openapi.json). Its completed event always has the usage: include_usage, which
    # chat-minded adapters send, asks for nothing more.
    model_config = ConfigDict(extra="forbid")

    include_obfuscation: bool | None = None  # ignored (IGNORED_FIELDS)
    include_usage: bool | None = None


class Reasoning(RequestFields):
    # A reasoning model's settings: the models served here have none (echoed as given).
    # Other keys pass: OpenAI adds them (context, mode), and none changes an answer here.
    model_config = ConfigDict(extra="allow")

    effort: str | None = None
    summary: str | None = None
    generate_summary: str | None = None


class ResponsesRequest(RequestFields, ServiceFields):
    # No docstring: it would change the served /openapi.json.
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    input: str | list[Any]  # (items checked by _messages, which names a bad one)
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    # Refused when set (this server keeps no state between requests)
    previous_response_id: str | None = None
    conversation: str | dict[str, Any] | None = None
    prompt: dict[str, Any] | None = None
    background: bool | None = None
    moderation: dict[str, Any] | None = None  # refused when set
    # "auto": keep the prompt's last tokens when it is too long (truncate_prompt_tokens -1)
    truncation: Literal["auto", "disabled"] | None = None
    # Ignored, changing nothing generated here (ServiceFields has the others)
    reasoning: Reasoning | None = None
    # Only "message.output_text.logprobs" changes the answer: it asks for logprobs
    include: list[str] | None = None
    stream_options: ResponsesStreamOptions | None = None
    max_tool_calls: int | None = Field(default=None, ge=0)  # (of built-in tools: none here)
    # vLLM's and mii's sampling extensions, as on the chat route
    seed: int | None = None
    stop: str | list[str] | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    ignore_eos: bool = False
    truncate_prompt_tokens: int | None = None

    @field_validator("include")
    @classmethod
    def _known_includes(cls, values: list[str] | None) -> list[str] | None:
        # A misspelt value passed silently (and with it the logprobs it meant: a trial).
        for value in values or ():
            if value not in INCLUDE_VALUES:
                raise ValueError(
                    f"{value!r} is not one of OpenAI's include values ({', '.join(INCLUDE_VALUES)})"
                )
        return values


_STATEFUL = {
    "previous_response_id": "this server stores no responses",
    "conversation": "this server stores no conversations",
    "prompt": "this server stores no prompt templates",
}


def refuse_stateful(body: ResponsesRequest) -> None:
    """400 naming the first field that asks for state this server does not keep."""
    for field, why in _STATEFUL.items():
        if getattr(body, field) is not None:
            raise ApiError(
                400, f"{field} is not supported: {why}; send the whole conversation in input", field
            )
    if body.moderation is not None:
        raise ApiError(400, "moderation is not supported by this server", "moderation")
    if body.background:
        raise ApiError(
            400, "background responses are not supported; leave background out", "background"
        )


def _text_of(content: Any, where: str) -> str:
    """The text of a message's ``content``: a string, or text parts joined by line
    breaks (as the chat route joins them)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, "content must be a string or a list of text parts", where)
    texts = []
    for at, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        key = "refusal" if kind == "refusal" else "text"  # an output's refusal: its text
        if kind not in ("input_text", "output_text", "text", "refusal"):
            raise ApiError(
                400,
                f"only text parts are supported ({{'type': 'input_text', 'text': ...}}; got "
                f"{kind!r})",
                f"{where}.{at}",
            )
        if not isinstance(part.get(key), str):
            raise ApiError(400, f"a {kind} part's {key} must be a string", f"{where}.{at}.{key}")
        texts.append(part[key])
    return "\n".join(texts)


# The keys each kind of input item is read by.
_ITEM_KEYS = {
    "message": ("role", "content"),
    "function_call": ("call_id", "name", "arguments"),
    "function_call_output": ("call_id", "output"),
}


def _refuse_misspelt_keys(item: dict[str, Any], kind: str, where: str) -> None:
    """A 400 for a key that is a near miss of a key the item is read by and lacks
    ("contents", "callid": dropped, the item was read without it). Other keys pass:
    OpenAI's items carry more (id, status, phase, namespace, ...) and gain new ones."""
    import difflib

    missing = [key for key in _ITEM_KEYS.get(kind, ()) if key not in item]
    for key in item:
        near = difflib.get_close_matches(str(key), missing, 1, 0.8)
        if near:
            raise ApiError(
                400,
                f"unknown field {key!r} in a {kind} item (did you mean {near[0]!r}?)",
                f"{where}.{key}",
            )


def _messages(body: ResponsesRequest) -> list[dict[str, Any]]:
    """The chat messages of ``instructions`` and ``input``."""
    messages: list[dict[str, Any]] = []
    if body.instructions:
        messages.append({"role": "system", "content": body.instructions})
    if isinstance(body.input, str):
        return [*messages, {"role": "user", "content": body.input}]
    if not body.input:
        raise ApiError(400, "input must not be empty", "input")
    calls: set[str] = set()  # the call_ids of the function_call items so far
    for at, item in enumerate(body.input):
        where = f"input.{at}"
        if not isinstance(item, dict):
            raise ApiError(
                400,
                f"{where} must be an input item (an object such as {{'role': 'user', "
                f"'content': ...}}), not {type(item).__name__}",
                where,
            )
        kind = item.get("type", "message")
        if not isinstance(kind, str):
            raise ApiError(
                400, f"an input item's type must be a string (got {kind!r})", f"{where}.type"
            )
        _refuse_misspelt_keys(item, kind, where)
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "assistant", "system", "developer"):
                raise ApiError(
                    400,
                    f"a message's role must be user, assistant, system or developer (got {role!r})",
                    f"{where}.role",
                )
            content = _text_of(item.get("content"), f"{where}.content")
            messages.append({"role": role, "content": content})
        elif kind == "function_call":
            call = _function_call(item, where)
            calls.add(call["id"])
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                # one assistant turn: its text (a message item) and its calls
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            output = item.get("output")
            if not isinstance(item.get("call_id"), str):
                raise ApiError(400, "a function_call_output needs its call_id", f"{where}.call_id")
            if item["call_id"] not in calls:  # (OpenAI's refusal: the model saw no call)
                raise ApiError(
                    400,
                    f"no function_call item with call_id {item['call_id']!r} comes before "
                    "this function_call_output: send the call with its output (this server "
                    "stores no responses: previous_response_id is not supported)",
                    f"{where}.call_id",
                )
            messages.append(
                {
                    "role": "tool",
                    "tool_call_id": item["call_id"],
                    "content": _text_of(output, f"{where}.output"),
                }
            )
        elif kind == "reasoning":
            continue  # a reasoning model's notes; the models served here write none
        else:
            raise ApiError(
                400,
                f"input items of type {kind!r} are not supported; use message, function_call "
                "or function_call_output",
                f"{where}.type",
            )
    return messages


def _function_call(item: dict[str, Any], where: str) -> dict[str, Any]:
    for key in ("call_id", "name", "arguments"):
        if not isinstance(item.get(key), str):
            raise ApiError(400, f"a function_call item needs {key!r} (a string)", f"{where}.{key}")
    return {
        "id": item["call_id"],
        "type": "function",
        "function": {"name": item["name"], "arguments": item["arguments"]},
    }


def _tools(tools: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Flat function tools ``{"type": "function", "name", "parameters", ...}`` in the
    chat route's nested shape."""
    chat_tools = []
    for at, tool in enumerate(tools):
        if tool.get("type") != "function":
            raise ApiError(
                400,
                f"only function tools are supported (got {tool.get('type')!r})",
                f"tools.{at}.type",
            )
        function = {k: v for k, v in tool.items() if k != "type"}
        chat_tools.append({"type": "function", "function": function})
    return chat_tools


def _tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if not isinstance(choice, dict):
        return choice
    if choice.get("type") != "function" or not isinstance(choice.get("name"), str):
        raise ApiError(
            400,
            "tool_choice must be 'none', 'auto', 'required' or {'type': 'function', 'name': ...}",
            "tool_choice",
        )
    return {"type": "function", "function": {"name": choice["name"]}}


# The keys of text.format by its type (OpenAI's flat form of the chat route's
# response_format: name, schema, description and strict beside the type).
_FORMAT_KEYS = {
    "text": {"type"},
    "json_object": {"type"},
    "json_schema": {"type", "name", "schema", "description", "strict"},
}


def _response_format(text: dict[str, Any] | None) -> dict[str, Any] | None:
    """``text.format`` as the chat route's ``response_format``. A key that is not
    OpenAI's is a 400 naming it: a misplaced schema would constrain nothing."""
    if not text:
        return None
    for key in text:
        if key not in ("format", "verbosity"):
            raise ApiError(400, f"unknown field 'text.{key}'; text takes format", f"text.{key}")
    if text.get("verbosity") not in (None, "low", "medium", "high"):
        raise ApiError(400, "text.verbosity must be 'low', 'medium' or 'high'", "text.verbosity")
    spec = text.get("format")
    if spec is None:
        return None
    if not isinstance(spec, dict):
        raise ApiError(400, "text.format must be an object", "text.format")
    kind = spec.get("type")
    if not isinstance(kind, str) or kind not in _FORMAT_KEYS:
        raise ApiError(
            400,
            f"text.format type {kind!r} is not supported; use 'text', 'json_object' or "
            "'json_schema'",
            "text.format.type",
        )
    extra = sorted(set(spec) - _FORMAT_KEYS[kind])
    if extra:
        raise ApiError(
            400,
            f"text.format of type {kind!r} takes no {extra[0]!r}; a schema goes in "
            '{"type": "json_schema", "name": ..., "schema": {...}}',
            f"text.format.{extra[0]}",
        )
    check_schema_spec_types(spec, "text.format")
    if kind != "json_schema":
        return {"type": kind}
    inner = {k: v for k, v in spec.items() if k != "type"}
    return {"type": "json_schema", "json_schema": inner}


def warn_ignored_fields(body: ResponsesRequest) -> None:
    """Log, once per field, what the request sets that changes nothing here (as the
    chat route does): OpenAI's service fields, ``reasoning``, ``max_tool_calls``, and
    ``include`` values other than the logprobs."""
    warn_ignored(body)
    others = sorted(set(body.include or ()) - {LOGPROBS_INCLUDE})
    if others and "include" not in _warned:
        _warned.add("include")
        log.warning(
            "ignoring the include values %s: they ask for the outputs of OpenAI's built-in "
            "tools and images, which this server has none of (logged once)",
            others,
        )


_warned: set[str] = set()  # what warn_ignored_fields has logged (beyond warn_ignored's)


def _wants_logprobs(body: ResponsesRequest) -> bool:
    """OpenAI asks for the answer's logprobs with ``include``; ``top_logprobs``
    (0 too) asks for them as well."""
    return body.top_logprobs is not None or LOGPROBS_INCLUDE in (body.include or ())


def chat_body(body: ResponsesRequest, max_length: int) -> dict[str, Any]:
    """The ``/v1/chat/completions`` body that asks for what ``body`` asks
    (``max_length``: the deployment's, for ``truncation: "auto"``)."""
    chat: dict[str, Any] = {
        "model": body.model,
        "messages": _messages(body),
        "max_completion_tokens": body.max_output_tokens,
        "response_format": _response_format(body.text),
        "parallel_tool_calls": body.parallel_tool_calls,
        "tool_choice": _tool_choice(body.tool_choice),
        "tools": _tools(body.tools) if body.tools else None,
    }
    if _wants_logprobs(body):
        chat |= {"logprobs": True, "top_logprobs": body.top_logprobs or 0}
    for name in (
        "temperature", "top_p", "seed", "stop", "top_k", "min_p", "repetition_penalty",
        "presence_penalty", "frequency_penalty", "ignore_eos", "truncate_prompt_tokens",
    ):  # fmt: skip
        chat[name] = getattr(body, name)
    if auto_truncation(body):
        chat["truncate_prompt_tokens"] = prompt_room(max_length, body.max_output_tokens)
    return {k: v for k, v in chat.items() if v is not None}


def auto_truncation(body: ResponsesRequest) -> bool:
    """Whether the gateway fits the conversation (``truncation: "auto"``, unless
    vLLM's ``truncate_prompt_tokens`` says how)."""
    return body.truncation == "auto" and body.truncate_prompt_tokens is None


def prompt_room(max_length: int, max_output_tokens: int | None) -> int:
    """The prompt tokens ``truncation: "auto"`` keeps: the context window less room
    for the answer, ``max_output_tokens`` up to a quarter of the window (a cap
    as large as the window, a client's safety limit, left the prompt nothing; none
    at all left one token of answer)."""
    quarter = max(1, max_length // 4)
    room = quarter if max_output_tokens is None else max(1, min(max_output_tokens, quarter))
    return max(1, max_length - room)
