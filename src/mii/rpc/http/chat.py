"""Chat messages to a prompt.

Chat prompts come from the tokenizer's chat template
(``apply_chat_template(messages, tokenize=False, add_generation_prompt=True)``).
When the tokenizer has none, the fallback template renders each message as
``"{role}: {content}\\n"`` and ends with ``"assistant:"``. Only text content is
accepted.
"""

from __future__ import annotations

from typing import Any

from mii.errors import InvalidRequestError
from mii.rpc.http.errors import ApiError
from mii.rpc.http.protocol import ChatMessage, ContentPart


def chat_prompt(tokenizer, messages: list[ChatMessage]) -> str:
    """The prompt for a chat request's ``messages`` (their content as plain text)."""
    items = []
    for i, message in enumerate(messages):
        item = message.model_dump(exclude_none=True)
        item["content"] = _text_content(message.content, i)
        items.append(item)
    return render_chat(tokenizer, items)


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


def _tokenizer_adds_bos(tokenizer) -> bool:
    ids = tokenizer("x").input_ids
    return bool(ids) and ids[0] == tokenizer.bos_token_id
