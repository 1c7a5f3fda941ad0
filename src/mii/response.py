"""What a generation returns."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Response:
    """Generated text and how it ended.

    From ``generate`` it is the whole answer; from ``stream`` each piece carries
    only the new text in ``generated_text``, the running ``generated_length``,
    and ``finish_reason`` on the last piece ("stop": EOS or a stop string;
    "length": ``max_new_tokens`` or ``max_length`` reached). ``token_ids`` holds
    the generated token ids (in a streamed piece, those new since the last piece).
    """

    generated_text: str
    prompt_length: int
    generated_length: int
    finish_reason: str | None = None
    request_id: str | None = None
    token_ids: list[int] = field(default_factory=list)  # generated ids (EOS included)
    # The engine's timing of the request, on its last piece (and so on a whole answer):
    # seconds from its arrival to its first forward pass, and to its first token.
    # None elsewhere. Not part of equality: the same answer may be timed otherwise.
    queue_time_s: float | None = field(default=None, compare=False, repr=False)
    first_token_time_s: float | None = field(default=None, compare=False, repr=False)

    def __str__(self) -> str:
        return self.generated_text


def join_pieces(pieces: list[Response], finish_reason: str | None = None) -> Response:
    """The whole answer from a request's streamed pieces (``finish_reason`` overrides
    the last piece's, e.g. "abort" for a stream that was cut short)."""
    last = pieces[-1] if pieces else Response("", 0, 0)
    return Response(
        "".join(p.generated_text for p in pieces),
        last.prompt_length,
        last.generated_length,
        finish_reason or last.finish_reason,
        last.request_id,
        [t for p in pieces for t in p.token_ids],
        last.queue_time_s,
        last.first_token_time_s,
    )
