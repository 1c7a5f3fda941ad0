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
from mii.engine.sequence import Sequence

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
