"""Prefix caching's host time (issue 17): a prompt's block hashes are computed at
intake, generated blocks are registered when their sequence ends, a prompt block
completed by a one-token chunk is registered as its sequence grows. Each test
pins an invariant that change relies on."""

from __future__ import annotations

import hashlib
import random
import struct

from mii.config import GenerateParams
from mii.engine.intake import RequestIntake
from mii.engine.kv_cache import BlockManager
from mii.engine.prefix_hash import block_hash, chain_hashes
from mii.engine.scheduler import Scheduler
from mii.engine.sequence import PENDING_TOKEN, Sequence, SequenceStatus

BLOCK = 4
SALT = b"engine salt"


def make_seq(name: str, prompt: list[int], max_new_tokens: int = 3) -> Sequence:
    return Sequence(name, list(prompt), GenerateParams.parse(), max_new_tokens, 0)


def run_step(sched: Scheduler, token: int = 7) -> list[Sequence]:
    out = sched.schedule()
    for seq in sched.commit(out):
        seq.token_ids.append(token)
        if seq.num_generated >= seq.max_new_tokens:
            sched.finish(seq, "length")
    sched.blocks.check_invariants([*sched.running, *sched.waiting])
    return [c.seq for c in out.chunks]


def test_chain_hashes_equal_block_by_block_hashes_and_the_documented_encoding():
    rng = random.Random(3)
    tokens = [rng.randrange(0, 2**31 - 1) for _ in range(16 * 5 + 7)]
    chained = chain_hashes(SALT, tokens, 16)
    parent, expected = SALT, []
    for start in range(0, 16 * 5, 16):
        block = tokens[start : start + 16]
        # BLAKE2b-128 of the parent's hash and the ids as 32-bit native integers
        raw = hashlib.blake2b(parent + struct.pack(f"={len(block)}i", *block), digest_size=16)
        assert block_hash(parent, block) == raw.digest()
        parent = raw.digest()
        expected.append(parent)
    assert chained == expected  # the partial last block is not hashed
    assert chain_hashes(SALT, tokens[:15], 16) == []


def test_hashes_from_intake_equal_those_the_block_manager_computes(tokenizer):
    """A request taken in carries its prompt's hashes; they must be the ones the
    block manager computes itself for a sequence built without them (and those a
    finished sequence registers), or cached prefixes would never be found."""
    blocks = BlockManager(64, BLOCK, prefix_caching=True, cache_salt=SALT)
    intake = RequestIntake(tokenizer, 1000, 64, blocks)
    prompt = list(range(10, 33))  # 23 tokens: 5 full blocks + 3
    taken = intake.make_sequence("a", prompt, GenerateParams.parse(max_new_tokens=4))
    assert len(taken.block_hashes) == 5
    built = make_seq("b", prompt)
    assert blocks.next_block_hash(built) == taken.block_hashes[0]
    blocks._hash_upto(built, 5)
    assert built.block_hashes == taken.block_hashes
    # Intake's hashes find what a sequence without them registered, and back.
    sched = Scheduler(blocks, 64, 4)
    sched.add(built)
    while sched.has_work():
        run_step(sched)
    again = intake.make_sequence("c", prompt, GenerateParams.parse(max_new_tokens=4))
    assert blocks.attach_prefix(again) == 20
    blocks.free(again)
    # Without prefix caching nothing is hashed at intake.
    plain = BlockManager(64, BLOCK)
    off = RequestIntake(tokenizer, 1000, 64, plain).make_sequence("d", prompt, GenerateParams())
    assert off.block_hashes == []


def test_generated_blocks_are_found_once_their_sequence_ends():
    """Generated blocks are hashed and registered when their sequence ends (not at
    each decode step): the next chat turn, which resends prompt and answer, finds
    every computed full block of both."""
    sched = Scheduler(BlockManager(32, BLOCK, prefix_caching=True, cache_salt=SALT), 64, 4)
    first = make_seq("turn1", range(10, 16), max_new_tokens=9)  # 6 + 9 tokens
    sched.add(first)
    while sched.has_work():
        run_step(sched, token=first.num_tokens)  # distinct generated ids
    assert first.num_computed == 14  # its last token was sampled, never computed
    turn2 = make_seq("turn2", [*first.token_ids, 90, 91, 92])
    sched.add(turn2)
    run_step(sched)
    assert turn2.num_cached_tokens == 12  # the 3 full blocks of its 14 computed tokens


def test_a_prompt_block_completed_by_a_one_token_chunk_is_found_while_its_sequence_runs():
    """A prompt whose last chunk is one token (scheduled as a decode) completes a
    block that commit does not look at; it is registered when the sequence next
    grows, before admission in that pass, so a longer prompt that extends it
    stops waiting for it then, not when the first sequence ends."""
    sched = Scheduler(BlockManager(32, BLOCK, prefix_caching=True, cache_salt=SALT), 7, 4)
    first = make_seq("a", range(10, 18), max_new_tokens=20)  # 8 tokens: 2 full blocks
    longer = make_seq("b", [*range(10, 18), 50, 51, 52, 53, 54])
    sched.add(first)
    run_step(sched)  # a: 7 tokens (block 0 registered; block 1 is a's frontier)
    sched.add(longer)
    assert longer not in run_step(sched)  # a: its 8th token; b waits for block 1
    scheduled = run_step(sched)  # a grows into block 2, registering block 1
    assert longer in scheduled and first.num_generated < first.max_new_tokens
    assert longer.num_cached_tokens == 8


def _random_traffic(seed: int) -> tuple[int, int]:
    """Shared-prefix requests through a small pool with async scheduling's pending
    tokens, preemption, eviction, aborts and prompt-logprobs requests, some hashed
    at intake and some not. A fake KV store records the token each pass writes at
    each slot; every token a scheduled sequence counts as computed (its own or an
    attached prefix's) must be the one stored in its block."""
    rng = random.Random(seed)
    blocks = BlockManager(rng.randint(8, 14), BLOCK, prefix_caching=True, cache_salt=SALT)
    sched = Scheduler(blocks, rng.randint(4, 12), rng.randint(2, 5))
    prefixes = [[rng.randrange(3, 40) for _ in range(rng.randint(3, 14))] for _ in range(3)]
    arriving = []
    for i in range(80):
        prompt = rng.choice(prefixes) + [rng.randrange(3, 40) for _ in range(rng.randint(0, 6))]
        extra = {"prompt_logprobs": 0} if rng.random() < 0.05 else {}
        seq = Sequence(f"r{i}", prompt, GenerateParams.parse(**extra), rng.randint(1, 7), 0)
        if rng.random() < 0.7:
            blocks.hash_prompt(seq)  # as RequestIntake does
        arriving.append(seq)
    stored: dict[tuple[int, int], int] = {}  # (block, slot) -> token id written there
    pending: list[tuple[Sequence, int]] = []  # tokens of the pass in flight
    checked = 0
    for _ in range(3000):
        if not (arriving or sched.has_work() or pending):
            break
        while arriving and rng.random() < 0.4:
            sched.add(arriving.pop())
        if sched.running and rng.random() < 0.04:
            sched.finish(rng.choice(sched.running), "abort")
        out = sched.schedule()
        for chunk in out.chunks:
            seq = chunk.seq
            for pos in range(seq.num_computed):
                token = stored.get((seq.block_table[pos // BLOCK], pos % BLOCK))
                assert PENDING_TOKEN in (token, seq.token_ids[pos]) or token == seq.token_ids[pos]
                checked += 1
            for pos in range(seq.num_computed, seq.num_computed + chunk.num_tokens):
                stored[seq.block_table[pos // BLOCK], pos % BLOCK] = seq.token_ids[pos]
        sampled = sched.commit(out)
        for seq, slot in pending:  # the previous pass's tokens arrive
            seq.token_ids[slot] = token = rng.randrange(3, 40)
            if slot == seq.num_tokens - 1:
                seq.pending_row = None
            if seq.status is not SequenceStatus.FINISHED and seq.num_computed > slot:
                stored[seq.block_table[slot // BLOCK], slot % BLOCK] = token
        for seq, _ in pending:
            ended = seq.pending_row is None and seq.num_generated >= seq.max_new_tokens
            if ended and seq.status is not SequenceStatus.FINISHED:
                sched.finish(seq, "length")
        pending = []
        for seq in sampled:
            if seq.status is not SequenceStatus.FINISHED:
                pending.append((seq, seq.num_tokens))
                seq.token_ids.append(PENDING_TOKEN)
                seq.pending_row = 0
        blocks.check_invariants([*sched.running, *sched.waiting])
    assert not (arriving or sched.has_work()) and blocks.num_free == blocks.num_blocks
    return checked, blocks.hit_tokens


def test_every_cached_block_holds_the_tokens_it_stands_for():
    checked = hits = 0
    for seed in range(40):
        seed_checked, seed_hits = _random_traffic(seed)
        checked, hits = checked + seed_checked, hits + seed_hits
    assert checked > 100_000 and hits > 15_000
