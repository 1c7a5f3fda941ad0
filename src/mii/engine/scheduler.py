"""Continuous batching with Dynamic SplitFuse.

Every forward pass has a budget of ``token_budget`` tokens and at most
``max_num_seqs`` sequences. Each pass is filled in this order:

1. running sequences that are decoding get their one token (oldest first);
2. running sequences still in their prompt get the next chunk of it (oldest first);
3. waiting sequences are admitted (preempted ones first, then arrival order)
   and get a first chunk from whatever budget is left.

So decodes never wait for a long prompt, long prompts are split across passes,
and passes stay close to ``token_budget`` tokens.

Short prompts do not wait behind long ones either: waiting prompts that fit
``short_prompt_reserve`` tokens whole (together, less a cached prefix) are
admitted first, and running prefills leave them their tokens of the pass, so a
chat turn that arrives during a long prefill answers after one pass, not after
the whole prompt (vLLM V1 makes it wait; its ``long_prefill_token_threshold``
caps every long chunk instead, even when nothing waits; V0 let short prompts
pass long ones too). A long prompt alone keeps the whole budget, and beside
short prompts at least half of what the decodes leave; the first long prompt
waiting keeps a sequence slot.

When the KV pool has no block for a running sequence, the most recently
admitted running sequence is preempted: its blocks are freed and it goes back
to the head of the waiting queue, to be recomputed later. The oldest running
sequence can therefore always progress (it fits alone: that is checked on
arrival), so the scheduler never deadlocks.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from mii.engine.kv_cache import BlockManager
from mii.engine.sequence import Sequence, SequenceStatus

# Waiting sequences looked at for short prompts each pass: a deep queue costs no
# more host time per pass than this many.
SHORT_PROMPT_LOOKAHEAD = 256


@dataclass
class ScheduledChunk:
    """``num_tokens`` tokens of ``seq``, starting at ``seq.num_computed``."""

    seq: Sequence
    num_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the sequence's last token, so a new token is sampled."""
        return self.seq.num_computed + self.num_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    # Sequences given a chunk of prompt (or of recompute): the blocks it fills are
    # registered for prefix caching at commit. A decoding sequence's filled block
    # is registered when it next grows (BlockManager.allocate): no per-decode cost.
    filling: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        token_budget: int,
        max_num_seqs: int,
        rope_recompute_at: int | None = None,
        short_prompt_reserve: int = 0,
    ) -> None:
        self.blocks = block_manager
        # Phi-3 longrope: a sequence that outgrows this length is recomputed whole
        # with the long factors (``_outgrow_rope``); None for every other model.
        self.rope_recompute_at = rope_recompute_at
        self.token_budget = token_budget
        self.max_num_seqs = max_num_seqs
        self.short_prompt_reserve = short_prompt_reserve
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # in admission order
        self._admissions = 0
        self.num_preemptions = 0

    # ----- intake and removal -------------------------------------------------

    def add(self, seq: Sequence) -> None:
        """Queue a new sequence. The caller has checked that it fits the pool alone."""
        seq.status = SequenceStatus.WAITING
        self.waiting.append(seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """End ``seq`` (finished, aborted or failed) and free its blocks at once."""
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq.status is SequenceStatus.WAITING:
            self.waiting.remove(seq)
        self.blocks.free(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # ----- one pass -----------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.token_budget
        scheduled: dict[int, ScheduledChunk] = {}

        def preempt_latest() -> Sequence:
            victim = self.running[-1]
            chunk = scheduled.pop(id(victim), None)
            if chunk is not None:
                out.chunks.remove(chunk)
                nonlocal budget
                budget += chunk.num_tokens
            self._preempt(victim)
            out.preempted.append(victim)
            return victim

        def grow(seq: Sequence, wanted: int) -> int:
            """Reserve blocks for up to ``wanted`` tokens, preempting later sequences if
            none fit; 0 if ``seq`` itself had to be preempted."""
            while True:
                fits = self.blocks.tokens_that_fit(seq, wanted)
                if fits > 0:
                    self.blocks.allocate(seq, fits)
                    return fits
                if preempt_latest() is seq:
                    return 0

        def add_chunk(seq: Sequence, num_tokens: int) -> None:
            nonlocal budget
            chunk = ScheduledChunk(seq, num_tokens)
            out.chunks.append(chunk)
            scheduled[id(seq)] = chunk
            budget -= num_tokens

        def add_fill(seq: Sequence, num_tokens: int) -> None:
            add_chunk(seq, num_tokens)
            out.filling.append(seq)

        if self.rope_recompute_at is not None:
            for seq in self.running:
                self._outgrow_rope(seq)
        # A sequence whose last allowed token is still being read back (async
        # scheduling) needs no further pass.
        active = [s for s in self.running if not s.done_generating]
        decoding = [s for s in active if s.num_uncomputed == 1]
        prefilling = [s for s in active if s.num_uncomputed > 1]

        def serve(group: list[Sequence], add: Callable[[Sequence, int], None], kept: int) -> None:
            """Give each sequence of ``group`` its next chunk, oldest first, leaving
            ``kept`` tokens of the budget."""
            for seq in group:
                if budget <= kept or seq.status is not SequenceStatus.RUNNING:
                    continue  # out of budget, or preempted while serving an older sequence
                taken = grow(seq, min(seq.num_uncomputed, budget - kept))
                if taken:
                    add(seq, taken)

        serve(decoding, add_chunk, 0)
        # Short prompts waiting take at most half of what the decodes left (a long
        # prompt progresses however many arrive), each whole: a short prompt split
        # over passes would wait beside the long one.
        limit = min(self.short_prompt_reserve, budget // 2)
        admitting = self.waiting and limit and not out.preempted  # (no admission: below)
        shorts = self._short_prompts_waiting(limit) if admitting else []
        serve(prefilling, add_fill, sum(tokens for _, tokens in shorts))

        # After a preemption the pool is known to be full; admitting now would only
        # hand the freed blocks to a newcomer and thrash.
        if not out.preempted:
            self._admit_waiting(budget, add_fill, [seq for seq, _ in shorts])
        return out

    def _short_prompts_waiting(self, room: int) -> list[tuple[Sequence, int]]:
        """The waiting sequences admitted first, with the tokens each computes: in
        arrival order, those whose prompts (less their cached prefix: a chat turn's
        history) fit ``room`` tokens whole, together, with a free sequence slot each.
        They pass longer prompts that have not run yet, but leave the first of these a
        slot (else, with the slots full and short prompts arriving non-stop, it would
        never get one), and never pass a preempted sequence (it waits for blocks it
        held; the queue starts with such sequences)."""
        seats = self.max_num_seqs - len(self.running)
        shorts: list[tuple[Sequence, int]] = []
        passed = False
        for seq in itertools.islice(self.waiting, SHORT_PROMPT_LOOKAHEAD):
            if room == 0 or seats == 0:
                break
            tokens = self.blocks.uncached_tokens(seq, room)
            if tokens <= room:
                shorts.append((seq, tokens))
                room -= tokens
                seats -= 1
            elif seq.num_preemptions:
                break
            elif not passed:  # its slot, kept
                passed = True
                seats -= 1
        return shorts

    def _admit_waiting(
        self, budget: int, add_chunk: Callable[[Sequence, int], None], shorts: list[Sequence]
    ) -> None:
        """Admit waiting sequences, ``shorts`` first (``_short_prompts_waiting``), then
        in order (preempted ones first), while ``budget``, the sequence cap and the pool
        allow, each with a chunk (``add_chunk``). A sequence
        whose next prompt block is being computed by another (prefix caching: n > 1,
        identical prompts arriving together) is passed over, not waited behind: it
        joins once that block is cached."""
        first = {id(seq) for seq in shorts}
        for seq in [*shorts, *(seq for seq in self.waiting if id(seq) not in first)]:
            if budget == 0 or len(self.running) >= self.max_num_seqs:
                break
            if self.rope_recompute_at is not None:
                self._outgrow_rope(seq)
            cached = self.blocks.attach_prefix(seq)  # prefix caching: skip what is cached
            if seq.num_preemptions == 0:
                seq.num_cached_tokens = cached
            if self.blocks.waits_for_prefix(seq):
                self._detach(seq)
                continue
            fits = self.blocks.tokens_that_fit(seq, min(seq.num_uncomputed, budget))
            if fits == 0:
                self._detach(seq)
                break  # the pool is full; admission never preempts running sequences
            self.waiting.remove(seq)
            self._admit(seq)
            self.blocks.allocate(seq, fits)
            self.blocks.admitted(seq)  # prefix caching: count its lookup, track its blocks
            add_chunk(seq, fits)
            budget -= fits

    def _detach(self, seq: Sequence) -> None:
        """A waiting sequence stays waiting: drop the cached prefix it attached."""
        self.blocks.free(seq)
        seq.num_computed = 0

    def _outgrow_rope(self, seq: Sequence) -> None:
        """transformers' Phi-3 ``generate`` drops its KV cache when the sequence first
        outgrows ``original_max_position_embeddings`` and recomputes every token with
        the long factors. Do the same: raise the sequence's rope length to past the
        limit and compute it again from the start (its blocks are kept)."""
        limit = self.rope_recompute_at
        if seq.rope_len_floor > limit or seq.prompt_len > limit or seq.num_tokens <= limit:
            return  # already long from the prompt on, already recomputed, or still short
        seq.rope_len_floor = limit + 1
        seq.num_computed = 0

    def _admit(self, seq: Sequence) -> None:
        seq.status = SequenceStatus.RUNNING
        seq.admitted_at = self._admissions
        self._admissions += 1
        self.running.append(seq)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def commit(self, output: SchedulerOutput) -> list[Sequence]:
        """Record that the pass ran: advance each chunk's sequence. Returns the
        sequences that now need a sampled token, in chunk order."""
        to_sample = []
        for chunk in output.chunks:
            samples = chunk.samples
            chunk.seq.num_computed += chunk.num_tokens
            if samples:
                to_sample.append(chunk.seq)
        if self.blocks.prefix_caching:
            for seq in output.filling:  # a sequence preempted since holds no block: a no-op
                self.blocks.register(seq)
        return to_sample
