"""BlockManager: the pool of KV blocks, its free list and per-sequence block tables."""

from __future__ import annotations

import pytest

from mii.config import GenerateParams
from mii.engine.kv_cache import BlockManager, blocks_for
from mii.engine.sequence import Sequence


def make_seq(prompt_len: int = 4, name: str = "r") -> Sequence:
    params = GenerateParams.parse(max_new_tokens=8)
    return Sequence(name, list(range(prompt_len)), params, max_new_tokens=8, seed=0)


def advance(bm: BlockManager, seq: Sequence, num_tokens: int) -> None:
    """Reserve room for ``num_tokens`` more tokens and mark them computed, as a pass would."""
    bm.allocate(seq, num_tokens)
    seq.num_computed += num_tokens


@pytest.mark.parametrize(
    ("tokens", "block_size", "expected"),
    [(0, 4, 0), (1, 4, 1), (4, 4, 1), (5, 4, 2), (8, 4, 2), (9, 4, 3), (7, 1, 7), (3, 16, 1)],
)
def test_blocks_for_rounds_up(tokens, block_size, expected):
    assert blocks_for(tokens, block_size) == expected


def test_empty_pool_is_rejected():
    with pytest.raises(ValueError):
        BlockManager(0, 4)


def test_fresh_pool_is_all_free():
    bm = BlockManager(num_blocks=6, block_size=4)
    assert bm.num_free == 6
    assert bm.usage == 0.0


def test_blocks_needed_counts_only_missing_blocks():
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq()
    assert bm.blocks_needed(seq, 0) == 0
    assert bm.blocks_needed(seq, 1) == 1
    assert bm.blocks_needed(seq, 4) == 1
    assert bm.blocks_needed(seq, 5) == 2
    advance(bm, seq, 3)  # one block, 3 of its 4 slots used
    assert len(seq.block_table) == 1
    assert bm.blocks_needed(seq, 1) == 0  # the slack in the last block is enough
    assert bm.blocks_needed(seq, 2) == 1
    assert bm.blocks_needed(seq, 5) == 1
    assert bm.blocks_needed(seq, 6) == 2


def test_allocate_hands_out_distinct_blocks_and_updates_usage():
    bm = BlockManager(num_blocks=8, block_size=4)
    a, b = make_seq(name="a"), make_seq(name="b")
    bm.allocate(a, 9)  # 3 blocks
    assert len(a.block_table) == 3
    assert bm.num_free == 5
    assert bm.usage == pytest.approx(3 / 8)
    bm.allocate(b, 16)  # 4 blocks
    assert len(b.block_table) == 4
    assert bm.num_free == 1
    assert bm.usage == pytest.approx(7 / 8)
    used = a.block_table + b.block_table
    assert len(set(used)) == len(used), "a block was given to two sequences"
    assert all(0 <= block < 8 for block in used)


def test_allocate_zero_tokens_is_a_no_op():
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = make_seq()
    bm.allocate(seq, 0)
    assert seq.block_table == []
    assert bm.num_free == 4


def test_free_returns_every_block_to_the_pool():
    bm = BlockManager(num_blocks=5, block_size=2)
    a, b = make_seq(name="a"), make_seq(name="b")
    advance(bm, a, 5)  # 3 blocks
    advance(bm, b, 4)  # 2 blocks
    assert bm.num_free == 0
    assert bm.usage == 1.0
    a_blocks = list(a.block_table)
    bm.free(a)
    assert a.block_table == []
    assert bm.num_free == 3
    assert bm.usage == pytest.approx(2 / 5)
    # The freed blocks can be handed out again, and only those (b still holds its own).
    c = make_seq(name="c")
    bm.allocate(c, 6)
    assert sorted(c.block_table) == sorted(a_blocks)
    assert not set(c.block_table) & set(b.block_table)
    bm.free(b)
    bm.free(c)
    assert bm.num_free == 5
    assert bm.usage == 0.0


def test_free_twice_does_not_duplicate_blocks():
    bm = BlockManager(num_blocks=3, block_size=2)
    seq = make_seq()
    bm.allocate(seq, 4)
    bm.free(seq)
    bm.free(seq)
    assert bm.num_free == 3


def test_block_table_grows_append_only():
    bm = BlockManager(num_blocks=10, block_size=3)
    seq = make_seq()
    other = make_seq(name="other")
    history = []
    for step, n in enumerate([2, 1, 4, 1, 1, 5, 3]):
        if step % 2:
            advance(bm, other, 1)  # interleave another sequence's growth
        before = list(seq.block_table)
        advance(bm, seq, n)
        assert seq.block_table[: len(before)] == before, "existing blocks moved"
        assert len(seq.block_table) == blocks_for(seq.num_computed, 3)
        history.append(len(seq.block_table))
    assert history == sorted(history)
    assert not set(seq.block_table) & set(other.block_table)


def test_allocation_beyond_free_blocks_raises_and_changes_nothing():
    bm = BlockManager(num_blocks=4, block_size=4)
    a, b = make_seq(name="a"), make_seq(name="b")
    bm.allocate(a, 12)  # 3 blocks, 1 left
    table = list(b.block_table)
    with pytest.raises(RuntimeError):
        bm.allocate(b, 5)  # needs 2
    assert b.block_table == table
    assert bm.num_free == 1
    bm.allocate(b, 4)  # exactly the one left still works
    assert bm.num_free == 0
    with pytest.raises(RuntimeError):
        bm.allocate(b, 5)  # 1 block held; 5 tokens need 2
    assert len(b.block_table) == 1


def test_tokens_that_fit_counts_free_blocks_and_slack():
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = make_seq()
    assert bm.tokens_that_fit(seq, 100) == 16
    assert bm.tokens_that_fit(seq, 7) == 7
    assert bm.tokens_that_fit(seq, 0) == 0
    advance(bm, seq, 5)  # 2 blocks, 3 free slots in the second
    assert bm.tokens_that_fit(seq, 100) == 3 + 2 * 4
    other = make_seq(name="other")
    advance(bm, other, 8)  # takes the last 2 blocks
    assert bm.num_free == 0
    assert bm.tokens_that_fit(seq, 100) == 3  # only the slack is left
    assert bm.tokens_that_fit(seq, 2) == 2
    assert bm.tokens_that_fit(other, 100) == 0  # its blocks are full
    fresh = make_seq(name="fresh")
    assert bm.tokens_that_fit(fresh, 1) == 0


def test_tokens_that_fit_can_always_be_allocated():
    bm = BlockManager(num_blocks=5, block_size=3)
    seqs = [make_seq(name=str(i)) for i in range(3)]
    for round_ in range(6):
        for i, seq in enumerate(seqs):
            wanted = 1 + (round_ * 3 + i) % 5
            fits = bm.tokens_that_fit(seq, wanted)
            assert 0 <= fits <= wanted
            bm.allocate(seq, fits)  # never raises
            seq.num_computed += fits
            assert len(seq.block_table) * 3 >= seq.num_computed
    held = sum(len(s.block_table) for s in seqs)
    assert held + bm.num_free == 5


@pytest.mark.parametrize(("num_blocks", "block_size"), [(1, 1), (3, 4), (10, 16)])
def test_can_fit_alone(num_blocks, block_size):
    bm = BlockManager(num_blocks, block_size)
    capacity = num_blocks * block_size
    assert bm.can_fit_alone(1)
    assert bm.can_fit_alone(capacity)
    assert not bm.can_fit_alone(capacity + 1)


def test_pool_never_outgrows_the_kernels_int32_offsets():
    """The attention kernels address one layer's cache with int32 offsets: a pool
    sized from memory stops at 2**31 values per layer (a 1B model's fp8 cache on a
    large GPU would pass it), and asking for more names the option and its limit."""
    import torch

    from mii.engine.kv_cache import choose_num_blocks, max_blocks_addressable
    from mii.errors import InvalidRequestError
    from mii.models.base import KVCacheSpec

    spec = KVCacheSpec(num_layers=16, num_kv_heads=8, head_dim=64)
    most = max_blocks_addressable(spec, 16)
    assert most == 262_143 and most * 16 * 8 * 64 < 2**31 <= (most + 1) * 16 * 8 * 64
    sized = dict(memory_fraction=0.9, max_length=1 << 20, max_num_seqs=1 << 20)
    plenty = choose_num_blocks(
        spec,
        16,
        torch.float8_e4m3fn,
        torch.device("cpu"),
        requested=None,
        cpu_bytes=1 << 40,
        **sized,
    )
    assert plenty == most
    assert (
        choose_num_blocks(
            spec, 16, torch.bfloat16, torch.device("cpu"), requested=most, cpu_bytes=0, **sized
        )
        == most
    )
    # an engine option's error, naming it (it was a plain ValueError)
    refused = f"num_kv_blocks={most + 1}.*at most {most}"
    with pytest.raises(InvalidRequestError, match=refused) as e:
        choose_num_blocks(
            spec, 16, torch.bfloat16, torch.device("cpu"), requested=most + 1, cpu_bytes=0, **sized
        )
    assert e.value.field == "num_kv_blocks"
