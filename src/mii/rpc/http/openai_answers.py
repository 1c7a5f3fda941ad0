"""The JSON of OpenAI's answers: the whole completion (or chat completion)
object, or the chunks of its stream.

Both routes answer the same frame (``id``, ``object``, ``created``, ``model``,
``choices``); an ``AnswerKind`` holds what differs between them.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mii.response import Response
from mii.rpc.http.openai_logprobs import LogprobFormatter

if TYPE_CHECKING:
    from mii.rpc.http.tools import ToolPlan


@dataclass(frozen=True)
class AnswerKind:
    """What differs between the answers of ``/v1/completions`` and ``/v1/chat/completions``."""

    id_prefix: str
    object: str  # of the whole answer
    chunk_object: str  # of each streamed chunk
    content: Callable[[Response], dict[str, Any]]  # a whole choice's own fields
    delta: Callable[[str | None, str | None], dict[str, Any]]  # a chunk's, from (text, role)
    with_role: bool  # whether the stream opens with one role-only chunk per choice


def _chat_delta(text: str | None, role: str | None) -> dict[str, Any]:
    delta: dict[str, Any] = {}
    if role is not None:
        delta["role"] = role
    if text is not None:
        delta["content"] = text
    return {"delta": delta}


COMPLETION = AnswerKind(
    "cmpl",
    "text_completion",
    "text_completion",
    content=lambda r: {"text": r.generated_text},
    delta=lambda text, role: {"text": text or ""},
    with_role=False,
)
CHAT_COMPLETION = AnswerKind(
    "chatcmpl",
    "chat.completion",
    "chat.completion.chunk",
    # refusal: null as OpenAI writes it (mii never refuses on its own)
    content=lambda r: {
        "message": {"role": "assistant", "content": r.generated_text, "refusal": None}
    },
    delta=_chat_delta,
    with_role=True,
)


class Answer:
    """One request's answer: its id and creation time, and its JSON objects.
    ``logprobs`` formats the choices' logprobs (None: the request asked for none);
    ``tools``: how a chat answer's text becomes content and tool calls (None: no tools);
    ``prompt_logprobs``: writes vLLM's ``prompt_logprobs`` (None: not asked);
    ``request_id``: the client's ``X-Request-Id``, which names the answer as vLLM's
    (``cmpl-<it>``) so that traces and answers match (None: a fresh random id)."""

    def __init__(
        self,
        kind: AnswerKind,
        model: str,
        logprobs: LogprobFormatter | None = None,
        tools: ToolPlan | None = None,
        prompt_logprobs: LogprobFormatter | None = None,
        request_id: str | None = None,
    ) -> None:
        self.kind = kind
        self.model = model
        self.logprobs = logprobs
        self.tools = tools
        self.prompt_logprobs = prompt_logprobs
        self.id = f"{kind.id_prefix}-{request_id or uuid.uuid4().hex}"
        self.created = int(time.time())

    def _frame(self, object_name: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": object_name,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }

    def chunk(
        self,
        index: int,
        text: str | None,
        finish_reason: str | None,
        role: str | None,
        logprobs: dict[str, Any] | None = None,
        stop_reason: str | int | None = None,
    ) -> dict[str, Any]:
        """One chunk of the stream, for choice ``index`` (without usage)."""
        choice = {
            "index": index,
            **self.kind.delta(text, role),
            "logprobs": logprobs,
            "finish_reason": finish_reason,
            "stop_reason": stop_reason,
        }
        return self._frame(self.kind.chunk_object, [choice])

    def delta_chunk(
        self,
        index: int,
        delta: dict[str, Any],
        finish_reason: str | None,
        logprobs: dict[str, Any] | None = None,
        stop_reason: str | int | None = None,
    ) -> dict[str, Any]:
        """One chat stream chunk for choice ``index`` with this ``delta`` (tool calls)."""
        choice = {"index": index, "delta": delta, "logprobs": logprobs}
        choice |= {"finish_reason": finish_reason, "stop_reason": stop_reason}
        return self._frame(self.kind.chunk_object, [choice])

    def choice(self, index: int, r: Response) -> dict[str, Any]:
        """One whole choice (its text or message, logprobs, finish and stop reason)."""
        content, finish_reason = self.kind.content(r), r.finish_reason
        if self.tools is not None:
            message, finish_reason = self.tools.message(r)
            content = {"message": message}
        choice = {
            "index": index,
            **content,
            "logprobs": self.logprobs.of_response(r) if self.logprobs else None,
            "finish_reason": finish_reason,
            # vLLM's: the stop string or stop token that ended it (None: EOS, length)
            "stop_reason": r.stop_reason,
        }
        if self.prompt_logprobs is not None and self.kind is COMPLETION:
            choice["prompt_logprobs"] = self.prompt_logprobs.vllm_prompt_logprobs(r)
        return choice

    def whole(self, responses: list[Response], usage: dict[str, int]) -> dict[str, Any]:
        """The whole answer: every choice, by index, and the usage."""
        choices = [self.choice(index, r) for index, r in enumerate(responses)]
        answer = {
            **self._frame(self.kind.object, choices),
            "usage": usage,
            "system_fingerprint": None,
        }
        if self.prompt_logprobs is not None and self.kind is CHAT_COMPLETION and responses:
            answer["prompt_logprobs"] = self.prompt_logprobs.vllm_prompt_logprobs(responses[0])
        return answer
