"""Chat conversations as prompts: the Python API's ``chat`` methods (the pipeline's,
the async engine's) put each conversation through the model's chat template, as
the OpenAI chat route does, and generate from the template's token ids."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mii.errors import InvalidRequestError

Conversation = Sequence[dict[str, Any]]


def chat_prompt_batch(
    tokenizer,
    messages: Conversation | Sequence[Conversation],
    *,
    add_generation_prompt: bool | None = None,
    continue_final_message: bool = False,
    chat_template_kwargs: dict[str, Any] | None = None,
    tools: list[dict[str, Any]] | None = None,
) -> list[list[int]]:
    """The prompt token ids of one conversation (a list of ``{"role", "content"}``
    dicts) or of each of a list of them. ``add_generation_prompt`` unset: true unless
    ``continue_final_message`` (which continues the last message instead). A
    malformed conversation, or one the template refuses, is InvalidRequestError
    naming ``messages``."""
    from mii.rpc.http.chat import chat_prompt_ids, conversation_items, generation_prompt
    from mii.rpc.http.tools import warn_template_without_tools

    add_generation_prompt = generation_prompt(add_generation_prompt, continue_final_message)
    if tools is not None:
        check_tools(tools)
        warn_template_without_tools(tokenizer)  # (as the OpenAI route does)
    return [
        chat_prompt_ids(
            tokenizer,
            items,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            chat_template_kwargs=chat_template_kwargs,
            tools=tools,
        )
        for items in conversation_items(messages)
    ]


def check_tools(tools: Any) -> None:
    """InvalidRequestError naming ``tools`` unless it lists tool definitions (OpenAI's
    ``{"type": "function", "function": {"name", ...}}``, or a bare ``{"name", ...}``)
    or Python functions (transformers reads their signature and docstring). Else
    the template's own error came back naming messages, or, for a dict without a
    name, the tool vanished from the prompt without a word (user trial)."""
    shape = (
        "tools must be a list of tool definitions ({'type': 'function', 'function': "
        "{'name', 'description', 'parameters'}}) or Python functions"
    )
    if not isinstance(tools, (list, tuple)):
        raise InvalidRequestError(f"{shape}; got {tools!r:.80}", field="tools")
    for i, tool in enumerate(tools):
        if callable(tool):
            continue
        function = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            raise InvalidRequestError(
                f"{shape}; tools[{i}] has no function name: {tool!r:.80}", field="tools"
            )


def one_conversation(messages: Any) -> Conversation:
    """``messages`` when it is one conversation (a streamed chat answers one);
    InvalidRequestError naming ``messages`` for a list of conversations."""
    if (
        isinstance(messages, (list, tuple))
        and messages
        and all(isinstance(m, (list, tuple)) for m in messages)
    ):
        if len(messages) != 1:
            raise InvalidRequestError(
                f"a streamed chat answers one conversation, got {len(messages)}: stream "
                "each one apart, or use chat() for all of them",
                field="messages",
            )
        return messages[0]
    return messages


def conversation_chars(messages: Any) -> int:
    """About how many characters the conversations hold (every text in them), to
    tell a large one, whose template is applied off the event loop."""
    if isinstance(messages, str):
        return len(messages)
    if isinstance(messages, dict):
        return sum(conversation_chars(value) for value in messages.values())
    if isinstance(messages, (list, tuple)):
        return sum(conversation_chars(item) for item in messages)
    return 0


def conversation_counts(messages: Any) -> tuple[int, int]:
    """How many conversations and messages the chat input holds (read as
    ``conversation_items`` reads it: a list starting with a dict is one
    conversation), to tell a large one, whose template is applied off the event loop."""
    if not isinstance(messages, (list, tuple)):
        return 0, 0
    if not messages or isinstance(messages[0], dict):
        return 1, len(messages)
    return len(messages), sum(len(c) for c in messages if isinstance(c, (list, tuple)))
