"""OpenAI-compatible routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

The served model is the deployment's model string; the deployment name is
accepted as an alias, and ``model`` may be left out. OpenAI options map onto
mii's generation options as follows:

- ``max_tokens`` (chat: also ``max_completion_tokens``) -> ``max_new_tokens``.
  Completions default to 16 as OpenAI does; chat defaults to the room left
  under the model's ``max_length``.
- ``temperature`` (default 1.0): 0 means greedy (``do_sample=False``).
- ``top_p`` defaults to 1.0 (OpenAI's default, not mii's 0.9).
- ``n``: n independent samples of every prompt. With a ``seed``, choice 0 uses
  the seed itself and choice i a seed derived from (seed, i), so that choices
  differ and the whole answer is reproducible.
- ``stop``, ``seed``, ``stream`` (SSE, ended by ``data: [DONE]``),
  ``stream_options.include_usage``, ``echo`` (completions: the prompt is put
  before the text).
- mii extensions: ``ignore_eos``, ``top_k``, ``min_tokens`` (-> ``min_new_tokens``).

Options the engine cannot honour (``logprobs``, ``logit_bias``, non-zero
penalties, ``suffix``, ``best_of`` other than ``n``, tools, non-text response
formats, token-id prompts) are refused with 400 naming them, never silently
ignored; unknown fields are refused too.

Chat prompts come from the tokenizer's chat template
(``apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``).
When the tokenizer has none, the fallback template renders each message as
``"{role}: {content}\\n"`` and ends with ``"assistant:"``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, field_validator

from mii.config import GenerateParams
from mii.errors import InvalidRequestError, MiiError
from mii.response import Response
from mii.rpc.gateway import (
    ApiError,
    ClosingStreamingResponse,
    GatewayState,
    get_state,
    openai_error_body,
    until_disconnected,
)
from mii.rpc.pool import NoReplicaError

router = APIRouter(prefix="/v1")

MAX_CHOICES = 128  # n times the number of prompts
_SEED_SPACE = 2**63


# ----- request bodies ------------------------------------------------------------


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: bool = False


class _Common(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # mii extensions
    ignore_eos: bool = False
    top_k: int | None = None
    min_tokens: int = 0


class CompletionRequest(_Common):
    prompt: str | list[str]
    max_tokens: int | None = Field(default=16, ge=0)
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt_is_text(cls, value: Any) -> Any:
        if isinstance(value, str):
            return value
        if isinstance(value, list) and value and all(isinstance(p, str) for p in value):
            return value
        raise ValueError(
            "prompt must be a string or a non-empty list of strings "
            "(token-id prompts are not supported)"
        )


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")  # e.g. tool_calls, passed to the template

    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=0)
    max_completion_tokens: int | None = Field(default=None, ge=0)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None


# ----- request checks and option mapping ---------------------------------------------


def _bad(message: str, param: str | None, status: int = 400, code: str | None = None):
    return ApiError(status, message, param, code)


def check_model(state: GatewayState, name: str | None) -> None:
    if name is None or name in (state.model, state.deployment_name):
        return
    raise _bad(
        f"the model {name!r} does not exist; this server serves {state.model!r}",
        "model",
        status=404,
        code="model_not_found",
    )


def _refuse_common(body: _Common) -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        if getattr(body, name) not in (None, 0):
            raise _bad(f"{name} is not supported by this server; leave it at 0", name)
    if body.logit_bias:
        raise _bad("logit_bias is not supported by this server", "logit_bias")
    if body.stream_options is not None and not body.stream:
        raise _bad("stream_options is only allowed when stream is true", "stream_options")


def _refuse_completion(body: CompletionRequest) -> None:
    _refuse_common(body)
    if body.logprobs is not None:
        raise _bad("logprobs are not supported by this server", "logprobs")
    if body.best_of not in (None, body.n):
        raise _bad("best_of is not supported by this server (use n)", "best_of")
    if body.suffix:
        raise _bad("suffix is not supported by this server", "suffix")


def _refuse_chat(body: ChatCompletionRequest) -> None:
    _refuse_common(body)
    if body.logprobs or body.top_logprobs:
        name = "logprobs" if body.logprobs else "top_logprobs"
        raise _bad("logprobs are not supported by this server", name)
    if body.tools:
        raise _bad("tools (function calling) are not supported by this server", "tools")
    if body.tool_choice not in (None, "none", "auto"):
        raise _bad("tool_choice is not supported by this server", "tool_choice")
    if body.response_format and body.response_format.get("type", "text") != "text":
        raise _bad("only the 'text' response_format is supported", "response_format")


def generation_options(body: _Common, max_tokens: int | None, echo: bool = False) -> dict:
    """mii generation options for an OpenAI request (seed excluded: see choice_seed)."""
    params: dict[str, Any] = {
        "top_p": 1.0 if body.top_p is None else body.top_p,
        "ignore_eos": body.ignore_eos,
        "min_new_tokens": body.min_tokens,
    }
    if max_tokens is not None:
        params["max_new_tokens"] = max_tokens
    if body.temperature == 0:
        params["do_sample"] = False
    elif body.temperature is not None:
        params["temperature"] = body.temperature
    if body.top_k is not None:
        params["top_k"] = body.top_k
    if body.stop:
        params["stop"] = [body.stop] if isinstance(body.stop, str) else list(body.stop)
    if echo:
        params["return_full_text"] = True
    GenerateParams.parse(**params)  # InvalidRequestError names the (mii) field
    return params


def choice_seed(seed: int | None, choice: int) -> int | None:
    """Choice 0 uses ``seed`` itself; choice i a seed derived from (seed, i)."""
    if seed is None:
        return None
    base = seed % _SEED_SPACE  # OpenAI allows any 64-bit seed; mii wants [0, 2**63)
    if choice == 0:
        return base
    digest = hashlib.blake2b(f"{base}/{choice}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % _SEED_SPACE


@contextmanager
def openai_errors(renames: dict[str, str]) -> Iterator[None]:
    """Report mii's InvalidRequestError with OpenAI's names for the fields."""
    try:
        yield
    except InvalidRequestError as err:
        raise ApiError(400, *_renamed(err, renames)) from None


def _renamed(err: InvalidRequestError, renames: dict[str, str]) -> tuple[str, str | None]:
    """The message and field of ``err``, with the field under its OpenAI name."""
    field, message = err.field, str(err)
    if field in renames:
        message = message.replace(f"'{field}'", f"'{renames[field]}'")
        field = renames[field]
    return message, field


def _renames(body: _Common, chat: bool) -> dict[str, str]:
    renames = {"min_new_tokens": "min_tokens", "max_new_tokens": "max_tokens"}
    if chat:
        renames["prompt"] = "messages"
        if getattr(body, "max_completion_tokens", None) is not None:
            renames["max_new_tokens"] = "max_completion_tokens"
    else:
        renames["return_full_text"] = "echo"
    return renames


# ----- chat prompts ---------------------------------------------------------------


def _text_content(content: str | list[ContentPart] | None, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise _bad(
                f"only text content is supported (got a {part.type!r} part)",
                f"messages.{index}.content",
            )
        texts.append(part.text)
    return "".join(texts)


def render_chat(tokenizer, messages: list[dict[str, Any]]) -> str:
    """The prompt for ``messages``: the tokenizer's chat template, or the fallback
    ``"{role}: {content}\\n" ... "assistant:"``."""
    if getattr(tokenizer, "chat_template", None):
        try:
            text = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        except Exception as err:  # jinja raises for conversations the template refuses
            raise InvalidRequestError(
                f"the model's chat template rejected the messages: {err}", field="messages"
            ) from None
        # The engine tokenizes with special tokens; do not let a template's BOS double it.
        bos = getattr(tokenizer, "bos_token", None)
        if bos and text.startswith(bos) and _tokenizer_adds_bos(tokenizer):
            text = text[len(bos) :]
        return text
    lines = [f"{m['role']}: {m.get('content') or ''}\n" for m in messages]
    return "".join(lines) + "assistant:"


def _tokenizer_adds_bos(tokenizer) -> bool:
    ids = tokenizer("x").input_ids
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def chat_prompt(state: GatewayState, body: ChatCompletionRequest) -> str:
    messages = []
    for i, message in enumerate(body.messages):
        item = message.model_dump(exclude_none=True)
        item["content"] = _text_content(message.content, i)
        messages.append(item)
    return render_chat(state.tokenizer, messages)


# ----- running the choices ------------------------------------------------------------


class Choices:
    """Every (prompt, choice) of a request. Choice ``index`` = prompt * n + i."""

    def __init__(self, prompts: list[str], params: dict[str, Any], n: int, seed: int | None):
        if len(prompts) * n > MAX_CHOICES:
            raise _bad(f"at most {MAX_CHOICES} choices (prompts times n) per request", "n")
        self.prompts = prompts
        self.params = params
        self.n = n
        self.seed = seed

    def params_for(self, choice: int) -> dict[str, Any]:
        seed = choice_seed(self.seed, choice)
        return self.params if seed is None else {**self.params, "seed": seed}

    async def generate(self, state: GatewayState) -> list[Response]:
        """Whole answers, by choice index (one pool call per choice number)."""
        tasks = [
            asyncio.ensure_future(state.pool.generate(self.prompts, self.params_for(i)))
            for i in range(self.n)
        ]
        try:
            by_choice = await asyncio.gather(*tasks)  # [i][prompt]
        finally:
            for task in tasks:
                task.cancel()
        return [by_choice[i][p] for p in range(len(self.prompts)) for i in range(self.n)]

    def streams(self, state: GatewayState) -> list[tuple[int, AsyncIterator[Response]]]:
        return [
            (p * self.n + i, state.pool.stream(prompt, self.params_for(i)))
            for p, prompt in enumerate(self.prompts)
            for i in range(self.n)
        ]


_END = object()


async def merge_streams(
    streams: list[tuple[int, AsyncIterator[Response]]],
) -> AsyncIterator[tuple[int, Response]]:
    """Pieces of several streams as (index, piece), in arrival order. Closing this
    iterator closes every stream (which aborts their requests)."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: AsyncIterator[Response]) -> None:
        try:
            async for piece in stream:
                queue.put_nowait((index, piece))
        except Exception as err:
            queue.put_nowait((index, err))
        finally:
            await stream.aclose()
            queue.put_nowait((index, _END))

    tasks = [asyncio.create_task(pump(index, stream)) for index, stream in streams]
    try:
        remaining = len(tasks)
        while remaining:
            index, item = await queue.get()
            if item is _END:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()


async def _next(iterator: AsyncIterator):
    return await iterator.__anext__()


class Usage:
    def __init__(self, n: int) -> None:
        self.n = n
        self.prompt: dict[int, int] = {}  # prompt number -> prompt tokens
        self.completion: dict[int, int] = {}  # choice index -> generated tokens

    def add(self, index: int, response: Response) -> None:
        self.prompt[index // self.n] = response.prompt_length
        self.completion[index] = response.generated_length

    def as_dict(self) -> dict[str, int]:
        prompt, completion = sum(self.prompt.values()), sum(self.completion.values())
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
        }


def _sse(data: dict[str, Any] | str) -> str:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
    return f"data: {text}\n\n"


def _stream_error_body(err: BaseException, renames: dict[str, str]) -> dict[str, Any]:
    if isinstance(err, ApiError):
        return openai_error_body(err.message, err.status, err.param, err.code)
    if isinstance(err, InvalidRequestError):
        message, field = _renamed(err, renames)
        return openai_error_body(message, 400, field)
    if isinstance(err, NoReplicaError):
        return openai_error_body(str(err), 503, code="no_replica_available")
    return openai_error_body(f"{type(err).__name__}: {err}", 500)


async def stream_choices(
    request: Request,
    state: GatewayState,
    choices: Choices,
    chunk,  # (index, text, finish_reason, role) -> chunk dict without usage
    include_usage: bool,
    renames: dict[str, str],
    with_role: bool,
) -> ClosingStreamingResponse:
    """An SSE response over every choice's stream. The first piece is awaited
    before answering, so that a request the engine refuses still gets a 400."""
    pieces = merge_streams(choices.streams(state))
    try:
        with openai_errors(renames):
            first = await until_disconnected(request, _next(pieces))
    except BaseException:
        await pieces.aclose()
        raise
    usage = Usage(choices.n)
    total = len(choices.prompts) * choices.n

    def event(data: dict[str, Any]) -> str:
        if include_usage:
            data["usage"] = None
        return _sse(data)

    async def body() -> AsyncIterator[str]:
        try:
            if with_role:
                for index in range(total):
                    yield event(chunk(index, "", None, "assistant"))
            item = first
            while item is not None:
                index, piece = item
                usage.add(index, piece)
                if piece.generated_text:
                    yield event(chunk(index, piece.generated_text, None, None))
                if piece.finish_reason is not None:
                    yield event(chunk(index, None, piece.finish_reason, None))
                item = await anext(pieces, None)
            if include_usage:
                final = chunk(0, None, None, None)
                final["choices"] = []
                final["usage"] = usage.as_dict()
                yield _sse(final)
        except (MiiError, TimeoutError, ApiError) as err:  # failed after the stream began
            yield _sse(_stream_error_body(err, renames))
        finally:
            await pieces.aclose()  # aborts what is still generating
        yield _sse("[DONE]")

    return ClosingStreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


# ----- routes ----------------------------------------------------------------------


def _model_card(state: GatewayState) -> dict[str, Any]:
    return {
        "id": state.model,
        "object": "model",
        "created": state.created,
        "owned_by": "mii",
        "max_model_len": state.max_length,
    }


@router.get("/models")
async def list_models(request: Request):
    return {"object": "list", "data": [_model_card(get_state(request))]}


@router.get("/models/{model:path}")
async def retrieve_model(model: str, request: Request):
    state = get_state(request)
    check_model(state, model)
    return _model_card(state)


async def _respond(
    request: Request,
    state: GatewayState,
    body: _Common,
    choices: Choices,
    chunk,  # as for stream_choices
    renames: dict[str, str],
    *,
    header: dict[str, Any],
    content,  # Response -> the choice's own fields
    with_role: bool,
):
    """Stream the choices as ``chunk``s when the body asks to; else wait for them all and
    answer one object: ``header`` (id, object, created), then each choice with its
    ``content(response)`` fields, and the usage."""
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await stream_choices(
            request, state, choices, chunk, include_usage, renames, with_role=with_role
        )
    with openai_errors(renames):
        responses = await until_disconnected(request, choices.generate(state))
    usage = Usage(body.n)
    for index, response in enumerate(responses):
        usage.add(index, response)
    return {
        **header,
        "model": state.model,
        "choices": [
            {
                "index": index,
                **content(r),
                "logprobs": None,
                "finish_reason": r.finish_reason,
            }
            for index, r in enumerate(responses)
        ],
        "usage": usage.as_dict(),
        "system_fingerprint": None,
    }


@router.post("/completions")
async def create_completion(body: CompletionRequest, request: Request):
    state = get_state(request)
    check_model(state, body.model)
    _refuse_completion(body)
    renames = _renames(body, chat=False)
    with openai_errors(renames):
        params = generation_options(body, body.max_tokens, echo=body.echo)
    prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    choices = Choices(prompts, params, body.n, body.seed)
    request_id, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(index: int, text: str | None, finish: str | None, role: str | None):
        return {
            "id": request_id,
            "object": "text_completion",
            "created": created,
            "model": state.model,
            "choices": [
                {"index": index, "text": text or "", "logprobs": None, "finish_reason": finish}
            ],
        }

    return await _respond(
        request,
        state,
        body,
        choices,
        chunk,
        renames,
        header={"id": request_id, "object": "text_completion", "created": created},
        content=lambda r: {"text": r.generated_text},
        with_role=False,
    )


@router.post("/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    state = get_state(request)
    check_model(state, body.model)
    _refuse_chat(body)
    renames = _renames(body, chat=True)
    max_tokens = (
        body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    )
    with openai_errors(renames):
        params = generation_options(body, max_tokens)
        prompt = chat_prompt(state, body)
    choices = Choices([prompt], params, body.n, body.seed)
    request_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def chunk(index: int, text: str | None, finish: str | None, role: str | None):
        delta: dict[str, Any] = {}
        if role is not None:
            delta["role"] = role
        if text is not None:
            delta["content"] = text
        return {
            "id": request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": state.model,
            "choices": [
                {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
            ],
        }

    return await _respond(
        request,
        state,
        body,
        choices,
        chunk,
        renames,
        header={"id": request_id, "object": "chat.completion", "created": created},
        content=lambda r: {"message": {"role": "assistant", "content": r.generated_text}},
        with_role=True,
    )


__all__ = [
    "ChatCompletionRequest",
    "CompletionRequest",
    "choice_seed",
    "render_chat",
    "router",
]
