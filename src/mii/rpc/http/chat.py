"""Chat messages to a prompt, as token ids.

With a chat template the prompt is exactly the ids of
``tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)``,
and the engine takes them as they are. Rendering the template to text and
letting the engine tokenize that text again would not give them: the engine
adds the tokenizer's special tokens (a second BOS after a template's own, or a
BOS that a ChatML template has none of), and a SentencePiece-style tokenizer
(Metaspace, ``prepend_scheme="first"``) puts a ``▁`` before the text that
follows the template's BOS.

When the tokenizer has no chat template, the fallback renders each message as
``"{role}: {content}\\n"``, ends with ``"assistant:"``, and tokenizes that text
as any text prompt (special tokens added). Only text content is accepted.

vLLM's request options shape the template's output (``TemplateOptions``):
``add_generation_prompt`` (default true), ``continue_final_message`` (the
answer continues the last message, which stays open; only without a generation
prompt) and ``chat_template_kwargs`` (more template variables, such as
``enable_thinking``). The fallback honours the first two.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mii.errors import InvalidRequestError
from mii.rpc.http.errors import ApiError
from mii.rpc.http.protocol import ChatMessage, ContentPart

# apply_chat_template's own arguments: not template variables, so not
# chat_template_kwargs (tokenize=False there would break the prompt).
_RESERVED_TEMPLATE_KWARGS = frozenset(
    {
        "conversation",
        "messages",
        "tools",
        "documents",
        "chat_template",
        "add_generation_prompt",
        "continue_final_message",
        "tokenize",
        "padding",
        "truncation",
        "max_length",
        "return_tensors",
        "return_dict",
        "return_assistant_tokens_mask",
        "tokenizer_kwargs",
        "sanitize_control_tokens",
    }
)


@dataclass(frozen=True)
class TemplateOptions:
    """How a chat template renders a request (vLLM's chat request options)."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)  # chat_template_kwargs

    @classmethod
    def of(
        cls,
        add_generation_prompt: bool = True,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
    ) -> TemplateOptions:
        """Checked options; a 400 ApiError names the field at fault."""
        if continue_final_message and add_generation_prompt:
            raise ApiError(
                400,
                "continue_final_message and add_generation_prompt cannot both be true "
                "(set add_generation_prompt to false to continue the final message)",
                "continue_final_message",
            )
        kwargs = dict(chat_template_kwargs or {})
        reserved = sorted(_RESERVED_TEMPLATE_KWARGS.intersection(kwargs))
        if reserved:
            raise ApiError(
                400,
                f"chat_template_kwargs may not set {', '.join(reserved)} (request fields or "
                "arguments of the server's own)",
                "chat_template_kwargs",
            )
        return cls(add_generation_prompt, continue_final_message, kwargs)


def chat_prompt(
    tokenizer, messages: list[ChatMessage], options: TemplateOptions | None = None
) -> list[int]:
    """The prompt's token ids for a chat request's ``messages`` (their content as plain text)."""
    items = []
    for i, message in enumerate(messages):
        item = message.model_dump(exclude_none=True)
        item["content"] = _text_content(message.content, i)
        items.append(item)
    return chat_prompt_ids(tokenizer, items, options)


def chat_prompt_ids(
    tokenizer, messages: list[dict[str, Any]], options: TemplateOptions | None = None
) -> list[int]:
    """The prompt's token ids for ``messages``: those of the tokenizer's chat
    template (``apply_chat_template(..., add_generation_prompt=True, tokenize=True)``
    by default), or of the fallback text ``"{role}: {content}\\n" ... "assistant:"``."""
    options = options or TemplateOptions()
    _check_unicode(messages)
    if not getattr(tokenizer, "chat_template", None):
        text = "".join(f"{m['role']}: {m.get('content') or ''}\n" for m in messages)
        if options.continue_final_message:
            text = text.removesuffix("\n")  # the last message goes on
        elif options.add_generation_prompt:
            text += "assistant:"
        return list(tokenizer(text).input_ids)
    try:
        # return_dict: the same answer on transformers 4 (ids by default) and 5
        # (a BatchEncoding by default).
        encoded = tokenizer.apply_chat_template(
            messages,
            add_generation_prompt=options.add_generation_prompt,
            continue_final_message=options.continue_final_message,
            tokenize=True,
            return_dict=True,
            **options.kwargs,
        )
    except Exception as err:  # jinja raises for conversations the template refuses
        raise InvalidRequestError(
            f"the model's chat template rejected the messages: {err}", field="messages"
        ) from None
    return list(encoded["input_ids"])


def _check_unicode(messages: list[dict[str, Any]]) -> None:
    # JSON lets a lone surrogate ("\\ud800") through; tokenizers refuse it.
    for i, message in enumerate(messages):
        for key, value in message.items():
            if not isinstance(value, str):
                continue
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as err:
                raise InvalidRequestError(
                    f"messages[{i}].{key} is not valid Unicode ({err.reason} at position "
                    f"{err.start})",
                    field="messages",
                ) from None


def _text_content(content: str | list[ContentPart] | None, index: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if part.type != "text" or part.text is None:
            raise ApiError(
                400,
                f"only text content is supported (got a {part.type!r} part)",
                f"messages.{index}.content",
            )
        texts.append(part.text)
    return "".join(texts)
