"""An engine's token counters (for throughput) and each request's timing.

Prompt tokens count once per request, when its first token is sampled (its
prompt is then processed, whatever chunks or recomputations it took), as vLLM
counts them; generation tokens count every sampled token that a request keeps.
Both only grow: a reader computes throughput from two readings.

A request's queue time runs from its arrival (``Sequence`` creation, when the
caller submits it) to the first forward pass that includes it; its time to
first token, from its arrival to the sampling of its first token. Both are in
seconds, reported on its last piece (``Response.queue_time_s``,
``Response.first_token_time_s``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from mii.engine.sequence import Sequence
from mii.response import Response


@dataclass
class TokenCounters:
    """Tokens an engine has processed since it started."""

    prompt_tokens: int = 0
    generation_tokens: int = 0


def mark_scheduled(seqs: list[Sequence]) -> None:
    """Note the first forward pass of each of ``seqs`` that had none yet."""
    now = time.monotonic()
    for seq in seqs:
        if seq.scheduled_time is None:
            seq.scheduled_time = now


def count_token(counters: TokenCounters, seq: Sequence) -> None:
    """Count a token sampled for ``seq`` (and its prompt, at its first token)."""
    counters.generation_tokens += 1
    if seq.first_token_time is None:
        seq.first_token_time = time.monotonic()
        counters.prompt_tokens += seq.prompt_len


def stamp_times(piece: Response, seq: Sequence) -> None:
    """Give a request's last piece its queue time and time to first token."""
    if seq.scheduled_time is not None:
        piece.queue_time_s = seq.scheduled_time - seq.arrival_time
    if seq.first_token_time is not None:
        piece.first_token_time_s = seq.first_token_time - seq.arrival_time
