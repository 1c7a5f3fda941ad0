"""The state of one request as it moves through the scheduler."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Any

from mii.config import GenerateParams

# Stands in for a sampled token that is still on the device (async scheduling):
# never a valid id, so a placeholder that reached the model would fail loudly.
PENDING_TOKEN = -1


class SequenceStatus(enum.Enum):
    WAITING = "waiting"  # not admitted yet, or preempted and waiting to be recomputed
    RUNNING = "running"  # holds KV blocks and is scheduled every pass
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """Tokens of one request and how many of them already have KV in the cache.

    Invariant: ``num_computed <= len(token_ids)``. The tokens in
    ``token_ids[num_computed:]`` still need a forward pass; a sequence is
    sampled from when a pass brings ``num_computed`` up to ``len(token_ids)``.
    After preemption ``num_computed`` drops to 0 and prompt plus generated
    tokens are recomputed as one longer prompt; nothing generated is lost.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: GenerateParams
    max_new_tokens: int  # resolved from max_new_tokens / max_length
    seed: int
    prompt_text: str | None = None  # the prompt as the caller wrote it (None: given as ids)
    token_ids: list[int] = field(default_factory=list)
    num_computed: int = 0
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    admitted_at: int = -1  # admission order; the most recent is preempted first
    num_preemptions: int = 0
    finish_reason: str | None = None
    # Async scheduling: the last token is PENDING_TOKEN and its value is this row
    # of the in-flight pass's sampled tokens (on the device). None: every token known.
    pending_row: int | None = None
    # Lowest sequence length its tokens are rotated for by length-dependent rope
    # scalings (besides the prompt length): raised when a Phi-3 longrope sequence
    # outgrows its original context (see Scheduler._outgrow_rope).
    rope_len_floor: int = 0
    # prompt_logprobs: the next prompt token to score (token 0 has nothing before
    # it). Only rises, so that recomputing a preempted prompt scores nothing twice.
    prompt_scored_upto: int = 1
    # A request for prompt logprobs and no new token (max_new_tokens 0): it runs
    # its prompt and samples one token that is never returned.
    score_only: bool = False
    # Prefix caching (engine/kv_cache.py): the chained hashes of its full blocks
    # computed so far (kept across preemption: its tokens never change), how many
    # of its blocks are registered, and the prompt tokens found cached at admission.
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered_blocks: int = 0
    in_flight_until: int = 0  # its prompt blocks below this one are tracked in flight
    num_cached_tokens: int = 0
    # time.monotonic() of its arrival, its first forward pass and its first token:
    # the queue time and time to first token that its last piece reports.
    arrival_time: float = field(default_factory=time.monotonic)
    scheduled_time: float | None = None
    first_token_time: float | None = None
    # Structured output (engine/grammar_mask.py): the GrammarState (xgrammar matcher
    # and UTF-8 guard) of its constraint, advanced once per resolved token;
    # None: unconstrained.
    grammar: Any = None

    def __post_init__(self) -> None:
        if not self.token_ids:
            self.token_ids = list(self.prompt_token_ids)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def generated_token_ids(self) -> list[int]:
        return self.token_ids[self.prompt_len :]

    @property
    def num_uncomputed(self) -> int:
        return len(self.token_ids) - self.num_computed

    @property
    def max_total_tokens(self) -> int:
        """Tokens that may ever need KV: the prompt plus every token it may generate."""
        return self.prompt_len + self.max_new_tokens

    @property
    def done_generating(self) -> bool:
        """All of its tokens are sampled (the last may still be on the device):
        nothing left to schedule, only the end of the request to report."""
        return self.num_generated >= self.max_new_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED
