"""The request bodies the gateway accepts, as pydantic models.

FastAPI validates every body against these before a route runs; what they
refuse becomes a 400 naming the field (see :func:`mii.rpc.http.errors.describe_validation_error`).
The models also make up the schema served at ``/openapi.json``, so their class
names and docstrings are part of what the server answers.
"""

from __future__ import annotations

import typing
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from mii.config import OPENAI_COMPLETIONS_MAX_TOKENS
from mii.errors import InvalidRequestError
from mii.prompts import prompt_batch
from mii.rpc.convert import MAX_PROMPTS, request_batch
from mii.rpc.http.field_policy import SpecificationFields, StreamOptions
from mii.rpc.http.request_fields import RequestFields
from mii.rpc.http.tool_protocol import ChatTool, ToolChoice
from mii.rpc.http.vllm_fields import VllmFields

# n times the number of prompts, per OpenAI request: as many as a request of mii's own
# routes may hold (lm-evaluation-harness sends --batch_size prompts in one request, and
# 256 is a common size against vLLM, which sets no cap).
MAX_CHOICES = MAX_PROMPTS


def _prompt_shape(value: Any, field: str, max_prompts: int | None = None) -> Any:
    """``value`` unchanged when it is a string, a list of token ids, or a non-empty
    list of strings or of token-id lists (one kind); else ValueError saying so.
    ``max_prompts``: the choices cap of an OpenAI request (prompts times n), said
    before ``request_batch``'s larger limit, which a split into batches would meet."""
    if isinstance(value, list):  # JSON gives lists; a dict is iterable, but no prompt
        try:
            batch = prompt_batch(value, field)
            if max_prompts is not None and len(batch) > max_prompts:
                raise InvalidRequestError(
                    f"at most {max_prompts} choices (prompts times n) per request: "
                    f"{len(batch)} prompts; send at most {max_prompts} in each request"
                )
            request_batch(batch, field)
            return value
        except InvalidRequestError as err:
            raise ValueError(str(err)) from None
    if isinstance(value, str):
        return value
    raise ValueError(
        f"{field} must be a string, a list of token ids, or a non-empty list of strings "
        "or of token-id lists"
    )


# ----- mii's own route ------------------------------------------------------------


class MiiRequest(BaseModel):
    """``prompts`` (a text, token ids, or a list of either kind) plus any generation
    options (validated by GenerateParams)."""

    model_config = ConfigDict(extra="allow")

    prompts: str | list[str] | list[int] | list[list[int]]

    @field_validator("prompts", mode="before")
    @classmethod
    def _check_prompts(cls, value: Any) -> Any:
        return _prompt_shape(value, "prompts")


# ----- OpenAI's routes --------------------------------------------------------------
# No docstrings on these classes: they would change the served /openapi.json.


class OpenAIRequest(RequestFields, SpecificationFields, VllmFields):
    # The options completions and chat completions share (the fields that change
    # nothing generated, ignored, are in SpecificationFields: see field_policy;
    # vLLM's that mii accepts only at their no-op values in VllmFields).
    # null is "not set", and true/false fields take only booleans (RequestFields).
    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int = Field(default=1, ge=1, le=MAX_CHOICES)
    stop: str | list[str] | None = None
    # A 64-bit signed integer, as OpenAI and vLLM take it (mii maps it into [0, 2**63)).
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    # mii extensions
    ignore_eos: bool = False
    top_k: int | None = None
    min_tokens: int = 0
    logprobs_mode: typing.Literal["raw", "processed"] | None = None
    # vLLM's sampling extensions (mii.sampling_options)
    repetition_penalty: float | None = None
    min_p: float | None = None
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    # Structured output, OpenAI's and vLLM's fields (mii.rpc.http.structured)
    response_format: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    structured_outputs: dict[str, Any] | None = None
    # vLLM's backend hints for the above: accepted, no effect (mii has one backend)
    guided_decoding_backend: str | None = None
    guided_whitespace_pattern: str | None = None


class CompletionRequest(OpenAIRequest):
    # Token-id prompts (one list, or a list of lists) as OpenAI and vLLM take them.
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=OPENAI_COMPLETIONS_MAX_TOKENS, ge=0)
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _check_prompt(cls, value: Any) -> Any:
        return _prompt_shape(value, "prompt", max_prompts=MAX_CHOICES)


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")

    type: str
    text: str | None = None
    refusal: str | None = None  # an assistant's {"type": "refusal", "refusal": "..."}


class CalledFunction(BaseModel):
    model_config = ConfigDict(extra="allow")

    name: str
    arguments: str | dict[str, Any] | None = None  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="allow")

    function: CalledFunction


_ROLES_WITH_CONTENT = ("system", "developer", "user", "tool")


class ChatMessage(BaseModel):
    # Other keys are passed to the template as they are; an assistant's tool_calls
    # must be calls (tool call arguments: see chat.py), a role is never empty.
    model_config = ConfigDict(extra="allow")

    role: str = Field(min_length=1)
    # (validate_default: a message that leaves it out is checked too)
    content: str | list[ContentPart] | None = Field(default=None, validate_default=True)
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    # A tool result's call id: optional, as Hugging Face's tool-use examples leave it
    # out (and vLLM takes them), but a string when given (OpenAI's type).
    tool_call_id: str | None = None

    @field_validator("content")
    @classmethod
    def _content_where_needed(cls, value: Any, info: ValidationInfo) -> Any:
        # Only an assistant's message may go without (its tool calls say it): the
        # template wrote a user's missing content as "None" or nothing (a user trial).
        role = info.data.get("role")
        if (value is None or value == []) and role in _ROLES_WITH_CONTENT:
            # ([] as OpenAI: "expected an array with minimum length 1")
            raise ValueError(
                f"a {role} message needs its content (a string or a non-empty list of parts)"
            )
        return value


class ChatCompletionRequest(OpenAIRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    # At least 1, as OpenAI and vLLM ask: 0 would answer an empty message (a chat
    # has no prompt to score; /v1/completions' max_tokens 0 with echo does that).
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    # Tool calling (mii.rpc.http.tools)
    tools: list[ChatTool] | None = None
    tool_choice: ToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # vLLM's chat template extensions (mii.rpc.http.chat)
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool | None = None  # None: not continue_final_message
    continue_final_message: bool = False
    echo: bool = False  # vLLM's; only false is served (openai_options.refuse_chat)

    @field_validator("tool_choice", mode="before")
    @classmethod
    def _named_tool_choice(cls, value: Any) -> Any:
        # (else a named choice without its function reads "should be 'none', ...")
        if isinstance(value, dict) and not isinstance(value.get("function"), dict):
            raise ValueError(
                'a named tool choice is {"type": "function", "function": {"name": ...}} '
                '(or one of "none", "auto", "required")'
            )
        return value
