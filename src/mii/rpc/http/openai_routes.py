"""OpenAI-compatible routes: ``/v1/models``, ``/v1/completions``, ``/v1/chat/completions``.

The served model is the deployment's first ``served_model_name`` (default: its
model string); every served name, the model string and the deployment name are
accepted, and ``model`` may be left out. How OpenAI's options map
onto mii's is in :mod:`mii.rpc.http.openai_options`; ``n`` and ``seed`` in
:mod:`mii.rpc.http.choices`; ``stream`` (SSE, ended by ``data: [DONE]``) and
``stream_options.include_usage`` in :mod:`mii.rpc.http.sse`; chat prompts in
:mod:`mii.rpc.http.chat`; ``tools`` and ``tool_choice`` in
:mod:`mii.rpc.http.tools`. Fields of OpenAI's specification that change nothing
generated are ignored with a warning, unknown fields refused with 400
(:mod:`mii.rpc.http.field_policy`). ``prompt`` may be token ids: one list of
ids, or a list of them.

The route functions carry no return annotation and no docstring on purpose:
FastAPI would validate answers against the one and publish the other in
``/openapi.json``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Request

from mii.rpc.convert import prompt_list
from mii.rpc.http.chat import chat_prompt, content_chars, template_options
from mii.rpc.http.choices import Choices, Usage
from mii.rpc.http.disconnect import until_disconnected
from mii.rpc.http.errors import ApiError, openai_errors
from mii.rpc.http.field_policy import refuse_unsupported, warn_ignored
from mii.rpc.http.fit_conversation import fitted_prompt
from mii.rpc.http.limits import LimitedRoute, run_off_loop
from mii.rpc.http.openai_answers import CHAT_COMPLETION, COMPLETION, Answer
from mii.rpc.http.openai_logprobs import LogprobFormatter
from mii.rpc.http.openai_options import (
    generation_options,
    openai_field_names,
    refuse_chat,
    refuse_completion,
)
from mii.rpc.http.protocol import ChatCompletionRequest, CompletionRequest, OpenAIRequest
from mii.rpc.http.request_id import client_request_id
from mii.rpc.http.sampling_defaults import with_sampling_defaults
from mii.rpc.http.sse import UsageReport, stream_choices
from mii.rpc.http.state import GatewayState, get_state
from mii.rpc.http.tools import add_tool_options, tool_plan, warn_template_without_tools
from mii.rpc.http.vocabulary import check_known_ids
from mii.rpc.replica_health import replica_state

router = APIRouter(prefix="/v1", route_class=LimitedRoute)


def check_model(state: GatewayState, name: str | None) -> None:
    """404 unless ``name`` is left out or names this deployment (a served model name,
    the model or the deployment name)."""
    if name is None or state.names_model(name):
        return
    others = "".join(f", or {n!r}" for n in state.model_names()[1:])
    raise ApiError(
        404,
        f"the model {name!r} does not exist; this server serves {state.served_model!r}"
        f"{others} (or leave model out)",
        "model",
        "model_not_found",
    )


def _model_card(state: GatewayState, name: str | None = None) -> dict[str, Any]:
    """The card of the model under ``name`` (a served name; default: the first)."""
    return {
        "id": name or state.served_model,
        "object": "model",
        "created": state.created,
        "owned_by": "mii",
        "max_model_len": state.max_length,
    }


@router.get("/models")
async def list_models(request: Request):
    state = get_state(request)
    # One card per served name (as vLLM lists them), the first one first.
    names = state.served_model_names or [state.model]
    return {"object": "list", "data": [_model_card(state, name) for name in names]}


@router.get("/models/{model:path}")
async def retrieve_model(model: str, request: Request):
    if not model:  # GET /v1/models/ (a client's base URL ending in "/"): the list
        return await list_models(request)
    state = get_state(request)
    check_model(state, model)
    return _model_card(state, model if model in state.served_model_names else None)


def _accepted(request: Request, body: OpenAIRequest, refuse: Callable[[Any], None]) -> GatewayState:
    """The gateway's state, once ``body`` names this model and asks nothing refused
    (the fields it sets that change nothing generated are logged, once each)."""
    state = get_state(request)
    check_model(state, body.model)
    refuse_unsupported(body)
    refuse(body)
    warn_ignored(body)
    return state


async def _respond(
    request: Request,
    state: GatewayState,
    body: OpenAIRequest,
    choices: Choices,
    renames: dict[str, str],
    answer: Answer,
):
    """Stream the choices when the body asks to; else wait for them all and answer
    one object with every choice and the usage."""
    # Streamed, each choice is a request of its own; whole, each of the n choice
    # numbers is one call of every prompt. Admitted whole or refused: calls the
    # deployment can never hold all at once would be 429 for ever, however idle it is.
    calls, size = (choices.total, 1) if body.stream else (choices.n, len(choices.prompts))
    field = renames.get("n", "n") if choices.n > 1 else "prompt"
    # Replicas given up on (failed) hold nothing, ever; restarting or unresponsive
    # ones may come back.
    states = [replica_state(r) for r in getattr(state.pool, "replicas", ())]
    alive = sum(s != "failed" for s in states) if states else state.replicas
    # None alive: the pool answers 503 (no replica), which is no fault of the request.
    if alive and state.never_admitted(calls, size, alive):
        raise ApiError(
            400,
            f"{choices.total} choices (prompts times n) can never be admitted at once: this "
            f"deployment holds at most {state.max_queued_requests} requests per replica "
            f"(max_queued_requests) on {alive} replica(s), and a replica takes a "
            f"call of several prompts only while it holds fewer; ask for fewer"
            + (" or do not stream" if body.stream else ""),
            field,
        )
    serving = sum(s == "serving" for s in states)
    if states and serving and state.never_admitted(calls, size, serving):
        raise ApiError(
            503,
            f"{choices.total} choices (prompts times n) need more room than the {serving} of "
            f"{len(states)} replicas serving now can hold at once (the others are restarting "
            "or unresponsive); retry later or ask for fewer",
            field,
            retry_after=5,  # a restart takes seconds
        )
    if body.stream:
        return await stream_choices(
            request, state, choices, answer, UsageReport.of(body.stream_options), renames
        )
    with openai_errors(renames):
        responses = await until_disconnected(request, choices.generate(state))
    usage = Usage(body.n)
    for index, response in enumerate(responses):
        usage.add(index, response)
    return answer.whole(responses, usage.as_dict())


def _formatter(
    state: GatewayState, body: OpenAIRequest, params: dict[str, Any], chat: bool, echo: bool = False
) -> LogprobFormatter | None:
    """What writes the answer's logprobs, when the request asked for them."""
    if "logprobs" not in params:
        return None
    return LogprobFormatter(state.tokenizer, chat, echo, body.return_tokens_as_token_ids)


def _prompt_formatter(state: GatewayState, body: OpenAIRequest) -> LogprobFormatter | None:
    """What writes vLLM's ``prompt_logprobs``, when the request set that field."""
    return (
        LogprobFormatter(state.tokenizer, chat=False) if body.prompt_logprobs is not None else None
    )


@router.post("/completions")
async def create_completion(body: CompletionRequest, request: Request):
    state = _accepted(request, body, refuse_completion)
    body = with_sampling_defaults(body, state.sampling_defaults)
    renames = openai_field_names(body, chat=False)
    with openai_errors(renames):
        params = generation_options(body, body.max_tokens, echo=body.echo)
    prompts = prompt_list(body.prompt, "prompt")  # token ids: [1, 2] is one prompt
    if isinstance(prompts[0], list):
        check_known_ids(state.tokenizer, prompts, "prompt")
    choices = Choices(prompts, params, body.n, body.seed)
    answer = Answer(
        COMPLETION,
        state.served_model,
        _formatter(state, body, params, chat=False, echo=body.echo),
        prompt_logprobs=_prompt_formatter(state, body),
        request_id=client_request_id(request),
    )
    return await _respond(request, state, body, choices, renames, answer)


@router.post("/chat/completions")
async def create_chat_completion(body: ChatCompletionRequest, request: Request):
    state, renames, choices, answer = await prepare_chat(request, body)
    return await _respond(request, state, body, choices, renames, answer)


async def prepare_chat(
    request: Request,
    body: ChatCompletionRequest,
    field_name: Callable[[str], str] | None = None,
    fit_tokens: int | None = None,
) -> tuple[GatewayState, dict[str, str], Choices, Answer]:
    """What a chat request asks for: the gateway's state, the field names for 400s
    (mii's option -> the request's field, passed through ``field_name``), its
    choices and the answer to fill. Shared with the Responses route, whose
    ``truncation: "auto"`` leaves out the oldest items past ``fit_tokens``."""
    state = _accepted(request, body, refuse_chat)
    body = with_sampling_defaults(body, state.sampling_defaults)
    if not body.truncate_prompt_tokens:  # (else only its last characters are read)
        state.check_prompt_chars(content_chars(body.messages), "messages")
    renames = openai_field_names(body, chat=True)
    if field_name is not None:
        renames = {name: field_name(field) for name, field in renames.items()}
    max_tokens = (
        body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    )
    template = template_options(
        body.add_generation_prompt, body.continue_final_message, body.chat_template_kwargs
    )
    if body.truncate_prompt_tokens and state.max_prompt_chars is not None and not fit_tokens:
        template["keep_last_chars"] = state.max_prompt_chars
    tools = tool_plan(body, state.tool_call_parser)
    if tools is not None:
        template["tools"] = tools.tools
        warn_template_without_tools(state.tokenizer)
    with openai_errors(renames):
        params = generation_options(body, max_tokens)
        if tools is not None:
            add_tool_options(params, tools, renames)
        # A template over many messages takes a while: keep the event loop free.
        render = functools.partial(chat_prompt, state.tokenizer, **template)
        if fit_tokens is None:
            prompt = await run_off_loop(render, body.messages)
        else:
            render_end = functools.partial(render, keep_last_chars=state.max_prompt_chars)
            prompt = await run_off_loop(
                fitted_prompt, render, render_end, body.messages, fit_tokens, state.max_prompt_chars
            )
    choices = Choices([prompt], params, body.n, body.seed)
    answer = Answer(
        CHAT_COMPLETION,
        state.served_model,
        _formatter(state, body, params, chat=True),
        tools if tools is not None and tools.mode != "none" else None,
        prompt_logprobs=_prompt_formatter(state, body),
        request_id=client_request_id(request),
    )
    return state, renames, choices, answer
