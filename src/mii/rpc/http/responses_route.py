"""``POST /v1/responses``: OpenAI's Responses API over the chat route's machinery.

The request becomes a chat request (:mod:`mii.rpc.http.responses_request`); its one
choice becomes a ``response`` object whose ``output`` holds a ``message`` item
(``output_text``, with ``logprobs`` when ``top_logprobs`` asks) and a
``function_call`` item per tool call; ``status`` is ``incomplete`` with
``incomplete_details.reason = "max_output_tokens"`` when the length limit cut it.

``stream: true`` sends Responses events (``event: TYPE`` + ``data: {...}``, each
with its ``sequence_number``): ``response.created``, ``response.in_progress``,
the output items' ``added`` / ``done`` events, ``response.output_text.delta`` as
text is generated, ``response.function_call_arguments.delta`` / ``.done``, and
``response.completed`` (or ``response.incomplete``). With ``tools`` the answer
is parsed whole before its events are sent (a call is known only at its end). An
error after the stream began is an ``error`` event, then ``response.failed``.

The route function carries no return annotation and no docstring on purpose:
FastAPI would validate answers against the one and publish the other in
``/openapi.json``.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import APIRouter, Request
from pydantic import ValidationError

from mii.errors import CONTEXT_LENGTH_EXCEEDED
from mii.response import Response, join_pieces
from mii.rpc.http.choices import merge_streams
from mii.rpc.http.disconnect import ClosingStreamingResponse, until_disconnected
from mii.rpc.http.errors import ANSWERED_ERRORS, ApiError, describe_validation_error, openai_errors
from mii.rpc.http.limits import LimitedRoute, run_off_loop
from mii.rpc.http.openai_answers import Answer
from mii.rpc.http.openai_routes import prepare_chat
from mii.rpc.http.protocol import ChatCompletionRequest
from mii.rpc.http.responses_request import (
    ResponsesRequest,
    auto_truncation,
    chat_body,
    refuse_stateful,
    responses_field,
    warn_ignored_fields,
)
from mii.rpc.http.sse import (
    StreamedLogprobs,
    accepted_pieces,
    stream_error_body,
    until_all_accepted,
)
from mii.rpc.http.state import get_state

router = APIRouter(prefix="/v1", route_class=LimitedRoute)


def _new_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def _as_chat(body: ResponsesRequest, max_length: int) -> ChatCompletionRequest:
    """The chat request of ``body``; its validation errors name the Responses fields."""
    try:
        return ChatCompletionRequest.model_validate(chat_body(body, max_length))
    except ValidationError as err:
        message, field = describe_validation_error(err)
        renamed = responses_field(field) if field else None
        if field and renamed != field:
            message = message.replace(repr(field), repr(renamed))
        raise ApiError(400, message, renamed) from None


@contextmanager
def _responses_errors(renames: dict[str, str]) -> Iterator[None]:
    """``openai_errors``, with this route's way out of a prompt too long (the
    engine's words name vLLM's truncate_prompt_tokens, which this route takes too)."""
    try:
        with openai_errors(renames):
            yield
    except ApiError as err:
        if err.code == CONTEXT_LENGTH_EXCEEDED:
            err.message += '; or ask for truncation: "auto" (the oldest input items go)'
        raise


def _first_set(*values: Any) -> Any:
    return next(v for v in values if v is not None)


class ResponseObject:
    """The ``response`` object of one request, filled as its answer arrives."""

    def __init__(
        self, body: ResponsesRequest, model: str, defaults: dict[str, Any] | None = None
    ) -> None:
        self.body = body
        # What sampled, as OpenAI reports it: the request's values, else the
        # deployment's defaults (the model's generation config), else OpenAI's 1.0.
        defaults = defaults or {}
        self.temperature = _first_set(body.temperature, defaults.get("temperature"), 1.0)
        self.top_p = _first_set(body.top_p, defaults.get("top_p"), 1.0)
        self.id = _new_id("resp")
        self.message_id = _new_id("msg")
        self.created_at = int(time.time())
        self.model = model

    def frame(
        self, status: str, output: list[dict[str, Any]], usage: dict[str, Any] | None
    ) -> dict[str, Any]:
        body = self.body
        incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": None,
            "incomplete_details": incomplete,
            "model": self.model,
            "instructions": body.instructions,
            "max_output_tokens": body.max_output_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_logprobs": body.top_logprobs,
            "parallel_tool_calls": body.parallel_tool_calls is not False,
            "tool_choice": body.tool_choice or "auto",
            "tools": body.tools or [],
            "text": body.text or {"format": {"type": "text"}},
            "metadata": body.metadata or {},
            "previous_response_id": None,
            "reasoning": body.reasoning.model_dump() if body.reasoning else None,
            "store": False,  # nothing is stored here
            "truncation": body.truncation or "disabled",
            "user": body.user,
            "output": output,
            "usage": usage,
        }

    def output(self, choice: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
        """The status and output items of the chat route's whole ``choice``."""
        message = choice["message"]
        status = "incomplete" if choice["finish_reason"] == "length" else "completed"
        items: list[dict[str, Any]] = []
        calls = message.get("tool_calls") or []
        if message.get("content") or not calls:
            logprobs = (choice.get("logprobs") or {}).get("content") or []
            items.append(self.message_item(message.get("content") or "", status, logprobs))
        for at, call in enumerate(calls):
            # Cut by max_output_tokens with no text: the last call is what was cut (a
            # named function's arguments, incomplete JSON). With text, the message is.
            cut = status == "incomplete" and not items and at == len(calls) - 1
            items.append(
                {
                    "type": "function_call",
                    "id": _new_id("fc"),
                    "call_id": call["id"],
                    "name": call["function"]["name"],
                    "arguments": call["function"]["arguments"],
                    "status": "incomplete" if cut else "completed",
                }
            )
        return status, items

    def message_item(
        self, text: str | None, status: str, logprobs: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        content = []
        if text is not None:
            content = [self.text_part(text, logprobs)]
        return {
            "type": "message",
            "id": self.message_id,
            "status": status,
            "role": "assistant",
            "content": content,
        }

    @staticmethod
    def text_part(text: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}


def _usage(response: Response) -> dict[str, Any]:
    return {
        "input_tokens": response.prompt_length,
        # (cache_write_tokens: OpenAI's billed cache writes; mii bills none. The SDK's
        # types require the field.)
        "input_tokens_details": {"cached_tokens": response.cached_tokens, "cache_write_tokens": 0},
        "output_tokens": response.generated_length,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": response.prompt_length + response.generated_length,
    }


def _finished(obj: ResponseObject, answer: Answer, response: Response) -> dict[str, Any]:
    """The whole ``response`` object of a generated answer."""
    status, items = obj.output(answer.choice(0, response))
    return obj.frame(status, items, _usage(response))


@router.post("/responses")
async def create_response(body: ResponsesRequest, request: Request):
    refuse_stateful(body)
    warn_ignored_fields(body)
    try:
        # (off the event loop: a conversation of many items takes a while to convert)
        chat = await run_off_loop(_as_chat, body, get_state(request).max_length)
        fit = chat.truncate_prompt_tokens if auto_truncation(body) else None  # whole items
        state, renames, choices, answer = await prepare_chat(request, chat, responses_field, fit)
    except ApiError as err:
        if err.param:
            err.param = responses_field(err.param)
        raise
    obj = ResponseObject(body, state.served_model, state.sampling_defaults)
    if not body.stream:
        with _responses_errors(renames):
            [response] = await until_disconnected(request, choices.generate(state))
        return _finished(obj, answer, response)
    pieces = merge_streams(choices.streams(state), state.pool.metrics)
    try:
        with _responses_errors(renames):
            early = await until_disconnected(request, until_all_accepted(pieces, choices.total))
    except BaseException:
        await pieces.aclose()
        raise
    events = _events(obj, answer, accepted_pieces(early, pieces), pieces, renames)
    return ClosingStreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


async def _events(
    obj: ResponseObject,
    answer: Answer,
    answers: AsyncIterator[tuple[int, Response]],
    pieces: AsyncIterator[tuple[int, Response | None]],
    renames: dict[str, str],
) -> AsyncIterator[str]:
    """The stream's events: ``answers`` are the pieces to send, read from the merged
    ``pieces`` (closed at the end, which aborts what is still generating)."""
    sequence = 0

    def event(kind: str, **fields: Any) -> str:
        nonlocal sequence
        data = {"type": kind, "sequence_number": sequence, **fields}
        sequence += 1
        return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    started = obj.frame("in_progress", [], None)
    yield event("response.created", response=started)
    yield event("response.in_progress", response=started)
    text_live = answer.tools is None  # with tools, the answer is parsed whole first
    at = {"item_id": obj.message_id, "output_index": 0, "content_index": 0}
    try:
        if text_live:
            yield event(
                "response.output_item.added",
                output_index=0,
                item=obj.message_item(None, "in_progress"),
            )
            yield event("response.content_part.added", **at, part=obj.text_part(""))
        collected = []
        held = StreamedLogprobs(answer.logprobs)  # each delta carries its tokens' logprobs
        async for _, piece in answers:
            collected.append(piece)
            held.add(0, piece)
            if text_live and piece.generated_text:
                delta = piece.generated_text
                logprobs = (held.take(0, delta) or {}).get("content") or []
                yield event("response.output_text.delta", **at, delta=delta, logprobs=logprobs)
        # Tokens whose text never came (the end-of-text token, text a stop string cut):
        # their logprobs in a last, empty delta, so that the deltas hold every token's.
        rest = (held.take(0, "") or {}).get("content") if text_live else None
        if rest:
            yield event("response.output_text.delta", **at, delta="", logprobs=rest)
        whole = _finished(obj, answer, join_pieces(collected))
        for index, output in enumerate(whole["output"]):
            for line in _item_events(event, index, output, announced=text_live and index == 0):
                yield line
        done = "response.incomplete" if whole["status"] == "incomplete" else "response.completed"
        yield event(done, response=whole)
    except ANSWERED_ERRORS as err:  # failed after the stream began
        error = stream_error_body(err, renames)["error"]
        yield event("error", code=error["code"], message=error["message"], param=error["param"])
        # ... and the response's own end, as OpenAI's streams end (status "failed")
        failed = obj.frame("failed", [], None)
        failed["error"] = {"code": _FAILURE_CODES.get(error["type"], "server_error"),
                           "message": error["message"]}  # fmt: skip
        yield event("response.failed", response=failed)
    finally:
        await pieces.aclose()  # aborts what is still generating


# A failed response's error code is one of OpenAI's (its SDK's ResponseError.code).
_FAILURE_CODES = {"invalid_request_error": "invalid_prompt", "requests": "rate_limit_exceeded"}


def _item_events(event, index: int, item: dict[str, Any], announced: bool) -> list[str]:
    """The events that end output item ``item`` (and, unless ``announced`` while its
    text streamed, the ones that add it and carry its whole text or arguments)."""
    lines = []
    if item["type"] == "message":
        at = {"item_id": item["id"], "output_index": index, "content_index": 0}
        part = item["content"][0]
        if not announced:
            added = {**item, "status": "in_progress", "content": []}
            lines.append(event("response.output_item.added", output_index=index, item=added))
            lines.append(event("response.content_part.added", **at, part={**part, "text": ""}))
            if part["text"] or part["logprobs"]:  # (its tokens' logprobs, as a live delta's)
                delta = {"delta": part["text"], "logprobs": part["logprobs"]}
                lines.append(event("response.output_text.delta", **at, **delta))
        text_done = {"text": part["text"], "logprobs": part["logprobs"]}
        lines.append(event("response.output_text.done", **at, **text_done))
        lines.append(event("response.content_part.done", **at, part=part))
    else:  # a function call
        added = {**item, "arguments": "", "status": "in_progress"}
        lines.append(event("response.output_item.added", output_index=index, item=added))
        at = {"item_id": item["id"], "output_index": index}
        lines.append(event("response.function_call_arguments.delta", **at, delta=item["arguments"]))
        lines.append(
            event("response.function_call_arguments.done", **at, arguments=item["arguments"])
        )
    lines.append(event("response.output_item.done", output_index=index, item=item))
    return lines
