"""Request intake: check a request and turn it into a ``Sequence``.

Every check that can fail a request runs here, in the caller, before anything
is queued: the prompt's type and token ids, the length limits (``max_length``
per engine and per request) and whether the request fits the KV cache at all.
"""

from __future__ import annotations

import random
from typing import Any

from mii.config import GenerateParams
from mii.engine import grammar_mask
from mii.engine.constraints import GrammarCache
from mii.engine.kv_cache import BlockManager
from mii.engine.sequence import Sequence
from mii.errors import CONTEXT_LENGTH_EXCEEDED, InvalidRequestError, RequestTooLargeError
from mii.prompts import max_prompt_chars


class RequestIntake:
    """Tokenizes and checks requests against the engine's limits."""

    def __init__(
        self,
        tokenizer,
        vocab_size: int,
        max_length: int,
        blocks: BlockManager,
        eos_token_ids: list[int] | None = None,
        seed: int = 0,
    ) -> None:
        self.tokenizer = tokenizer
        # The seeds of requests that give none: drawn in arrival order from a stream
        # the engine's seed starts, so the same requests in the same order sample the
        # same tokens from run to run (vLLM's behaviour with its default seed 0).
        self.unseeded = random.Random(f"{seed}")  # (a str: Random(-7) would equal Random(7))
        self.vocab_size = vocab_size
        self.max_length = max_length
        self.blocks = blocks
        self.max_prompt_chars = max_prompt_chars(tokenizer, max_length)
        # structured output: the constraints' compiled grammars, for this tokenizer
        self.grammars = GrammarCache(tokenizer, vocab_size, eos_token_ids or [])
        self.eos_token_ids = frozenset(eos_token_ids or ())

    def tokenize(self, prompt: str | list[int], truncating: bool = False) -> list[int]:
        """Token ids of a text prompt; a list of ids is checked against the vocabulary.
        A text prompt too long for ``max_length`` tokens whatever its tokens is refused
        before tokenizing it (seconds of work for megabytes of text), unless the request
        keeps only its last tokens (``truncating``: truncate_prompt_tokens): then only
        the text's last ``max_prompt_chars`` characters are tokenized. They hold at
        least 2 x max_length tokens, so the cut (which may split a word) lies more than
        max_length tokens before any token that truncation keeps."""
        if isinstance(prompt, str):
            if self._over_char_limit(prompt) and truncating:
                prompt = prompt[-self.max_prompt_chars :]
            elif self._over_char_limit(prompt):
                raise InvalidRequestError(
                    f"the prompt has {len(prompt)} characters: more than {self.max_length} "
                    f"tokens (max_length) of this tokenizer can hold ({self.max_prompt_chars}); "
                    "shorten the prompt",
                    field="prompt",
                    code=CONTEXT_LENGTH_EXCEEDED,
                )
            return list(self.tokenizer(prompt).input_ids)
        outside = [t for t in prompt if not (isinstance(t, int) and 0 <= t < self.vocab_size)]
        if outside:
            raise InvalidRequestError(
                f"prompt has the token id {outside[0]!r}, which is not in this model's "
                f"vocabulary (ids are integers in [0, {self.vocab_size}))",
                field="prompt",
            )
        return list(prompt)

    def _over_char_limit(self, prompt: str | list[int]) -> bool:
        """A text with more characters than ``max_length`` tokens of this tokenizer
        can hold (refused, or cut when truncating, before it is tokenized)."""
        limit = self.max_prompt_chars
        return isinstance(prompt, str) and limit is not None and len(prompt) > limit

    def _refuse_prompt(
        self,
        tokens: int,
        cut: bool,
        params: GenerateParams,
        max_length: int,
        held: int,
        needs_room: bool,
    ) -> None:
        """The error for a prompt of ``tokens`` tokens (more, when ``cut``) that leaves
        no room for a new token (``needs_room``; else: that does not fit) under
        ``max_length`` or in the ``held``-token cache."""
        count = f"more than {tokens}" if cut else f"{tokens}"
        # A request for no new token (echo with max_tokens 0) needs no room: it is over.
        no_room = "which leaves no room under" if needs_room else "more than"
        shorten = (
            "lower truncate_prompt_tokens (-1 for as many as fit)"
            if params.truncate_prompt_tokens
            else "shorten the prompt, keep its last tokens (truncate_prompt_tokens=N, or -1 "
            "for as many as fit)"
        )
        if tokens + needs_room <= max_length:  # (so the cache, smaller, is the limit)
            raise RequestTooLargeError(
                f"the prompt has {count} tokens but the whole KV cache holds {held}; "
                f"{shorten} or raise num_kv_blocks",
                field="prompt",
                code=CONTEXT_LENGTH_EXCEEDED,
            )
        raise InvalidRequestError(
            f"the prompt has {count} tokens, {no_room} max_length={max_length}; "
            f"{shorten} or raise "
            + (
                f"the request's max_length (up to the engine's {self.max_length})"
                if params.max_length and params.max_length < self.max_length
                else "the engine's max_length (mii serve: --max-model-len)"
            ),
            field="prompt",
            code=CONTEXT_LENGTH_EXCEEDED,
        )

    def _check_allowed_tokens(self, params: GenerateParams) -> None:
        """Refuse ``allowed_token_ids`` that are all banned below ``min_new_tokens``
        (end-of-sequence and stop tokens): no token would be left to sample, and the
        sampler drew tokens outside the list. (Under a constraint its grammar decides
        where the answer ends, and end-of-sequence is not banned.)"""
        allowed = params.allowed_token_ids
        if allowed is None or params.min_new_tokens == 0 or params.constraint is not None:
            return
        banned = set(params.stop_token_ids) | (set() if params.ignore_eos else self.eos_token_ids)
        if set(allowed) <= banned:
            raise InvalidRequestError(
                f"invalid generation option 'allowed_token_ids': {sorted(set(allowed))} are "
                "end-of-sequence or stop tokens, banned below "
                f"min_new_tokens={params.min_new_tokens}, so no token is left to generate; "
                "allow other tokens too, or drop min_new_tokens",
                field="allowed_token_ids",
            )

    def make_sequence(
        self,
        request_id: str,
        prompt: str | list[int],
        params: GenerateParams,
        prompt_ids: list[int] | None = None,
        grammar: Any = None,
    ) -> Sequence:
        """Tokenize and check one request; raises InvalidRequestError before it is queued.
        ``prompt_ids``: the text prompt's ids when the caller tokenized it already;
        ``grammar``: its constraint's compiled grammar when the caller compiled it
        already (off the event loop: ``AsyncEngine``), else it is compiled here."""
        if not isinstance(prompt, (str, list)):
            raise InvalidRequestError(
                f"a prompt must be a string or a list of token ids, not {type(prompt).__name__}",
                field="prompt",
            )
        if prompt_ids is None or not isinstance(prompt, str):
            prompt_ids = self.tokenize(prompt, truncating=bool(params.truncate_prompt_tokens))
        if not prompt_ids:
            raise InvalidRequestError("the prompt is empty", field="prompt")
        max_length = params.max_length or self.max_length
        if max_length > self.max_length:
            raise InvalidRequestError(
                f"invalid generation option 'max_length': {max_length} exceeds the engine's "
                f"maximum of {self.max_length}",
                field="max_length",
            )
        # One sequence reaches max_length or the end of the whole KV cache, whichever
        # comes first (a cache smaller than max_length is the caller's choice: startup
        # warns); max_new_tokens past it is clamped, as past max_length.
        held = self.blocks.num_tokens
        limit = min(max_length, held)
        # A text too long to tokenize whole was cut first: it has more tokens than these.
        cut = bool(params.truncate_prompt_tokens) and self._over_char_limit(prompt)
        # A request for no new token (scoring: OpenAI's echo with max_tokens 0) needs no
        # room after its prompt, which may then fill max_length (vLLM takes it too).
        needs_room = params.max_new_tokens != 0
        keep = params.truncate_prompt_tokens
        truncated = False
        if keep is not None and keep > max_length:  # never fits (vLLM refuses it too)
            raise InvalidRequestError(
                f"invalid generation option 'truncate_prompt_tokens': {keep} is more than "
                f"max_length={max_length} holds; pass at most {max_length - needs_room}, or "
                "-1 for as many as fit",
                field="truncate_prompt_tokens",
            )
        if keep:  # the prompt's last tokens (-1: all that leave room for what it asks)
            keep = limit - needs_room if keep == -1 else keep
            truncated = len(prompt_ids) > keep
            prompt_ids = prompt_ids[-keep:]
        for option, token in params.token_ids_used():  # logit_bias, stop_token_ids
            if token >= self.vocab_size:
                raise InvalidRequestError(
                    f"invalid generation option {option!r}: token id {token} is not in the "
                    f"model's vocabulary of {self.vocab_size} tokens",
                    field=option,
                )
        self._check_allowed_tokens(params)
        if len(prompt_ids) > limit - needs_room:
            self._refuse_prompt(len(prompt_ids), cut, params, max_length, held, needs_room)
        room = limit - len(prompt_ids)
        max_new = room if params.max_new_tokens is None else min(params.max_new_tokens, room)
        # Prompt logprobs and no new token (OpenAI's echo with max_tokens 0): the
        # prompt still runs, and the one token it samples is dropped.
        score_only = max_new == 0 and params.prompt_logprobs is not None
        if score_only:
            max_new = 1
        if params.constraint is not None and grammar is None:
            grammar = self.grammars.get(params.constraint)
        seed = params.seed if params.seed is not None else self.unseeded.getrandbits(63)
        # The text return_full_text (echo) puts first: the caller's, unless truncation
        # cut it (then the kept tokens' text, which the logprobs and offsets follow).
        prompt_text = prompt if isinstance(prompt, str) and not truncated else None
        seq = Sequence(
            request_id,
            prompt_ids,
            params,
            max_new,
            seed,
            prompt_text=prompt_text,
            score_only=score_only,
            grammar=(
                grammar_mask.new_matcher(grammar, self.grammars.utf8_guard)
                if grammar is not None
                else None
            ),
        )
        # Prefix caching: the prompt's block hashes, here in the caller rather than
        # in the engine's step (which only looks them up).
        self.blocks.hash_prompt(seq)
        return seq
