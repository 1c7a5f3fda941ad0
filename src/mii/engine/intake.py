"""Request intake: check a request and turn it into a ``Sequence``.

Every check that can fail a request runs here, in the caller, before anything
is queued: the prompt's type and token ids, the length limits (``max_length``
per engine and per request) and whether the request fits the KV cache at all.
"""

from __future__ import annotations

import secrets

from mii.config import GenerateParams
from mii.engine.kv_cache import BlockManager
from mii.engine.sequence import Sequence
from mii.errors import InvalidRequestError, RequestTooLargeError


def engine_max_length(requested: int | None, model_max: int) -> int:
    """The engine-wide cap on prompt + response: the engine option ``max_length``
    when given (at most the model's), else the model's maximum."""
    if requested is None:
        return model_max
    if requested > model_max:
        raise InvalidRequestError(
            f"engine option 'max_length' ({requested}) exceeds the model's "
            f"maximum sequence length ({model_max})",
            field="max_length",
        )
    return requested


class RequestIntake:
    """Tokenizes and checks requests against the engine's limits."""

    def __init__(self, tokenizer, vocab_size: int, max_length: int, blocks: BlockManager) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.blocks = blocks

    def tokenize(self, prompt: str | list[int]) -> list[int]:
        """Token ids of a text prompt; a list of ids is checked against the vocabulary."""
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt).input_ids)
        if not all(isinstance(t, int) and 0 <= t < self.vocab_size for t in prompt):
            raise InvalidRequestError(
                f"prompt token ids must be integers in [0, {self.vocab_size})", field="prompt"
            )
        return list(prompt)

    def make_sequence(
        self, request_id: str, prompt: str | list[int], params: GenerateParams
    ) -> Sequence:
        """Tokenize and check one request; raises InvalidRequestError before it is queued."""
        if not isinstance(prompt, (str, list)):
            raise InvalidRequestError(
                f"a prompt must be a string or a list of token ids, not {type(prompt).__name__}",
                field="prompt",
            )
        prompt_ids = self.tokenize(prompt)
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty", field="prompt")
        max_length = params.max_length or self.max_length
        if max_length > self.max_length:
            raise InvalidRequestError(
                f"invalid generation option 'max_length': {max_length} exceeds the engine's "
                f"maximum of {self.max_length}",
                field="max_length",
            )
        if len(prompt_ids) >= max_length:
            raise InvalidRequestError(
                f"the prompt has {len(prompt_ids)} tokens, which leaves no room under "
                f"max_length={max_length}; shorten the prompt or raise max_length",
                field="prompt",
            )
        room = max_length - len(prompt_ids)
        max_new = room if params.max_new_tokens is None else min(params.max_new_tokens, room)
        total = len(prompt_ids) + max_new
        if not self.blocks.can_fit_alone(total):
            raise RequestTooLargeError(
                f"the request needs KV cache for {total} tokens (prompt {len(prompt_ids)} + "
                f"max_new_tokens {max_new}) but the whole cache holds "
                f"{self.blocks.num_blocks * self.blocks.block_size}; lower max_new_tokens or "
                "raise num_kv_blocks",
                field="max_new_tokens",
            )
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        prompt_text = prompt if isinstance(prompt, str) else None
        return Sequence(request_id, prompt_ids, params, max_new, seed, prompt_text=prompt_text)
