"""Scheduler: continuous batching, Dynamic SplitFuse chunking and preemption.

The tests drive the scheduler the way the engine does: ``schedule()``, then
``commit()``, then append a (fake) sampled token to every sequence that sampled,
and finish those that reached ``max_new_tokens``.
"""

from __future__ import annotations

import random

from mii.config import GenerateParams
from mii.engine.kv_cache import BlockManager
from mii.engine.scheduler import Scheduler, SchedulerOutput
from mii.engine.sequence import Sequence, SequenceStatus


def make_seq(name: str, prompt_len: int, max_new_tokens: int = 4, seed: int = 0) -> Sequence:
    params = GenerateParams.parse(max_new_tokens=max_new_tokens, seed=seed)
    prompt = [(7 * i + len(name)) % 50 + 3 for i in range(prompt_len)]
    return Sequence(name, prompt, params, max_new_tokens, seed)


def make_scheduler(
    num_blocks: int = 64, block_size: int = 4, token_budget: int = 16, max_num_seqs: int = 8
) -> Scheduler:
    return Scheduler(BlockManager(num_blocks, block_size), token_budget, max_num_seqs)


def check_invariants(sched: Scheduler, out: SchedulerOutput, before: dict[int, int]) -> None:
    """What must hold for every plan, before it is committed. ``before`` maps the
    sequences running before ``schedule()`` to their uncomputed token counts."""
    bm = sched.blocks
    assert out.num_tokens <= sched.token_budget
    assert len(out.chunks) <= sched.max_num_seqs
    assert len(sched.running) <= sched.max_num_seqs
    seqs = [c.seq for c in out.chunks]
    assert len({id(s) for s in seqs}) == len(seqs), "a sequence was scheduled twice"
    for chunk in out.chunks:
        seq = chunk.seq
        assert seq.status is SequenceStatus.RUNNING
        assert seq in sched.running
        assert 1 <= chunk.num_tokens <= seq.num_uncomputed
        # The blocks for the chunk are reserved before the pass runs.
        assert len(seq.block_table) * bm.block_size >= seq.num_computed + chunk.num_tokens
    # Decodes of running sequences come first, then their prefill chunks, then the
    # sequences admitted in this pass.
    order = {"decode": 0, "prefill": 1, "admitted": 2}
    kinds = [
        "admitted"
        if id(c.seq) not in before
        else ("decode" if before[id(c.seq)] == 1 else "prefill")
        for c in out.chunks
    ]
    assert kinds == sorted(kinds, key=order.__getitem__), f"out of order: {kinds}"
    for seq in out.preempted:
        assert seq.status is SequenceStatus.WAITING
        assert seq.num_computed == 0
        assert seq.block_table == []
        assert seq in sched.waiting
        assert seq not in seqs
    # Block accounting: every block is free or held by exactly one running sequence.
    held = [b for s in sched.running for b in s.block_table]
    assert len(set(held)) == len(held)
    assert len(held) + bm.num_free == bm.num_blocks
    assert all(s.block_table == [] for s in sched.waiting)


def run_pass(sched: Scheduler) -> tuple[SchedulerOutput, list[Sequence]]:
    before = {id(s): s.num_uncomputed for s in sched.running}
    out = sched.schedule()
    check_invariants(sched, out, before)
    sampled = sched.commit(out)
    assert sampled == [c.seq for c in out.chunks if c.seq.num_computed == c.seq.num_tokens]
    for seq in sampled:
        seq.token_ids.append(0)
        if seq.num_generated >= seq.max_new_tokens:
            sched.finish(seq, "length")
    return out, sampled


def run_to_end(sched: Scheduler, max_passes: int = 10_000) -> list[SchedulerOutput]:
    outs = []
    while sched.has_work():
        assert len(outs) < max_passes, "the scheduler made no end (livelock or deadlock)"
        out, _ = run_pass(sched)
        assert out.chunks, "a pass with work pending scheduled nothing"
        outs.append(out)
    return outs


def sizes(out: SchedulerOutput) -> list[tuple[str, int]]:
    return [(c.seq.request_id, c.num_tokens) for c in out.chunks]


# ----- chunking and ordering -----------------------------------------------------


def test_long_prompt_is_split_across_passes():
    sched = make_scheduler(token_budget=16)
    seq = make_seq("long", prompt_len=50, max_new_tokens=3)
    sched.add(seq)
    chunk_sizes = []
    samples = []
    for _ in range(4):
        out, sampled = run_pass(sched)
        chunk_sizes.append(sizes(out))
        samples.append(bool(sampled))
    assert chunk_sizes == [[("long", 16)]] * 3 + [[("long", 2)]]
    assert samples == [False, False, False, True]  # only the chunk reaching the end samples
    assert seq.num_computed == 50
    assert seq.num_generated == 1
    for _ in range(2):
        out, sampled = run_pass(sched)
        assert sizes(out) == [("long", 1)]
        assert sampled == [seq]
    assert seq.is_finished
    assert seq.finish_reason == "length"
    assert seq.num_generated == 3
    assert not sched.has_work()
    assert sched.blocks.num_free == sched.blocks.num_blocks


def test_decodes_are_scheduled_before_prefill_chunks():
    sched = make_scheduler(token_budget=16, max_num_seqs=8)
    decoders = [make_seq(f"d{i}", prompt_len=3, max_new_tokens=20) for i in range(3)]
    for seq in decoders:
        sched.add(seq)
    out, sampled = run_pass(sched)
    assert sizes(out) == [("d0", 3), ("d1", 3), ("d2", 3)]
    assert sampled == decoders
    long = make_seq("long", prompt_len=40, max_new_tokens=2)
    sched.add(long)
    out, _ = run_pass(sched)
    # Each decoder gets its one token first; the prompt takes the rest of the budget.
    assert sizes(out) == [("d0", 1), ("d1", 1), ("d2", 1), ("long", 13)]
    out, _ = run_pass(sched)
    assert sizes(out) == [("d0", 1), ("d1", 1), ("d2", 1), ("long", 13)]
    out, _ = run_pass(sched)
    assert sizes(out) == [("d0", 1), ("d1", 1), ("d2", 1), ("long", 13)]
    out, sampled = run_pass(sched)
    assert sizes(out) == [("d0", 1), ("d1", 1), ("d2", 1), ("long", 1)]
    assert long in sampled
    # Now that it decodes too, it is served alongside the others.
    out, _ = run_pass(sched)
    assert sorted(sizes(out)) == [("d0", 1), ("d1", 1), ("d2", 1), ("long", 1)]


def test_running_prompt_is_served_before_newcomers_are_admitted():
    sched = make_scheduler(num_blocks=64, block_size=4, token_budget=8)
    old = make_seq("old", prompt_len=30, max_new_tokens=2)
    sched.add(old)
    run_pass(sched)  # old: 8 of 30
    young = make_seq("young", prompt_len=2, max_new_tokens=5)
    sched.add(young)
    run_pass(sched)  # old: 16 of 30, no budget left for young
    assert young.status is SequenceStatus.WAITING
    out, _ = run_pass(sched)  # old: 24 of 30, nothing left
    out, _ = run_pass(sched)  # old finishes its prompt (6), young admitted with 2
    assert sizes(out) == [("old", 6), ("young", 2)]
    out, _ = run_pass(sched)
    assert sizes(out) == [("old", 1), ("young", 1)]


def test_new_requests_join_while_others_decode():
    sched = make_scheduler(token_budget=10, max_num_seqs=4)
    a = make_seq("a", prompt_len=4, max_new_tokens=8)
    sched.add(a)
    run_pass(sched)
    run_pass(sched)
    assert a.num_generated == 2
    b = make_seq("b", prompt_len=12, max_new_tokens=3)
    sched.add(b)
    out, sampled = run_pass(sched)
    assert sizes(out) == [("a", 1), ("b", 9)]  # b joins at once, a keeps decoding
    assert sampled == [a]
    out, sampled = run_pass(sched)
    assert sizes(out) == [("a", 1), ("b", 3)]
    assert sampled == [a, b]
    c = make_seq("c", prompt_len=3, max_new_tokens=1)
    sched.add(c)
    out, sampled = run_pass(sched)
    assert sizes(out) == [("a", 1), ("b", 1), ("c", 3)]
    assert c.is_finished  # joined and left within one pass
    assert a.num_generated == 5 and b.num_generated == 2
    out, _ = run_pass(sched)
    assert sizes(out) == [("a", 1), ("b", 1)]


def test_token_budget_is_never_exceeded_and_passes_are_filled():
    rng = random.Random(1234)
    budget = 24
    sched = make_scheduler(num_blocks=10_000, block_size=4, token_budget=budget, max_num_seqs=64)
    seqs = []
    pending = [
        make_seq(f"r{i}", prompt_len=rng.randint(1, 70), max_new_tokens=rng.randint(1, 12))
        for i in range(40)
    ]
    passes = 0
    while pending or sched.has_work():
        for _ in range(rng.randint(0, 3)):
            if pending:
                seq = pending.pop(0)
                seqs.append(seq)
                sched.add(seq)
        work = sum(s.num_uncomputed for s in list(sched.running) + list(sched.waiting))
        out, _ = run_pass(sched)
        passes += 1
        assert passes < 5_000
        assert out.num_tokens <= budget
        # Blocks and sequence slots are plentiful: SplitFuse fills every pass.
        assert out.num_tokens == min(budget, work)
    assert all(s.is_finished and s.num_generated == s.max_new_tokens for s in seqs)
    assert sched.blocks.num_free == sched.blocks.num_blocks


def test_max_num_seqs_is_respected():
    sched = make_scheduler(token_budget=64, max_num_seqs=2)
    seqs = [make_seq(f"s{i}", prompt_len=3, max_new_tokens=2 + i) for i in range(5)]
    for seq in seqs:
        sched.add(seq)
    admitted_order = []
    while sched.has_work():
        out, _ = run_pass(sched)
        assert len(out.chunks) <= 2
        assert len(sched.running) <= 2
        for c in out.chunks:
            if c.seq.request_id not in admitted_order:
                admitted_order.append(c.seq.request_id)
    assert admitted_order == [s.request_id for s in seqs]  # arrival order
    assert all(s.num_generated == s.max_new_tokens for s in seqs)


def test_a_slot_freed_by_a_finished_sequence_is_reused_next_pass():
    sched = make_scheduler(token_budget=64, max_num_seqs=2)
    a = make_seq("a", prompt_len=3, max_new_tokens=1)
    b = make_seq("b", prompt_len=3, max_new_tokens=5)
    c = make_seq("c", prompt_len=3, max_new_tokens=5)
    for seq in (a, b, c):
        sched.add(seq)
    out, _ = run_pass(sched)
    assert sizes(out) == [("a", 3), ("b", 3)]
    assert a.is_finished
    out, _ = run_pass(sched)
    assert sizes(out) == [("b", 1), ("c", 3)]


# ----- preemption ------------------------------------------------------------------


def test_most_recently_admitted_sequence_is_preempted_and_recomputed():
    # 6 blocks of 4 tokens. Three prompts of 8 take 2 blocks each and fill the pool.
    sched = make_scheduler(num_blocks=6, block_size=4, token_budget=64, max_num_seqs=8)
    a, b, c = (make_seq(n, prompt_len=8, max_new_tokens=8) for n in "abc")
    for seq in (a, b, c):
        sched.add(seq)
    out, sampled = run_pass(sched)
    assert sizes(out) == [("a", 8), ("b", 8), ("c", 8)]
    assert sched.blocks.num_free == 0
    late = make_seq("late", prompt_len=2, max_new_tokens=2)
    sched.add(late)  # waits: the pool is full
    c_tokens = list(c.token_ids)

    out, _ = run_pass(sched)
    # a needs a third block: c (admitted last) is preempted, not b, although b also
    # needs a block; b then takes one of c's freed blocks.
    assert out.preempted == [c]
    assert sizes(out) == [("a", 1), ("b", 1)]
    assert c.status is SequenceStatus.WAITING
    assert c.num_computed == 0
    assert c.block_table == []
    assert c.num_preemptions == 1
    assert c.token_ids == c_tokens  # nothing generated is lost
    assert list(sched.waiting) == [c, late]  # back at the head, ahead of newer arrivals
    assert c not in sched.running
    assert sched.num_preemptions == 1
    assert len(a.block_table) == 3 and len(b.block_table) == 3

    # c is recomputed later from scratch: prompt and generated token as one prompt.
    first_recompute = None
    while sched.has_work():
        before = c.num_computed
        out, sampled = run_pass(sched)
        for chunk in out.chunks:
            if chunk.seq is c and first_recompute is None:
                first_recompute = (before, chunk.num_tokens, c in sampled)
    assert first_recompute is not None
    start, num_tokens, sampled_now = first_recompute
    assert start == 0
    assert sampled_now == (num_tokens == len(c_tokens))
    for seq in (a, b, c, late):
        assert seq.is_finished
        assert seq.num_generated == seq.max_new_tokens
    assert c.token_ids[: len(c_tokens)] == c_tokens
    assert sched.blocks.num_free == sched.blocks.num_blocks
    assert sched.blocks.usage == 0.0


def test_preempted_sequence_resumes_generation_where_it_stopped():
    sched = make_scheduler(num_blocks=4, block_size=4, token_budget=32, max_num_seqs=4)
    a = make_seq("a", prompt_len=6, max_new_tokens=8)
    b = make_seq("b", prompt_len=6, max_new_tokens=8)
    sched.add(a)
    sched.add(b)
    preempted_at = None
    generated_when_preempted = None
    sampled_counts = {"a": 0, "b": 0}
    for i in range(200):
        if not sched.has_work():
            break
        out, sampled = run_pass(sched)
        for seq in sampled:
            sampled_counts[seq.request_id] += 1
        if b in out.preempted and preempted_at is None:
            preempted_at = i
            generated_when_preempted = b.num_generated
            assert b.num_computed == 0
            assert sched.waiting[0] is b
    assert preempted_at is not None, "the pool was meant to run out"
    assert a.num_preemptions == 0  # the oldest sequence is never the victim
    assert b.num_preemptions >= 1
    assert generated_when_preempted >= 1
    # Recomputing samples no extra tokens: exactly one sample per generated token.
    assert sampled_counts == {"a": 8, "b": 8}
    assert a.num_generated == b.num_generated == 8
    assert sched.blocks.num_free == 4


def test_no_admission_in_a_pass_that_preempted():
    sched = make_scheduler(num_blocks=4, block_size=2, token_budget=32, max_num_seqs=4)
    a = make_seq("a", prompt_len=4, max_new_tokens=4)
    b = make_seq("b", prompt_len=4, max_new_tokens=4)
    sched.add(a)
    sched.add(b)
    run_pass(sched)  # both fill 2 blocks each
    sched.add(make_seq("c", prompt_len=1, max_new_tokens=1))
    out, _ = run_pass(sched)
    assert out.preempted == [b]
    assert [c.seq.request_id for c in out.chunks] == ["a"]
    assert [s.request_id for s in sched.waiting] == ["b", "c"]


def test_tiny_pool_many_sequences_always_terminates():
    for block_size, num_blocks, budget, max_seqs in [
        (1, 6, 6, 3),
        (2, 5, 8, 4),
        (3, 4, 12, 6),
        (4, 3, 5, 5),
    ]:
        capacity = block_size * num_blocks
        rng = random.Random(block_size * 1000 + num_blocks)
        sched = make_scheduler(num_blocks, block_size, budget, max_seqs)
        seqs = []
        for i in range(14):
            prompt_len = rng.randint(1, capacity - 1)
            max_new = rng.randint(1, capacity - prompt_len + 1)
            # The engine only admits what fits alone (the last sample needs no KV).
            assert sched.blocks.can_fit_alone(prompt_len + max_new - 1)
            seq = make_seq(f"s{i}", prompt_len, max_new, seed=i)
            seqs.append(seq)
            sched.add(seq)
        outs = run_to_end(sched, max_passes=5_000)
        assert sched.num_preemptions > 0, "the scenario should exercise preemption"
        assert sum(len(o.preempted) for o in outs) == sched.num_preemptions
        for seq in seqs:
            assert seq.is_finished, seq.request_id
            assert seq.num_generated == seq.max_new_tokens
            assert seq.block_table == []
        assert sched.blocks.num_free == num_blocks
        assert sched.running == [] and not sched.waiting


def test_sequences_arriving_during_pressure_all_finish():
    rng = random.Random(7)
    sched = make_scheduler(num_blocks=6, block_size=2, token_budget=6, max_num_seqs=6)
    pending = [make_seq(f"s{i}", rng.randint(1, 8), rng.randint(1, 5)) for i in range(25)]
    seqs = list(pending)
    passes = 0
    while pending or sched.has_work():
        if pending and rng.random() < 0.6:
            sched.add(pending.pop(0))
        if sched.has_work():
            out, _ = run_pass(sched)
            assert out.chunks
        passes += 1
        assert passes < 5_000
    assert all(s.num_generated == s.max_new_tokens for s in seqs)
    assert sched.blocks.num_free == 6


# ----- finish ----------------------------------------------------------------------


def test_finish_running_sequence_frees_its_blocks():
    sched = make_scheduler(num_blocks=10, block_size=4, token_budget=8)
    a = make_seq("a", prompt_len=20, max_new_tokens=4)
    b = make_seq("b", prompt_len=3, max_new_tokens=4)
    sched.add(a)
    run_pass(sched)  # a mid-prompt: 8 tokens, 2 blocks
    assert len(a.block_table) == 2
    sched.add(b)
    sched.finish(a, "abort")
    assert a.status is SequenceStatus.FINISHED
    assert a.finish_reason == "abort"
    assert a.block_table == []
    assert a not in sched.running
    assert sched.blocks.num_free == 10
    out, _ = run_pass(sched)
    assert sizes(out) == [("b", 3)]


def test_finish_waiting_sequence_removes_it_from_the_queue():
    sched = make_scheduler(num_blocks=10, block_size=4, token_budget=8, max_num_seqs=1)
    a = make_seq("a", prompt_len=3, max_new_tokens=3)
    b = make_seq("b", prompt_len=3, max_new_tokens=3)
    c = make_seq("c", prompt_len=3, max_new_tokens=3)
    for seq in (a, b, c):
        sched.add(seq)
    run_pass(sched)
    assert list(sched.waiting) == [b, c]
    sched.finish(b, "abort")
    assert list(sched.waiting) == [c]
    assert b.is_finished and b.finish_reason == "abort"
    assert sched.blocks.num_free == 10 - len(a.block_table)
    run_to_end(sched)
    assert b.num_computed == 0  # never scheduled after its end
    assert a.num_generated == c.num_generated == 3
    assert sched.blocks.num_free == 10


def test_finish_preempted_sequence_while_it_waits():
    sched = make_scheduler(num_blocks=4, block_size=2, token_budget=32, max_num_seqs=4)
    a = make_seq("a", prompt_len=4, max_new_tokens=4)
    b = make_seq("b", prompt_len=4, max_new_tokens=4)
    sched.add(a)
    sched.add(b)
    run_pass(sched)
    out, _ = run_pass(sched)
    assert out.preempted == [b]
    sched.finish(b, "abort")
    assert not sched.waiting
    assert b.block_table == []
    run_to_end(sched)
    assert a.num_generated == 4
    assert b.num_generated == 1
    assert sched.blocks.num_free == 4


def test_finish_releases_blocks_for_a_waiting_sequence():
    sched = make_scheduler(num_blocks=4, block_size=4, token_budget=32, max_num_seqs=4)
    big = make_seq("big", prompt_len=13, max_new_tokens=4)
    small = make_seq("small", prompt_len=4, max_new_tokens=2)
    sched.add(big)
    run_pass(sched)  # 13 tokens: all 4 blocks
    sched.add(small)
    out, _ = run_pass(sched)
    assert sizes(out) == [("big", 1)]
    assert small.status is SequenceStatus.WAITING  # no block for it
    sched.finish(big, "abort")
    assert sched.blocks.num_free == 4
    out, _ = run_pass(sched)
    assert sizes(out) == [("small", 4)]
