"""vLLM's request fields that mii does not implement: accepted at the value that
changes nothing, refused with 400 naming the field at any other.

Clients written for ``vllm serve`` set these through ``extra_body`` (often at
their defaults, e.g. ``use_beam_search: false``); before, any of them was an
``unknown field``, however harmless its value. Now a request that sets one to
vLLM's default, which is what mii does anyway, is served; one that asks for
what mii cannot do (beam search, priorities, prompt truncation, ...) gets 400
saying so and how to get the closest behaviour. The fields that mii implements
(``min_p``, ``repetition_penalty``, ``stop_token_ids``, ``guided_*``, ...) live in
:mod:`mii.rpc.http.protocol`, and ``request_id`` (an id for vLLM's logs) is
ignored like OpenAI's bookkeeping fields (:mod:`mii.rpc.http.field_policy`).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict

from mii.rpc.http.errors import ApiError


class VllmFields(BaseModel):
    # Mixed into the OpenAI request models. No docstring: it would change the
    # served /openapi.json. Defaults are vLLM's; the no-op values: NO_OP_VALUES.
    model_config = ConfigDict(extra="forbid")

    use_beam_search: bool = False
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False
    priority: int = 0
    truncate_prompt_tokens: int | None = None
    prompt_logprobs: int | None = None  # served (openai_options, openai_logprobs)
    allowed_token_ids: list[int] | None = None  # served (openai_options); [] as unset
    bad_words: list[str] | None = None
    return_tokens_as_token_ids: bool = False  # served (openai_logprobs)
    add_special_tokens: bool | None = None
    spaces_between_special_tokens: bool = True
    include_reasoning: bool = True
    return_token_ids: bool | None = None
    chat_template: str | None = None
    cache_salt: str | None = None
    kv_transfer_params: dict[str, Any] | None = None
    vllm_xargs: dict[str, Any] | None = None
    logits_processors: list[Any] | None = None
    documents: list[Any] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None
    structural_tag: str | None = None
    prompt_embeds: Any = None


# field -> (the values that change nothing, what to do instead of another value)
NO_OP_VALUES: dict[str, tuple[tuple[Any, ...], str]] = {
    "use_beam_search": ((False,), "beam search is not supported; sample or decode greedily"),
    "length_penalty": ((1.0,), "it applies to beam search, which is not supported"),
    "priority": ((0,), "priority scheduling is not supported: requests are served in order"),
    "bad_words": ((None, []), "use logit_bias to ban token ids"),
    "spaces_between_special_tokens": (
        (True,),
        "special tokens are decoded as the tokenizer writes them",
    ),
    # Without a reasoning parser (mii has none) there is no reasoning to include or drop.
    "include_reasoning": ((True, False), ""),
    "return_token_ids": ((None, False), "POST /tokenize gives a text's token ids"),
    "chat_template": (
        (None,),
        "start the deployment with --chat-template to use another template",
    ),
    "cache_salt": ((None,), "the prefix cache is shared by the deployment's requests"),
    "kv_transfer_params": ((None,), "disaggregated prefill is not supported"),
    "vllm_xargs": ((None,), "this server has no vLLM extensions"),
    "logits_processors": ((None, []), "use logit_bias, min_p or the structured output options"),
    "documents": ((None, []), "put the documents in the messages"),
    "mm_processor_kwargs": ((None,), "only text models are served"),
    "structural_tag": ((None,), "use response_format json_schema or guided_regex"),
    "prompt_embeds": ((None,), "send the prompt as text or token ids"),
}


def refuse_vllm_options(body: VllmFields, chat: bool) -> None:
    """400 naming the first vLLM field ``body`` sets to a value mii cannot honour."""
    for name in sorted(body.model_fields_set & set(NO_OP_VALUES)):
        no_ops, instead = NO_OP_VALUES[name]
        value = getattr(body, name)
        if value not in no_ops:
            raise ApiError(
                400, f"{name}={value!r} is not supported by this server: {instead}", name
            )
    # Completions add the tokenizer's special tokens (BOS) to a text prompt, chat
    # prompts take them from the chat template: vLLM's defaults for each route.
    # Token-id prompts are not tokenized: any value changes nothing there.
    usual = not chat
    text_prompt = chat or _has_text(getattr(body, "prompt", None))
    if body.add_special_tokens not in (None, usual) and text_prompt:
        route = "chat completions" if chat else "completions"
        raise ApiError(
            400,
            f"add_special_tokens={body.add_special_tokens} is not supported by this server: "
            f"{route} always use {usual}",
            "add_special_tokens",
        )


def _has_text(prompt: Any) -> bool:
    """Whether a completions ``prompt`` holds text (a string, or a list with one),
    not only token ids."""
    if isinstance(prompt, str):
        return True
    return isinstance(prompt, list) and any(isinstance(p, str) for p in prompt)
