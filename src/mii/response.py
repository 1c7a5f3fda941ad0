"""What a generation returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class TokenLogprob:
    """A token's log-probability and the most likely tokens at its position.

    ``logprob`` is of ``token_id``; ``top`` holds the ``k`` most likely tokens
    as ``(token id, logprob)``, most likely first (``k`` as asked with
    ``logprobs`` / ``prompt_logprobs``). Which distribution they are of is
    ``GenerateParams.logprobs_mode``. A token the sampling settings exclude
    (``logprobs_mode="processed"`` with top-k/top-p) has logprob ``-inf``.
    """

    token_id: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)
    rank: int | None = None  # 1 + the tokens more likely than token_id (None: not known)

    @classmethod
    def from_dict(cls, fields: dict[str, Any] | None) -> TokenLogprob | None:
        """The inverse of ``dataclasses.asdict`` (None stays None)."""
        if fields is None:
            return None
        top = [tuple(t) for t in fields["top"]]
        return cls(fields["token_id"], fields["logprob"], top, fields.get("rank"))


@dataclass
class Response:
    """Generated text and how it ended.

    From ``generate`` it is the whole answer; from ``stream`` each piece carries
    only the new text in ``generated_text``, the running ``generated_length``,
    and ``finish_reason`` on the last piece ("stop": EOS or a stop string;
    "length": ``max_new_tokens`` or ``max_length`` reached). ``token_ids`` holds
    the generated token ids (in a streamed piece, those new since the last piece).

    ``logprobs`` (when the request asked for ``logprobs``) has one entry per id
    of ``token_ids``. ``prompt_logprobs`` (when it asked for ``prompt_logprobs``)
    has one per prompt token, the first None (nothing precedes it), and
    ``prompt_token_ids`` the prompt's ids; a stream carries both on its first piece.

    ``stop_reason`` (on the last piece) says which stop ended a "stop" answer: the
    stop string found, or the ``stop_token_ids`` token generated; None when EOS or a
    completed grammar ended it, and for any other finish (as vLLM's ``stop_reason``).
    """

    generated_text: str
    prompt_length: int
    generated_length: int
    finish_reason: str | None = None
    request_id: str | None = None
    token_ids: list[int] = field(default_factory=list)  # generated ids (EOS included)
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    prompt_token_ids: list[int] | None = None  # sent with prompt_logprobs
    # Prompt tokens whose KV was found in the prefix cache (not computed again).
    cached_tokens: int = 0
    stop_reason: str | int | None = None
    # The engine's timing of the request, on its last piece (and so on a whole answer):
    # seconds from its arrival to its first forward pass, and to its first token.
    # None elsewhere. Not part of equality: the same answer may be timed otherwise.
    queue_time_s: float | None = field(default=None, compare=False, repr=False)
    first_token_time_s: float | None = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        return self.generated_text

    @classmethod
    def from_dict(cls, fields: dict[str, Any]) -> Response:
        """The inverse of ``dataclasses.asdict`` (logprobs included)."""
        fields = dict(fields)
        for name in ("logprobs", "prompt_logprobs"):
            if fields.get(name) is not None:
                fields[name] = [TokenLogprob.from_dict(t) for t in fields[name]]
        return cls(**fields)


def join_pieces(pieces: list[Response], finish_reason: str | None = None) -> Response:
    """The whole answer from a request's streamed pieces (``finish_reason`` overrides
    the last piece's, e.g. "abort" for a stream that was cut short)."""
    last = pieces[-1] if pieces else Response("", 0, 0)
    with_logprobs = [p.logprobs for p in pieces if p.logprobs is not None]
    scored = next((p for p in pieces if p.prompt_logprobs is not None), None)
    return Response(
        "".join(p.generated_text for p in pieces),
        last.prompt_length,
        last.generated_length,
        finish_reason or last.finish_reason,
        last.request_id,
        [t for p in pieces for t in p.token_ids],
        logprobs=[t for lps in with_logprobs for t in lps] if with_logprobs else None,
        prompt_logprobs=scored.prompt_logprobs if scored else None,
        prompt_token_ids=scored.prompt_token_ids if scored else None,
        cached_tokens=last.cached_tokens,
        stop_reason=last.stop_reason if finish_reason is None else None,
        queue_time_s=last.queue_time_s,
        first_token_time_s=last.first_token_time_s,
    )
