"""Tool calls in a model's text: the output formats of common chat models.

A parser turns what a model wrote into plain content and OpenAI tool calls. It
reads text incrementally (:class:`ToolCallStream`), so the same code serves a
whole answer and a stream: text outside any call is content, sent as it comes,
except for a tail that may be the start of a call (held back until it is known);
a call is sent once it is complete.

The formats (``mii serve --tool-call-parser NAME``, :data:`TOOL_PARSERS`):

- ``hermes`` (Hermes 2 Pro, Qwen2.5, Qwen3): each call is
  ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, any number of
  them, possibly after some text. A last call left open at the end of the answer
  still counts when its JSON is complete.
- ``llama3_json`` (Llama 3.1 / 3.2 JSON tool calling): the answer is one or more
  ``{"name": ..., "parameters": {...}}`` objects (separated by ``;``), either the
  whole answer or after ``<|python_tag|>`` (text before the tag is content).
- ``mistral`` (Mistral-7B-Instruct-v0.3, Mixtral-8x22B-Instruct and other models of
  Mistral's v3 tokenizer): ``[TOOL_CALLS]`` then a JSON array of
  ``{"name": ..., "arguments": {...}}`` to the end of the answer. Mistral's chat
  templates accept only call ids of 9 letters and digits, so its calls get such ids.
  (The ``[TOOL_CALLS]name[ARGS]{...}`` form of Mistral's later tokenizers is not read.)

In every format a JSON array in a call region holds several calls. A call that
does not parse (malformed JSON, no ``name``) is kept as content, tags included,
never dropped and never an error.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from typing import Any


def new_call_id() -> str:
    """A fresh tool call id, shaped as OpenAI's (``call_`` and 24 characters)."""
    return f"call_{uuid.uuid4().hex[:24]}"


def short_call_id() -> str:
    """A fresh tool call id of 9 letters and digits (the only ids Mistral's chat
    templates accept in later turns)."""
    return uuid.uuid4().hex[:9]


@dataclass
class ToolCall:
    """One call: the function's name and its arguments as JSON text (OpenAI's shape)."""

    name: str
    arguments: str
    id: str = field(default_factory=new_call_id)

    def as_openai(self, index: int | None = None) -> dict[str, Any]:
        """The call as an item of OpenAI's ``tool_calls`` (with ``index`` in a stream delta)."""
        item: dict[str, Any] = {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }
        return item if index is None else {"index": index, **item}


def call_from_json(value: Any) -> ToolCall | None:
    """A call from a decoded ``{"name": ..., "arguments" | "parameters": {...}}``
    object; None when it is not one."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):  # already JSON text (some models write it so)
        try:
            json.loads(arguments)
        except ValueError:
            return None
        return ToolCall(value["name"], arguments)
    if not isinstance(arguments, dict):
        return None
    return ToolCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def json_objects(text: str, separators: str = ";") -> list[Any] | None:
    """Every JSON value in ``text``, one after another (separated by whitespace or
    one of ``separators``); None when any part does not parse."""
    decoder = json.JSONDecoder()
    values, position = [], 0
    while True:
        while position < len(text) and (text[position].isspace() or text[position] in separators):
            position += 1
        if position == len(text):
            return values or None
        try:
            value, position = decoder.raw_decode(text, position)
        except ValueError:
            return None
        values.append(value)


@dataclass(frozen=True)
class ToolParser:
    """One output format: how a call region starts (``start``), how it ends (``end``;
    None: at the end of the answer) and whether an answer that starts with a JSON
    object is a call region without the start tag (``bare_json``)."""

    name: str
    start: str
    end: str | None
    bare_json: bool = False
    short_ids: bool = False  # call ids of 9 letters and digits (Mistral's templates)

    def calls_in(self, region: str, known: frozenset[str] | None = None) -> list[ToolCall] | None:
        """The calls of one region (the text between the tags; a JSON array holds
        several); None: malformed, or a call of a function not in ``known`` (the
        request's tools; None: any)."""
        values = json_objects(region)
        if values is None:
            return None
        calls = [
            call_from_json(item) for v in values for item in (v if isinstance(v, list) else [v])
        ]
        if not calls or any(
            c is None or (known is not None and c.name not in known) for c in calls
        ):
            return None
        return self.with_own_ids(calls)  # type: ignore[arg-type]

    def with_own_ids(self, calls: list[ToolCall]) -> list[ToolCall]:
        """``calls`` with ids the models of this format take back (``short_ids``)."""
        if self.short_ids:
            for call in calls:
                call.id = short_call_id()
        return calls

    def stream(self, known: frozenset[str] | None = None) -> ToolCallStream:
        """A fresh incremental reader for one answer (calls of ``known`` functions)."""
        return ToolCallStream(self, known)

    def parse(
        self, text: str, known: frozenset[str] | None = None
    ) -> tuple[str | None, list[ToolCall]]:
        """A whole answer's content and calls (of ``known`` functions; None: any).
        Without calls the content is the text exactly; with calls it is the text
        outside them as a stream sends it (the whitespace around the calls left out),
        or None if empty."""
        reader = self.stream(known)
        events = reader.feed(text) + reader.finish()
        content = "".join(e for e in events if isinstance(e, str))
        calls = [e for e in events if isinstance(e, ToolCall)]
        if not calls:
            return text, []
        # (not content.strip(): an answer's leading spaces before its first call are
        # streamed as they come, and the whole answer said otherwise: a user trial)
        return content or None, calls


# Event of a ToolCallStream: content text, or a complete call.
Event = str | ToolCall


def _held_prefix(text: str, tag: str) -> int:
    """How many characters at the end of ``text`` may be the start of ``tag``."""
    for size in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-size:]):
            return size
    return 0


class ToolCallStream:
    """Reads one answer piece by piece; :meth:`feed` and :meth:`finish` return the
    events that are known: content text, and calls once complete. Whitespace-only
    content is held until more text follows (and dropped at the end when calls were
    made), so that the newlines around calls do not become content."""

    def __init__(self, parser: ToolParser, known: frozenset[str] | None = None) -> None:
        self.parser = parser
        self.known = known  # the functions a call may name (None: any)
        self.pending = ""  # text not yet sent: held content, or an open call region
        self.in_call = False
        self.started = False  # whether any non-whitespace text has been read
        self.calls = 0  # calls sent so far
        self._sent_content = False  # whether any content event was sent
        self._bare = False  # whether the open region began as a bare JSON object
        # Whitespace just before the open region: dropped if the region is a call,
        # sent with it if not (the answer's text then stays exactly as written).
        self._lead = ""

    def feed(self, text: str) -> list[Event]:
        """The events that ``text`` (the next piece of the answer) completes."""
        self.pending += text
        events: list[Event] = []
        while True:
            if self.in_call:
                if not self._close_call(events):
                    return events
            elif not self._open_call(events):
                return events

    def finish(self) -> list[Event]:
        """The events left at the end of the answer: an open call, held content."""
        events: list[Event] = []
        if self.in_call:
            region, raw = self.pending, self.parser.start + self.pending
            if self.parser.end is not None and self.parser.end in region:
                region = region[: region.index(self.parser.end)]
            self._emit_region(region, raw, events)
        elif self.pending and not (self.calls and not self.pending.strip()):
            self._send(self.pending, events)
        self.pending, self.in_call = "", False
        return events

    # --- one step each: True when it changed state and may be called again ----------

    def _open_call(self, events: list[Event]) -> bool:
        text, start = self.pending, self.parser.start
        if self.parser.bare_json and not self.started:
            stripped = text.lstrip()
            if not stripped:
                return False  # only whitespace so far: nothing is known yet
            self.started = True
            if stripped.startswith("{"):
                self._lead = text[: len(text) - len(stripped)]
                self.pending, self.in_call = stripped, True
                self._bare = True
                return True
        found = text.find(start)
        if found >= 0:
            body = text[:found].rstrip()
            self._lead = text[len(body) : found]  # the whitespace right before the tag
            self._content(body, events)
            self.pending, self.in_call, self._bare = text[found + len(start) :], True, False
            return True
        held = _held_prefix(text, start)
        # Trailing whitespace waits too (it goes if a call follows), so that how the
        # answer is cut into pieces never changes its content.
        sendable = text[: len(text) - held].rstrip()
        if sendable:
            self.started = True
            self._content(sendable, events)
            self.pending = text[len(sendable) :]
        return False

    def _close_call(self, events: list[Event]) -> bool:
        end = self.parser.end
        if end is None:
            return False  # the region runs to the end of the answer: see finish()
        found = self.pending.find(end)
        if found < 0:
            return False
        region = self.pending[:found]
        raw = self.parser.start + region + end
        self.pending, self.in_call = self.pending[found + len(end) :], False
        self._emit_region(region, raw, events)
        return True

    def _emit_region(self, region: str, raw: str, events: list[Event]) -> None:
        calls = self.parser.calls_in(region, self.known)
        lead, self._lead = self._lead, ""
        if calls is None:  # malformed or unknown: what the model wrote stays, as content
            self._send(lead + (region if self._bare else raw), events)
            return
        self.calls += len(calls)
        events.extend(calls)

    def _content(self, text: str, events: list[Event]) -> None:
        if text.strip():  # whitespace alone waits in pending (or, before a call, goes)
            self._send(text, events)

    def _send(self, text: str, events: list[Event]) -> None:
        if self.calls and not self._sent_content:
            # The answer's first content, after its calls: its leading whitespace goes, as
            # it does from a whole answer's content (the calls' separator, not text).
            text = text.lstrip()
        if text:
            self._sent_content = True
            events.append(text)


HERMES = ToolParser("hermes", "<tool_call>", "</tool_call>")
LLAMA3_JSON = ToolParser("llama3_json", "<|python_tag|>", None, bare_json=True)
MISTRAL = ToolParser("mistral", "[TOOL_CALLS]", None, short_ids=True)

# --tool-call-parser NAME -> its parser.
TOOL_PARSERS: dict[str, ToolParser] = {p.name: p for p in (HERMES, LLAMA3_JSON, MISTRAL)}


def get_parser(name: str) -> ToolParser:
    """The parser named ``name``; ValueError listing the known names otherwise."""
    try:
        return TOOL_PARSERS[name]
    except KeyError:
        raise ValueError(
            f"unknown tool call parser {name!r} (known: {', '.join(sorted(TOOL_PARSERS))})"
        ) from None
