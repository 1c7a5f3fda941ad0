"""``mii.AsyncEngine``: the engine (:class:`mii.engine.async_engine.AsyncEngine`)
with ``chat`` and ``stream_chat``, generation from chat conversations through the
model's chat template (the pipeline's ``chat`` for code that embeds the engine in
its own event loop). The templates' code belongs to the serving layer (the OpenAI
chat route's), above the engine's."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

from mii.chat_prompts import (
    Conversation,
    chat_prompt_batch,
    conversation_chars,
    conversation_counts,
    one_conversation,
)
from mii.engine import async_engine
from mii.response import Response

# Conversations at least this long get their template applied in a worker thread
# (as the engine tokenizes long text prompts): on the event loop a large one
# stalled every other request.
OFFLOAD_TEMPLATE_CHARS = 16 * 1024
# ... and so do this many conversations, however short: each template call costs
# ~0.6 ms (300 one-line conversations stalled the loop 184 ms: a user trial).
OFFLOAD_CONVERSATIONS = 8
OFFLOAD_MESSAGES = 64  # (in all: one conversation of many short turns)


class AsyncEngine(async_engine.AsyncEngine):
    __doc__ = async_engine.AsyncEngine.__doc__

    async def chat(
        self,
        messages: Conversation | Sequence[Conversation],
        on_answer: Any = None,
        *,
        add_generation_prompt: bool | None = None,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
        **params: Any,
    ) -> list[Response]:
        """Answer one conversation (a list of ``{"role", "content"}`` messages) or a
        list of them, each through the model's chat template, with the template
        options of the pipeline's ``chat`` and the generation options of
        ``generate``. Returns one response per conversation, in order."""
        prompts = await self._chat_prompts(
            messages,
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            chat_template_kwargs=chat_template_kwargs,
            tools=tools,
        )
        return await self.generate(prompts, on_answer, **params)

    async def stream_chat(
        self,
        messages: Conversation,
        request_id: str | None = None,
        *,
        add_generation_prompt: bool | None = None,
        continue_final_message: bool = False,
        chat_template_kwargs: dict[str, Any] | None = None,
        tools: list[dict[str, Any]] | None = None,
        **params: Any,
    ) -> AsyncIterator[Response]:
        """Yield the pieces of the answer to one conversation, as ``stream`` does
        for a prompt (cancelling the consumer aborts the request)."""
        [prompt] = await self._chat_prompts(
            one_conversation(messages),
            add_generation_prompt=add_generation_prompt,
            continue_final_message=continue_final_message,
            chat_template_kwargs=chat_template_kwargs,
            tools=tools,
        )
        pieces = await self.open_stream(prompt, request_id, **params)
        try:
            async for piece in pieces:
                yield piece
        finally:
            pieces.close()

    async def _chat_prompts(self, messages: Any, **template: Any) -> list[list[int]]:
        conversations, items = conversation_counts(messages)
        light = (
            conversation_chars([messages, template.get("tools")]) < OFFLOAD_TEMPLATE_CHARS
            and conversations < OFFLOAD_CONVERSATIONS
            and items < OFFLOAD_MESSAGES
        )
        if light:
            return chat_prompt_batch(self.tokenizer, messages, **template)
        return await asyncio.to_thread(chat_prompt_batch, self.tokenizer, messages, **template)
