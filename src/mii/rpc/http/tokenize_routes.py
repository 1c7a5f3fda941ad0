"""``POST /tokenize``, ``POST /detokenize`` and ``GET /tokenizer_info``, shaped as vLLM's.

- ``/tokenize`` takes ``prompt`` (a text; ``add_special_tokens``, default true: the
  ids the engine makes of that text as a completions prompt) or ``messages`` (a
  chat; ``add_generation_prompt`` default true, ``continue_final_message``,
  ``chat_template_kwargs``, ``tools``, ``add_special_tokens`` default false: the ids of
  the chat template, exactly those ``/v1/chat/completions`` sends the engine),
  and ``model`` (optional). It answers ``{"count", "max_model_len", "tokens"}``,
  plus ``"token_strs"`` (the tokenizer's string of each id) with
  ``return_token_strs``.
- ``/detokenize`` takes ``tokens`` (ids in the tokenizer's vocabulary) and
  answers ``{"prompt": text}``, decoded as the tokenizer decodes (special tokens
  kept, as vLLM does).
- ``/tokenizer_info`` answers the tokenizer's configuration as vLLM's does
  (``tokenizer_class``, ``bos_token``, ``eos_token``, ``pad_token``,
  ``unk_token``, ``chat_template``, ``model_max_length``): with it and
  ``/tokenize``, lm-evaluation-harness's ``local-completions`` tokenizes through
  the server (its ``tokenizer_backend=auto`` probes both), so it needs no local
  copy of the tokenizer (a GGUF file, or a hub that cannot be reached).

They run in the gateway, with the deployment's tokenizer; the first two in a
worker thread (a long text or a long list of ids takes a while). Errors have
OpenAI's shape; bad input is a 400 naming the field.

The route functions carry no return annotation and no docstring on purpose:
FastAPI would validate answers against the one and publish the other in
``/openapi.json``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, ConfigDict, Field, StrictInt

from mii.rpc.http.chat import (
    apply_template,
    chat_items,
    chat_prompt_ids,
    check_messages,
    content_chars,
    template_options,
    template_variables,
)
from mii.rpc.http.errors import ApiError, openai_errors
from mii.rpc.http.limits import LimitedRoute, run_off_loop
from mii.rpc.http.openai_routes import check_model
from mii.rpc.http.protocol import ChatMessage
from mii.rpc.http.state import get_state
from mii.rpc.http.tool_protocol import ChatTool
from mii.rpc.http.vocabulary import check_known_ids

router = APIRouter(route_class=LimitedRoute)  # errors in OpenAI's shape: errors.is_openai_path


# No docstrings on the bodies: they would change the served /openapi.json.
class TokenizeRequest(BaseModel):
    # vLLM's TokenizeCompletionRequest and TokenizeChatRequest in one body: exactly
    # one of prompt and messages.
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    add_special_tokens: bool | None = Field(
        default=None,
        description="Add the tokenizer's special tokens (BOS, ...): default true for a "
        "prompt; for messages, on top of the chat template's own (default false).",
    )
    add_generation_prompt: bool | None = Field(
        default=None, description="messages: end with the assistant's turn (default true)."
    )
    continue_final_message: bool = Field(
        default=False,
        description="messages: leave the last message open, for the model to continue it "
        "(not with add_generation_prompt).",
    )
    chat_template_kwargs: dict[str, Any] | None = Field(
        default=None, description="messages: extra variables for the chat template."
    )
    tools: list[ChatTool] | None = Field(
        default=None,
        description="messages: the tools, as the chat route gives them to the template.",
    )
    return_token_strs: bool = Field(
        default=False, description="Also answer each token's string (token_strs)."
    )


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    tokens: list[StrictInt]


def _check_text(text: str, field: str) -> None:
    # JSON lets a lone surrogate ("\\ud800") through; tokenizers refuse it.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ApiError(
            400, f"{field} is not valid Unicode ({err.reason} at position {err.start})", field
        ) from None


def _chat_options(body: TokenizeRequest) -> dict[str, Any]:
    """The chat template's options of a messages body (400 for those of a prompt body)."""
    chat_only = ("add_generation_prompt", "continue_final_message", "chat_template_kwargs", "tools")
    if body.messages is None:
        for name in chat_only:
            if name in body.model_fields_set:
                raise ApiError(400, f"{name} applies to messages, not to a prompt", name)
        return {}
    options = template_options(
        body.add_generation_prompt, body.continue_final_message, body.chat_template_kwargs
    )
    if body.tools:
        options["tools"] = [tool.model_dump(exclude_none=True) for tool in body.tools]
    return options


def tokenize(tokenizer, body: TokenizeRequest) -> list[int]:
    """The ids of ``body``'s prompt or messages (InvalidRequestError naming the field
    the template or the tokenizer refuses)."""
    if body.messages is None:
        add_special = True if body.add_special_tokens is None else body.add_special_tokens
        return list(tokenizer(body.prompt, add_special_tokens=add_special).input_ids)
    options = _chat_options(body)
    items = chat_items(body.messages)
    check_messages(items)
    if body.add_special_tokens and getattr(tokenizer, "chat_template", None):
        # The template's text, tokenized with special tokens added on top (vLLM).
        text = apply_template(
            tokenizer,
            items,
            add_generation_prompt=options["add_generation_prompt"],
            continue_final_message=options["continue_final_message"],
            tokenize=False,
            **({"tools": options["tools"]} if "tools" in options else {}),
            **template_variables(tokenizer, options["chat_template_kwargs"]),
        )
        return list(tokenizer(text, add_special_tokens=True).input_ids)
    # Exactly the ids the chat route sends (the fallback text has its special tokens).
    return chat_prompt_ids(tokenizer, items, **options)


def _answer_tokenize(tokenizer, body: TokenizeRequest, max_model_len: int) -> dict[str, Any]:
    ids = tokenize(tokenizer, body)
    answer: dict[str, Any] = {"count": len(ids), "max_model_len": max_model_len, "tokens": ids}
    if body.return_token_strs:
        answer["token_strs"] = [str(t) for t in tokenizer.convert_ids_to_tokens(ids)]
    return answer


def _detokenize(tokenizer, tokens: list[int]) -> str:
    check_known_ids(tokenizer, [tokens], "tokens")
    return tokenizer.decode(tokens)


@router.post("/tokenize")
async def create_tokenize(body: TokenizeRequest, request: Request):
    state = get_state(request)
    check_model(state, body.model)
    if (body.prompt is None) == (body.messages is None):
        raise ApiError(400, "give exactly one of prompt (a text) and messages (a chat)", "prompt")
    if body.prompt is not None:
        _check_text(body.prompt, "prompt")
        state.check_prompt_chars(len(body.prompt), "prompt")
    else:
        state.check_prompt_chars(content_chars(body.messages), "messages")
    _chat_options(body)  # refuse before the work
    with openai_errors({}):
        # A long text or a template over many messages takes a while: off the loop.
        return await run_off_loop(_answer_tokenize, state.tokenizer, body, state.max_length)


@router.post("/detokenize")
async def create_detokenize(body: DetokenizeRequest, request: Request):
    state = get_state(request)
    check_model(state, body.model)
    return {"prompt": await run_off_loop(_detokenize, state.tokenizer, body.tokens)}


def tokenizer_info(tokenizer, max_model_len: int) -> dict[str, Any]:
    """vLLM's ``/tokenizer_info`` answer: the tokenizer's class, its special tokens
    (text, or None) and chat template (None without one: the fallback of
    :mod:`mii.rpc.http.chat` is no template), and the deployment's maximum
    sequence length. Named fields only: no file paths of the tokenizer's config."""
    info: dict[str, Any] = {"tokenizer_class": type(tokenizer).__name__}
    for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
        token = getattr(tokenizer, name, None)
        info[name] = None if token is None else str(token)
    info["chat_template"] = getattr(tokenizer, "chat_template", None)
    info["model_max_length"] = max_model_len
    return info


@router.get("/tokenizer_info")
async def get_tokenizer_info(request: Request):
    state = get_state(request)
    return tokenizer_info(state.tokenizer, state.max_length)
