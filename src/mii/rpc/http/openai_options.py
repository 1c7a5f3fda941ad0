"""What an OpenAI request means in mii's terms.

OpenAI options map onto mii's generation options as follows:

- ``max_tokens`` (chat: also ``max_completion_tokens``) -> ``max_new_tokens``.
  Completions default to 16 as OpenAI does; chat defaults to the room left
  under the model's ``max_length``.
- ``temperature`` (default 1.0): 0 means greedy (``do_sample=False``).
- ``top_p`` defaults to 1.0 (OpenAI's default, not mii's 0.9).
- Unless the model's generation_config.json recommends other defaults for the
  fields a request leaves out: :mod:`mii.rpc.http.sampling_defaults`.
- ``stop``, ``echo`` (completions: the prompt is put before the text).
- mii extensions: ``ignore_eos``, ``top_k`` (-1 or 0: every token, as in vLLM),
  ``min_tokens`` (-> ``min_new_tokens``),
  ``logprobs_mode`` ("raw", the default, or "processed").
- ``logprobs`` (completions: an int k; with ``echo`` the prompt's too) and
  ``logprobs`` + ``top_logprobs`` (chat) -> ``logprobs`` (and ``prompt_logprobs``):
  see :mod:`mii.rpc.http.openai_logprobs` for the answer's shape.
- ``presence_penalty``, ``frequency_penalty``, ``logit_bias`` (token ids as
  strings, as OpenAI sends them) and vLLM's ``repetition_penalty``, ``min_p``,
  ``stop_token_ids``, ``allowed_token_ids``, ``skip_special_tokens``: the options
  of the same names.
- chat only: ``chat_template_kwargs``, ``add_generation_prompt`` and
  ``continue_final_message`` shape the prompt (:mod:`mii.rpc.http.chat`).
- ``n`` and ``seed`` are handled per choice (:mod:`mii.rpc.http.choices`).
- ``response_format`` (json_object, json_schema) and vLLM's ``guided_json``,
  ``guided_regex``, ``guided_choice``, ``guided_grammar``, ``structured_outputs``
  -> the constraint options (:mod:`mii.rpc.http.structured`).
- chat only: ``tools``, ``tool_choice`` and ``parallel_tool_calls``: see
  :mod:`mii.rpc.http.tools`.

Options the engine cannot honour (``suffix``, ``best_of`` other than ``n``,
other response formats; vLLM's beam search, priorities, ...: see
:mod:`mii.rpc.http.vllm_fields`) are refused with 400 naming them, never
silently ignored. Fields that change nothing generated (``user``, ``store``,
...) are accepted and ignored with a logged warning: :mod:`mii.rpc.http.field_policy`.
"""

from __future__ import annotations

from typing import Any

from mii.config import GenerateParams
from mii.rpc.http.errors import ApiError
from mii.rpc.http.protocol import ChatCompletionRequest, CompletionRequest, OpenAIRequest
from mii.rpc.http.structured import structured_field_names, structured_options
from mii.rpc.http.vllm_fields import refuse_vllm_options


def refuse_completion(body: CompletionRequest) -> None:
    """Raise a 400 ApiError for the first option of ``body`` that cannot be honoured."""
    _refuse_common(body)
    refuse_vllm_options(body, chat=False)
    if body.best_of not in (None, body.n):
        raise ApiError(400, "best_of is not supported by this server (use n)", "best_of")
    if body.suffix:
        raise ApiError(400, "suffix is not supported by this server", "suffix")


def refuse_chat(body: ChatCompletionRequest) -> None:
    """Raise a 400 ApiError for the first option of ``body`` that cannot be honoured."""
    _refuse_common(body)
    refuse_vllm_options(body, chat=True)
    if body.echo:  # vLLM's: the last message put before the answer when roles match
        raise ApiError(400, "echo is not supported on chat completions by this server", "echo")
    # (0 asks for nothing: clients send {"logprobs": false, "top_logprobs": 0}, and vLLM
    # takes it)
    if body.top_logprobs and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", "top_logprobs")


def _refuse_common(body: OpenAIRequest) -> None:
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options is only allowed when stream is true", "stream_options")
    if body.stream and body.prompt_logprobs is not None:  # as vLLM refuses it
        raise ApiError(
            400, "prompt_logprobs are not available when stream is true", "prompt_logprobs"
        )


def generation_options(
    body: OpenAIRequest, max_tokens: int | None, echo: bool = False
) -> dict[str, Any]:
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
    if body.top_k is not None and body.top_k not in _ALL_TOKENS_TOP_K:
        params["top_k"] = body.top_k
    # "" and [] are no stop string (clients send them as blank defaults); an empty
    # string inside a list is refused, naming stop
    if body.stop:
        params["stop"] = [body.stop] if isinstance(body.stop, str) else list(body.stop)
    if echo:
        params["return_full_text"] = True
    logprobs = _logprobs_asked(body)
    if logprobs is not None:
        params["logprobs"] = logprobs
        if echo:  # the prompt's logprobs are what echo-with-logprobs scores
            params["prompt_logprobs"] = logprobs
    if body.prompt_logprobs is not None:  # vLLM's field: it wins over echo's k, as there
        params["prompt_logprobs"] = body.prompt_logprobs
    if body.logprobs_mode is not None:
        params["logprobs_mode"] = body.logprobs_mode
    params.update(_logits_options(body))
    params.update(structured_options(body))  # json_schema, regex, choice, grammar
    GenerateParams.parse(**params)  # InvalidRequestError names the (mii) field
    return params


# vLLM's spellings of "no top-k": -1 (and, in newer releases, 0) consider every
# token; clients written for it send them as defaults.
_ALL_TOKENS_TOP_K = (-1, 0)


def _logprobs_asked(body: OpenAIRequest) -> int | None:
    """The most likely tokens to return per position, or None for no logprobs."""
    if isinstance(body, ChatCompletionRequest):
        return (body.top_logprobs or 0) if body.logprobs else None
    return body.logprobs


# Options set on the engine under their own names when the request gives them.
_SAME_NAMES = (
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "min_p",
    "stop_token_ids",
)


def _logits_options(body: OpenAIRequest) -> dict[str, Any]:
    """Penalties, min_p, logit_bias, allowed and stop token ids, and the text options."""
    params = {n: getattr(body, n) for n in _SAME_NAMES if getattr(body, n) is not None}
    if not body.skip_special_tokens:
        params["skip_special_tokens"] = False
    if body.include_stop_str_in_output:
        params["include_stop_str_in_output"] = True
    if body.truncate_prompt_tokens is not None:
        params["truncate_prompt_tokens"] = body.truncate_prompt_tokens
    if body.allowed_token_ids:  # [] (a client's blank default) limits nothing
        params["allowed_token_ids"] = body.allowed_token_ids
    if body.logit_bias:
        bias = {}
        for key, value in body.logit_bias.items():
            # JSON object keys are strings: "50256". Digits only: int() also read
            # "1_0" as 10 and " 28" as 28 (a user trial).
            if not (key.isascii() and key.isdigit()):
                raise ApiError(
                    400, f"logit_bias keys must be token ids (got {key[:40]!r})", "logit_bias"
                )
            bias[int(key)] = value
        params["logit_bias"] = bias
    return params


def openai_field_names(body: OpenAIRequest, chat: bool) -> dict[str, str]:
    """mii's option name -> the OpenAI field the request set it with (for errors)."""
    renames = {"min_new_tokens": "min_tokens", "max_new_tokens": "max_tokens"}
    renames.update(structured_field_names(body))  # json_schema -> response_format, ...
    if chat:
        renames["prompt"] = "messages"
        renames["logprobs"] = "top_logprobs"
        if getattr(body, "max_completion_tokens", None) is not None:
            renames["max_new_tokens"] = "max_completion_tokens"
    else:
        renames["return_full_text"] = "echo"
    return renames
