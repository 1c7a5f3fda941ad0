"""Streaming the choices of an OpenAI request as server-sent events.

Each piece of text becomes one ``data: {chunk}`` event; a choice's end one more
event with its ``finish_reason``; ``stream_options.include_usage`` adds a last
chunk with no choices and the usage of all of them (and ``continuous_usage_stats``,
vLLM's, in every chunk the usage so far of that chunk's choice: its prompt and its
tokens). An error after the stream began (its 200
is already sent) becomes an ``{"error": ...}`` event. The stream always ends
with ``data: [DONE]``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from fastapi import Request

from mii.errors import InvalidRequestError
from mii.response import Response
from mii.rpc.http.choices import Choices, Usage, merge_streams
from mii.rpc.http.disconnect import ClosingStreamingResponse, until_disconnected
from mii.rpc.http.errors import (
    ANSWERED_ERRORS,
    ApiError,
    api_error,
    openai_error_body,
    openai_errors,
    renamed,
)
from mii.rpc.http.openai_answers import Answer
from mii.rpc.http.openai_logprobs import LogprobFormatter
from mii.rpc.http.state import GatewayState
from mii.rpc.http.tools import ToolStreams


def sse(data: dict[str, Any] | str) -> str:
    """One server-sent event."""
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n"


def stream_error_body(err: BaseException, renames: dict[str, str]) -> dict[str, Any]:
    """The error event of a stream that failed after it began."""
    if isinstance(err, InvalidRequestError):
        message, field = renamed(err, renames)
        err = ApiError(400, message, field)
    elif isinstance(err, TimeoutError):
        # Mid-stream, a timeout is reported like any failure: by its class.
        err = ApiError(500, f"{type(err).__name__}: {err}")
    elif not isinstance(err, ApiError):
        err = api_error(err)
    return openai_error_body(err.message, err.status, err.param, err.code)


class StreamedLogprobs:
    """The logprobs of each streamed choice's tokens, held until a chunk carries
    them: a token whose text is held back (a split character, a possible stop
    string) sends its logprobs with the next chunk that has text, or the last."""

    def __init__(self, formatter: LogprobFormatter | None) -> None:
        self.formatter = formatter
        self.pending: dict[int, Response] = {}  # index -> logprobs not sent yet
        self.offsets: dict[int, int] = {}  # index -> the next token's text_offset

    def add(self, index: int, piece: Response) -> None:
        if self.formatter is None or (piece.logprobs is None and piece.prompt_logprobs is None):
            return
        held = self.pending.setdefault(index, Response("", 0, 0, logprobs=[]))
        held.logprobs.extend(piece.logprobs or ())
        if piece.prompt_logprobs is not None:
            held.prompt_logprobs = piece.prompt_logprobs
            held.prompt_token_ids = piece.prompt_token_ids

    def take(self, index: int, text: str) -> dict[str, Any] | None:
        """The logprobs for the chunk of choice ``index`` that sends ``text``."""
        held = self.pending.pop(index, None)
        if held is None:
            return None
        answer, self.offsets[index] = self.formatter.chunk_logprobs(
            held.logprobs,
            held.prompt_logprobs,
            held.prompt_token_ids,
            self.offsets.get(index, 0),
            text,
        )
        return answer


async def accepted_pieces(
    early: list[tuple[int, Response]], pieces: AsyncIterator[tuple[int, Response | None]]
) -> AsyncIterator[tuple[int, Response]]:
    """The pieces read before the answer started, then the rest (acceptances left out)."""
    for item in early:
        yield item
    async for index, piece in pieces:
        if piece is not None:
            yield index, piece


async def until_all_accepted(
    pieces: AsyncIterator[tuple[int, Response | None]], total: int
) -> list[tuple[int, Response]]:
    """Read the merged streams until every one of ``total`` choices was accepted
    (its ``None``, or a first piece); return the pieces read meanwhile. A refusal of
    any choice raises here, before the answer starts."""
    started: set[int] = set()
    early: list[tuple[int, Response]] = []
    while len(started) < total:
        item = await anext(pieces, None)
        if item is None:  # every stream ended
            break
        index, piece = item
        started.add(index)
        if piece is not None:
            early.append((index, piece))
    return early


@dataclass(frozen=True)
class UsageReport:
    """Where a stream reports its usage: a last chunk (``include_usage``), and with
    ``continuous`` (vLLM's ``continuous_usage_stats``) every chunk, as counted so far."""

    final: bool = False
    continuous: bool = False

    @classmethod
    def of(cls, options: Any) -> UsageReport:
        """From a request's ``stream_options`` (None: no usage)."""
        if options is None or not options.include_usage:
            return cls()
        return cls(final=True, continuous=bool(options.continuous_usage_stats))


async def stream_choices(
    request: Request,
    state: GatewayState,
    choices: Choices,
    answer: Answer,
    report: UsageReport,
    renames: dict[str, str],
) -> ClosingStreamingResponse:
    """An SSE response over every choice's stream. It starts once the engine has
    accepted every choice (before their first tokens), so that a request of which
    it refuses any prompt still gets a 400, whichever replica answers first."""
    pieces = merge_streams(choices.streams(state), state.pool.metrics)
    try:
        with openai_errors(renames):
            early = await until_disconnected(request, until_all_accepted(pieces, choices.total))
    except BaseException:
        await pieces.aclose()
        raise
    usage = Usage(choices.n)
    if report.continuous:  # the prompts' sizes, for the first chunks' usage
        for number, prompt in enumerate(choices.prompts):
            if isinstance(prompt, list):  # token ids (every chat prompt)
                usage.add_prompt(number * choices.n, len(prompt))
        for index, piece in early:
            usage.add_prompt(index, piece.prompt_length)

    def event(index: int, data: dict[str, Any]) -> str:
        if report.final:  # vLLM's continuous usage: the chunk's own choice so far
            data["usage"] = usage.choice_dict(index) if report.continuous else None
        return sse(data)

    async def body() -> AsyncIterator[str]:
        try:
            if answer.kind.with_role:
                # A forced call's answer opens with content null, as OpenAI's does (with
                # "", the SDK's stream helpers gave its message content "" and an empty
                # content event); any other with "", as vLLM's.
                forced = answer.tools is not None and answer.tools.mode in ("required", "named")
                opening = {"role": "assistant", "content": None if forced else ""}
                for index in range(choices.total):
                    yield event(index, answer.delta_chunk(index, opening, None))
            logprobs = StreamedLogprobs(answer.logprobs)
            tools = ToolStreams(answer.tools) if answer.tools is not None else None
            async for index, piece in accepted_pieces(early, pieces):
                usage.add(index, piece)
                logprobs.add(index, piece)
                if tools is not None:  # content and tool_calls deltas
                    for delta, finish in tools.chunks(index, piece):
                        chunk_logprobs = logprobs.take(index, delta.get("content") or "")
                        stop = piece.stop_reason if finish is not None else None
                        chunk = answer.delta_chunk(index, delta, finish, chunk_logprobs, stop)
                        yield event(index, chunk)
                elif piece.generated_text:
                    chunk_logprobs = logprobs.take(index, piece.generated_text)
                    yield event(
                        index, answer.chunk(index, piece.generated_text, None, None, chunk_logprobs)
                    )
                if piece.finish_reason is not None and tools is None:
                    chunk_logprobs = logprobs.take(index, "")
                    finish, stop = piece.finish_reason, piece.stop_reason
                    chunk = answer.chunk(index, None, finish, None, chunk_logprobs, stop)
                    yield event(index, chunk)
            if report.final:
                final = answer.chunk(0, None, None, None)
                final["choices"] = []
                final["usage"] = usage.as_dict()
                yield sse(final)
        except ANSWERED_ERRORS as err:  # failed after the stream began
            yield sse(stream_error_body(err, renames))
        finally:
            await pieces.aclose()  # aborts what is still generating
        yield sse("[DONE]")

    return ClosingStreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
