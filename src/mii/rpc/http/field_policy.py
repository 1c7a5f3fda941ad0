"""Which fields of OpenAI's request bodies the gateway takes, ignores or refuses.

The OpenAI API reference has fields that matter only to OpenAI's own service:
who the end user is, billing tiers, storage, caching hints, hints for its
reasoning models. Clients and proxies (litellm, LangChain, lm-eval's
``--gen_kwargs``) send them as a matter of course. They do not change one token
of what this server generates, so they are **accepted and ignored**, and the
first request that sets one logs a warning naming it (once per field name per
process: a busy server does not repeat it). :data:`IGNORED_FIELDS` lists them,
with why each is safe to ignore; it is the one place to change the policy.

Fields of the specification that *would* change the answer but cannot be
honoured are refused with 400 naming them (here: ``audio`` output,
``modalities`` other than text, ``web_search_options``, ``moderation``, the deprecated
``functions`` (use ``tools``); elsewhere in :mod:`mii.rpc.http.openai_options`:
``suffix``, ``best_of``, ...). Names outside the
specification and mii's documented extensions are refused with 400 ``unknown
field`` (the request models forbid extra fields).
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import BaseModel, ConfigDict

from mii.rpc.http.errors import ApiError
from mii.rpc.http.request_fields import RequestFields

log = logging.getLogger(__name__)

# Field (dotted inside an object) -> why ignoring it changes nothing generated.
IGNORED_FIELDS: dict[str, str] = {
    "user": "an end-user id for OpenAI's abuse monitoring",
    "safety_identifier": "an end-user id for OpenAI's abuse monitoring",
    "metadata": "tags OpenAI stores with a completion",
    "store": "whether OpenAI stores the completion",
    "service_tier": "OpenAI's processing tier (billing and latency class)",
    "prompt_cache_key": "a routing hint for OpenAI's prompt cache (mii caches prefixes itself)",
    "prompt_cache_retention": "how long OpenAI keeps a cached prompt (mii's prefix cache keeps "
    "blocks until their memory is needed)",
    "prompt_cache_options": "OpenAI's prompt cache settings (mii's prefix cache keeps blocks "
    "until their memory is needed)",
    "prediction": "predicted output, a latency optimisation that does not change the answer",
    "modalities": "['text'] is all this server answers (other modalities are refused)",
    "reasoning_effort": "a setting of OpenAI's reasoning models; the models served here have none",
    "verbosity": "a setting of OpenAI's reasoning models; the models served here have none",
    "request_id": "vLLM's id for its logs (mii names each request itself)",
    # the Responses API's
    "reasoning": "a reasoning model's settings; the models served here have none",
    "max_tool_calls": "a cap on calls of OpenAI's built-in tools; this server has none",
    "stream_options.include_obfuscation": "random padding of stream events against side channels",
}

_warned: set[str] = set()  # the ignored fields this process has logged already


class StreamOptions(RequestFields):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False
    # vLLM's: with include_usage, every chunk also carries the usage so far
    continuous_usage_stats: bool = False
    # Ignored (IGNORED_FIELDS)
    include_obfuscation: bool | None = None


class ServiceFields(BaseModel):
    # OpenAI's fields about its own service (who asks, storage, billing, its prompt
    # cache) that every OpenAI request body takes, the Responses API's too: ignored.
    # No docstring: it would change the served /openapi.json.
    model_config = ConfigDict(extra="forbid")

    user: str | None = None
    safety_identifier: str | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    prompt_cache_retention: str | None = None
    prompt_cache_options: dict[str, Any] | None = None


class SpecificationFields(ServiceFields):
    # Fields of OpenAI's specification that the request models share and that
    # change nothing generated (ignored, IGNORED_FIELDS) or cannot be honoured
    # (refused by refuse_unsupported). Types are lenient where OpenAI's are
    # narrow: an ignored field need not be exactly what OpenAI would take.
    prediction: dict[str, Any] | None = None
    modalities: list[str] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    request_id: str | None = None
    # Refused when set (refuse_unsupported)
    audio: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    moderation: dict[str, Any] | None = None


def refuse_unsupported(body: SpecificationFields) -> None:
    """400 naming the first field of ``body`` that asks for something this server
    cannot do (audio output, web search, function calling)."""
    if body.modalities and any(m != "text" for m in body.modalities):
        raise ApiError(400, "only the 'text' modality is supported by this server", "modalities")
    if body.audio is not None:
        raise ApiError(400, "audio output is not supported by this server", "audio")
    if body.moderation is not None:
        raise ApiError(
            400,
            "moderation (OpenAI's moderation of input and output) is not supported by this server",
            "moderation",
        )
    if body.web_search_options is not None:
        raise ApiError(400, "web search is not supported by this server", "web_search_options")
    if body.functions:
        raise ApiError(
            400, "functions (function calling) are not supported by this server", "functions"
        )
    if body.function_call not in (None, "none", "auto"):
        raise ApiError(400, "function_call is not supported by this server", "function_call")


def ignored_fields(body: BaseModel) -> list[str]:
    """The fields of IGNORED_FIELDS that ``body`` sets (dotted inside stream_options)."""
    names = [name for name in body.model_fields_set if name in IGNORED_FIELDS]
    options = getattr(body, "stream_options", None)
    if isinstance(options, BaseModel):
        names += [
            f"stream_options.{name}"
            for name in options.model_fields_set
            if f"stream_options.{name}" in IGNORED_FIELDS
        ]
    return sorted(names)


# Values of an ignored field that ask for nothing (clients send them as defaults):
# no warning for them.
_NOTHING_ASKED = (None, False, "", [], {}, ["text"], "auto", "default")


def _value(body: BaseModel, dotted: str) -> Any:
    for name in dotted.split("."):
        body = getattr(body, name, None)
    return body


def warn_ignored(body: BaseModel) -> list[str]:
    """Log a warning for each ignored field ``body`` sets to a value that asks for
    something (not null, false, empty or a default) and that this process has not
    warned about yet; return the fields ``body`` sets that are ignored."""
    names = ignored_fields(body)
    for name in names:
        if _value(body, name) in _NOTHING_ASKED:
            continue
        if name not in _warned:
            _warned.add(name)
            log.warning(
                "ignoring the OpenAI request field %r (%s): it does not change generation "
                "(logged once per field)",
                name,
                IGNORED_FIELDS[name],
            )
    return names
