"""Short prompts start beside a long prefill instead of waiting for its end.

While the waiting queue starts with prompts that fit ``short_prompt_reserve``
tokens (together), running prefills leave that many tokens of each pass to them.
The scheduler tests count tokens per pass; the engine test counts passes: a short
request arriving while a long prompt is read answers before the long one's first
token with the engine's default reserve, and after it with the reserve off.
"""

from __future__ import annotations

import random

import pytest

from mii.config import EngineConfig, GenerateParams
from mii.engine.core import EngineCore
from mii.engine.kv_cache import BlockManager
from mii.engine.prefix_hash import chain_hashes
from mii.engine.scheduler import Scheduler
from mii.engine.sequence import Sequence
from mii.errors import InvalidRequestError
from test_scheduler import make_seq, run_pass, run_to_end, sizes


def make_scheduler(reserve: int, token_budget: int = 16, max_num_seqs: int = 8) -> Scheduler:
    return Scheduler(BlockManager(256, 4), token_budget, max_num_seqs, short_prompt_reserve=reserve)


def test_a_short_prompt_starts_in_the_next_pass_beside_a_long_prefill():
    sched = make_scheduler(reserve=4)
    sched.add(make_seq("long", prompt_len=80, max_new_tokens=2))
    out, _ = run_pass(sched)
    assert sizes(out) == [("long", 16)]  # alone, the long prompt keeps the whole budget
    sched.add(make_seq("short", prompt_len=3, max_new_tokens=3))
    out, sampled = run_pass(sched)
    assert sizes(out) == [("long", 13), ("short", 3)]
    assert [s.request_id for s in sampled] == ["short"]  # its first token, this pass
    out, _ = run_pass(sched)
    assert sizes(out) == [("short", 1), ("long", 15)]  # nothing waits: no room kept


def test_without_a_reserve_the_short_prompt_waits_for_the_whole_prefill():
    sched = make_scheduler(reserve=0)
    sched.add(make_seq("long", prompt_len=80, max_new_tokens=2))
    run_pass(sched)
    short = make_seq("short", prompt_len=3, max_new_tokens=3)
    sched.add(short)
    passes = 0
    while short.num_generated == 0:
        run_pass(sched)
        passes += 1
    assert passes == 5  # the other 64 tokens of the long prompt first


def test_a_short_prompt_passes_longer_ones_that_have_not_run():
    sched = make_scheduler(reserve=4)
    sched.add(make_seq("long", prompt_len=80, max_new_tokens=2))
    run_pass(sched)
    sched.add(make_seq("medium", prompt_len=5, max_new_tokens=2))  # over the reserve
    sched.add(make_seq("short", prompt_len=2, max_new_tokens=2))
    out, _ = run_pass(sched)
    assert sizes(out) == [("long", 14), ("short", 2)]
    assert [s.request_id for s in sched.waiting] == ["medium"]  # its turn: the long one's end


def test_a_short_prompt_never_passes_a_preempted_sequence():
    # 8 blocks of 4 tokens: "a" and "b" fill them as they decode, "b" is preempted.
    sched = Scheduler(BlockManager(8, 4), 16, 8, short_prompt_reserve=8)
    sched.add(make_seq("a", prompt_len=14, max_new_tokens=10))
    sched.add(make_seq("b", prompt_len=14, max_new_tokens=10))
    while not sched.num_preemptions:
        run_pass(sched)
    assert [s.request_id for s in sched.waiting] == ["b"]
    sched.add(make_seq("short", prompt_len=2, max_new_tokens=1))
    assert sched._short_prompts_waiting(8) == []
    while True:
        out, _ = run_pass(sched)
        if "short" in [c.seq.request_id for c in out.chunks]:
            break
    assert "b" in [s.request_id for s in sched.running]  # admitted again, before "short"


def test_the_reserve_is_shared_by_the_short_prompts_at_the_head_of_the_queue():
    sched = make_scheduler(reserve=6)
    sched.add(make_seq("long", prompt_len=80, max_new_tokens=2))
    run_pass(sched)
    for name in ("a", "b", "c"):
        sched.add(make_seq(name, prompt_len=3, max_new_tokens=2))
    out, _ = run_pass(sched)
    assert sizes(out) == [("long", 10), ("a", 3), ("b", 3)]  # c's 3 more would exceed 6
    out, _ = run_pass(sched)
    assert sizes(out) == [("a", 1), ("b", 1), ("long", 11), ("c", 3)]


def test_no_room_is_kept_for_a_prompt_without_a_sequence_slot():
    sched = make_scheduler(reserve=4, max_num_seqs=2)
    sched.add(make_seq("decoder", prompt_len=2, max_new_tokens=50))
    sched.add(make_seq("long", prompt_len=80, max_new_tokens=2))
    run_pass(sched)
    sched.add(make_seq("short", prompt_len=2, max_new_tokens=2))
    out, _ = run_pass(sched)
    assert sizes(out) == [("decoder", 1), ("long", 15)]  # both slots taken: short waits


def test_a_chat_turn_whose_history_is_cached_counts_as_short():
    """A turn of a conversation whose earlier turns are in the prefix cache computes
    only its new tokens: it starts beside the long prefill (a user trial: a turn with
    3,040 of 3,050 tokens cached waited for a 6,100-token prompt's whole prefill)."""
    sched = Scheduler(BlockManager(256, 4, prefix_caching=True), 16, 8, short_prompt_reserve=6)
    history = [3 + (5 * i) % 40 for i in range(40)]
    first = Sequence("turn1", history, GenerateParams.parse(), 1, 0)
    sched.add(first)
    run_to_end(sched)  # its 10 blocks stay cached
    sched.add(make_seq("long", prompt_len=80, max_new_tokens=2))
    run_pass(sched)
    turn = Sequence("turn2", [*history, 9, 10], GenerateParams.parse(), 1, 0)
    sched.add(turn)
    out, sampled = run_pass(sched)
    # its first 40 tokens (10 blocks) cached: 2 to compute
    assert sizes(out) == [("long", 14), ("turn2", 2)]
    assert turn.num_cached_tokens == 40 and sampled == [turn]
    # Without its history cached the same turn is long: it waits.
    other = Sequence("turn3", [4, *history[1:], 9, 10], GenerateParams.parse(), 1, 0)
    sched.add(other)
    out, _ = run_pass(sched)
    assert "turn3" not in [c.seq.request_id for c in out.chunks]


def test_the_uncached_count_is_what_attaching_the_prefix_leaves():
    """BlockManager.uncached_tokens (asked of waiting sequences, attaching nothing)
    against attach_prefix: equal when within the bound, over it otherwise."""
    rng = random.Random(5)
    blocks = BlockManager(400, 4, prefix_caching=True)
    sched = Scheduler(blocks, 64, 8)
    stem = [rng.randint(3, 60) for _ in range(60)]
    for i in range(6):  # cache prefixes of several lengths
        sched.add(Sequence(f"w{i}", stem[: 8 + 9 * i], GenerateParams.parse(), 1, 0))
    run_to_end(sched)
    for i in range(200):
        cut = rng.randint(1, 60)
        prompt = stem[:cut] + [rng.randint(3, 60) for _ in range(rng.randint(0, 12))]
        seq = Sequence(f"q{i}", prompt, GenerateParams.parse(), 1, 0)
        if i % 2:  # as intake does: every full block of the prompt hashed already
            seq.block_hashes = chain_hashes(blocks.cache_salt, prompt, 4)
        bound = rng.randint(1, 40)
        told = blocks.uncached_tokens(seq, bound)
        blocks.attach_prefix(seq)
        if told <= bound:
            assert told == seq.num_uncomputed, (cut, len(prompt), bound)
        else:
            assert seq.num_uncomputed > bound
        assert seq.num_uncomputed <= len(prompt)
        blocks.free(seq)


@pytest.mark.parametrize("seed", range(4))
def test_every_request_finishes_with_short_and_long_prompts_mixed(seed):
    rng = random.Random(seed)
    sched = Scheduler(BlockManager(48, 4), 16, 6, short_prompt_reserve=rng.choice([2, 5, 8]))
    pending = [
        make_seq(f"r{i}", rng.choice([rng.randint(1, 6), rng.randint(20, 90)]), rng.randint(1, 6))
        for i in range(30)
    ]
    seqs = list(pending)
    passes = 0
    while pending or sched.has_work():
        for _ in range(rng.randint(0, 2)):
            if pending:
                sched.add(pending.pop(0))
        if sched.has_work():
            run_pass(sched)  # (its invariants: budget, order, block accounting)
        passes += 1
        assert passes < 5_000, "no end"
    run_to_end(sched)
    assert all(s.is_finished and s.num_generated == s.max_new_tokens for s in seqs)
    assert sched.blocks.num_free == sched.blocks.num_blocks


# ----- the option ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("device", "options", "reserve"),
    [
        ("cpu", {}, 256),  # a quarter of the budget
        ("cuda", {}, 1024),
        ("cuda", {"token_budget": 64}, 16),
        ("cpu", {"short_prompt_reserve": 0}, 0),
        ("cuda", {"short_prompt_reserve": 2048}, 2048),
    ],
)
def test_the_reserve_defaults_to_a_quarter_of_the_budget(device, options, reserve):
    resolved = EngineConfig.parse("m", **options).with_device_defaults(device)
    assert resolved.short_prompt_reserve == reserve


def test_a_reserve_over_half_the_budget_is_refused_naming_both():
    with pytest.raises(InvalidRequestError, match=r"short_prompt_reserve \(33\).*\(64\)"):
        EngineConfig.parse("m", token_budget=64, short_prompt_reserve=33)
    # against the device's budget when none is given
    with pytest.raises(InvalidRequestError, match=r"\(600\).*\(1024\) on cpu") as info:
        EngineConfig.parse("m", short_prompt_reserve=600).with_device_defaults("cpu")
    assert info.value.field == "short_prompt_reserve"
    for bad in (-1, True, 1.5):
        with pytest.raises(InvalidRequestError) as info:
            EngineConfig.parse("m", short_prompt_reserve=bad)
        assert info.value.field == "short_prompt_reserve"


# ----- the engine ----------------------------------------------------------------------


def passes_until_answers(llama: str, **options) -> tuple[int, int]:
    """(passes until the short request's answer, until the long one's first token),
    the short one queued after the long one's first pass."""
    core = EngineCore(EngineConfig(model=llama, device="cpu", token_budget=16, **options))
    greedy = dict(do_sample=False, ignore_eos=True)
    long = core.make_sequence("long", list(range(5, 165)), GenerateParams.parse(**greedy))
    short = core.make_sequence("short", [7, 8, 9], GenerateParams.parse(max_new_tokens=1, **greedy))
    assert core.add(long) is None
    first_piece: dict[str, int] = {}
    passes = 0
    while "long" not in first_piece:
        passes += 1
        for out in core.step():
            assert out.error is None, out.error
            first_piece.setdefault(out.request_id, passes)
        if passes == 1:
            assert core.add(short) is None
        assert passes < 100
    core.abort("long")
    return first_piece.get("short", passes + 1), first_piece["long"]


def test_a_short_request_answers_before_a_long_prompt_is_read(llama):
    short_at, long_at = passes_until_answers(llama)  # the default reserve: 4 tokens
    assert short_at <= 3 < long_at
    short_at, long_at = passes_until_answers(llama, short_prompt_reserve=0)
    assert short_at > long_at


def test_a_long_prompt_waiting_gets_the_next_free_slot_however_many_shorts_arrive():
    """Slots full, short prompts arriving every pass: the long prompt that waits keeps
    its place for the next slot (the shorts took every freed slot: it never started)."""
    sched = make_scheduler(reserve=16, token_budget=32, max_num_seqs=4)
    for i in range(4):
        sched.add(make_seq(f"s{i}", prompt_len=4, max_new_tokens=8))
    run_pass(sched)
    long = make_seq("long", prompt_len=40, max_new_tokens=2)
    sched.add(long)
    for i in range(40):
        sched.add(make_seq(f"t{i}", prompt_len=4, max_new_tokens=8))
        run_pass(sched)
        if long.num_computed:
            break
    assert long.num_computed, "the long prompt never started"
    assert i < 10


def test_a_running_prefill_progresses_beside_many_decodes_and_shorts():
    """Decodes leave 14 tokens of a 64-token pass, the reserve is 16, a short prompt
    arrives every pass: the shorts take at most half of the 14, whole (6 tokens each),
    and the long prompt the rest (it got nothing: every pass's 14 went to the shorts)."""
    sched = Scheduler(BlockManager(4096, 4), 64, 64, short_prompt_reserve=16)
    for i in range(50):
        sched.add(make_seq(f"d{i}", prompt_len=1, max_new_tokens=10_000))
    run_pass(sched)
    long = make_seq("long", prompt_len=400, max_new_tokens=2)
    sched.add(long)
    run_pass(sched)
    before = long.num_computed
    for i in range(20):
        sched.add(make_seq(f"t{i}", prompt_len=6, max_new_tokens=1))
        out, _ = run_pass(sched)
        assert sizes(out)[50:] == [("long", 8), (f"t{i}", 6)]
    assert long.num_computed == before + 20 * 8
    # A short prompt over half of what the decodes leave is not split to pass the long one.
    sched.add(make_seq("t-big", prompt_len=12, max_new_tokens=1))
    out, _ = run_pass(sched)
    assert sizes(out)[50:] == [("long", 14)]
