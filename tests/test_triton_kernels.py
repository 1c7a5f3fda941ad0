"""Triton kernels against the torch reference, on CPU under TRITON_INTERPRET=1
(set by conftest; and on the GPU when there is one)."""

from __future__ import annotations

import random

import pytest
import torch
import triton
import triton.language as tl

from helpers import ragged_paged_batch
from mii.ops.attention import (
    AttentionBatch,
    TileSet,
    make_tiles,
    rotary_paged_attention_reference,
)
from mii.ops.rotary import rotary_cos_sin
from mii.ops.triton_attention import (
    _arrival_slot,
    call_paged_attention_op,
    paged_attention_triton,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_case(shapes, hq, hkv, dim, block_size, dtype, rotary_dim, seed):
    """A ragged batch: ``shapes`` lists (tokens already cached, new tokens) per sequence."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    num_blocks = sum((c + n + block_size - 1) // block_size for c, n in shapes) + 3
    k_cache = torch.randn(num_blocks, block_size, hkv, dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block_size, hkv, dim, generator=gen).to(dtype)
    free = list(range(num_blocks))
    rng.shuffle(free)
    batch, _ = ragged_paged_batch(shapes, block_size, free)
    positions = [p for cached, new in shapes for p in range(cached, cached + new)]
    tokens = len(positions)
    q = torch.randn(tokens, hq, dim, generator=gen).to(dtype)
    k = torch.randn(tokens, hkv, dim, generator=gen).to(dtype)
    v = torch.randn(tokens, hkv, dim, generator=gen).to(dtype)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotary_dim, 2).float() / rotary_dim))
    cos_sin = rotary_cos_sin(inv_freq, 512) if rotary_dim else None
    return q, k, v, torch.tensor(positions), cos_sin, k_cache, v_cache, batch


def to_device(case):
    q, k, v, positions, cos_sin, k_cache, v_cache, batch = case
    batch = AttentionBatch(
        batch.slot_mapping.to(DEVICE),
        batch.block_tables.to(DEVICE),
        batch.cu_seqlens_q.to(DEVICE),
        batch.seq_lens.to(DEVICE),
        batch.query_lens_host,
        batch.seq_lens_host,
    )
    moved = [t.to(DEVICE) if t is not None else None for t in (q, k, v, positions, cos_sin)]
    return (*moved, k_cache.to(DEVICE), v_cache.to(DEVICE), batch)


CASES = [
    # (shapes, hq, hkv, dim, block_size, window, rotary_dim)
    ([(0, 7), (9, 1), (3, 20), (12, 1), (0, 1)], 4, 2, 16, 4, None, 16),  # GQA, mixed
    ([(0, 33), (5, 1)], 4, 4, 32, 16, None, 32),  # MHA, tile boundary at 16
    ([(0, 19), (30, 1), (2, 17)], 4, 1, 16, 8, 5, 16),  # MQA + sliding window
    ([(17, 3), (0, 5)], 2, 2, 24, 4, None, 12),  # head_dim 24 (padded), partial rotary
    ([(40, 1), (7, 9)], 8, 2, 16, 16, 16, 0),  # no rotary, window = block
    # grouped-query decode programs take 4 query heads: a group of 3 (one row of
    # each pack unused) and one of 8 (two packs per KV head)
    ([(10, 1), (0, 3), (25, 1)], 6, 2, 16, 4, None, 16),
    ([(33, 1), (4, 2), (0, 6)], 8, 1, 16, 8, 9, 16),
    # contexts past several 64-key steps: the unmasked key loop (below each tile's
    # first query) in every dtype, next to a prompt of two 128-query tiles
    ([(200, 150), (75, 40), (130, 1)], 8, 2, 16, 16, None, 16),
]


@pytest.mark.parametrize("tile", [None, 16, 64, 128])  # None: the engine's two-launch plan
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("index", range(len(CASES)))
def test_fused_rotary_cache_attention_matches_reference(index, dtype, tile):
    shapes, hq, hkv, dim, block, window, rot = CASES[index]
    case = make_case(shapes, hq, hkv, dim, block, dtype, rot, seed=index)
    ref_q, ref_k, ref_v, pos, cs, ref_kc, ref_vc, ref_batch = case
    expected = rotary_paged_attention_reference(
        ref_q.clone(), ref_k, ref_v, pos, cs, ref_kc, ref_vc, ref_batch, dim**-0.5, window
    )
    q, k, v, pos_d, cs_d, kc, vc, batch = to_device(
        make_case(shapes, hq, hkv, dim, block, dtype, rot, index)
    )
    if tile is not None:  # force one tile size for the whole batch
        seqs, starts = make_tiles(batch.query_lens_host, tile)
        batch.tiles = [
            TileSet(
                tile,
                torch.tensor(seqs, dtype=torch.int32, device=DEVICE),
                torch.tensor(starts, dtype=torch.int32, device=DEVICE),
            )
        ]
    out = paged_attention_triton(q, k, v, pos_d, cs_d, kc, vc, batch, dim**-0.5, window)
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float().cpu(), expected.float(), rtol=tol, atol=tol)
    # the caches hold the same (rotated) keys and values afterwards
    torch.testing.assert_close(kc.float().cpu(), ref_kc.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(vc.float().cpu(), ref_vc.float(), rtol=0, atol=0)


OPERATOR_CASES = [
    CASES[0],
    # a prompt chunk longer than one 128-query tile, next to decodes
    ([(10, 150), (70, 1), (0, 3)], 4, 2, 16, 8, None, 16),
]


@pytest.mark.parametrize("index", range(len(OPERATOR_CASES)))
def test_the_custom_operator_runs_every_tile_of_the_plan(index):
    """The path the engine takes on CUDA: tiles cross into the operator as tensors
    by size, so a prompt tile of the plan's size must not be dropped on the way."""
    shapes, hq, hkv, dim, block, window, rot = OPERATOR_CASES[index]
    ref_q, ref_k, ref_v, pos, cs, ref_kc, ref_vc, ref_batch = make_case(
        shapes, hq, hkv, dim, block, torch.float32, rot, seed=index
    )
    expected = rotary_paged_attention_reference(
        ref_q.clone(), ref_k, ref_v, pos, cs, ref_kc, ref_vc, ref_batch, dim**-0.5, window
    )
    q, k, v, pos_d, cs_d, kc, vc, batch = to_device(
        make_case(shapes, hq, hkv, dim, block, torch.float32, rot, index)
    )
    out = call_paged_attention_op(q, k, v, pos_d, cs_d, kc, vc, batch, dim**-0.5, window)
    torch.testing.assert_close(out.cpu(), expected, rtol=2e-5, atol=2e-5)


SPLIT_CASES = [
    # long contexts (several 64-key iterations per split) next to short ones
    ([(300, 1), (150, 1), (0, 20), (5, 1)], 4, 2, 16, 16, None, 16),
    ([(260, 1), (70, 3)], 4, 1, 16, 8, 100, 16),  # with a sliding window
    ([(290, 1), (40, 1)], 6, 2, 16, 16, None, 16),  # groups of 3 in packs of 4
    *CASES[:1],  # contexts shorter than one iteration: most splits are empty
]


@pytest.mark.parametrize("min_keys", [1, 128])  # 128: the short contexts write directly
@pytest.mark.parametrize("splits", [2, 3, 5])
@pytest.mark.parametrize("index", range(len(SPLIT_CASES)))
def test_split_kv_matches_reference(index, splits, min_keys):
    """Split-KV (flash decoding) partials merged back give the same attention,
    with windows and with more splits than a short context has key blocks; with a
    minimum of keys per split, short contexts in one program next to split long ones."""
    _assert_split_attention_matches(SPLIT_CASES[index], index, splits, min_keys)


@pytest.mark.parametrize("window", [None, 3000])
def test_split_kv_past_the_merge_width(window):
    """More slices than MAX_KV_SPLITS (explicit, as decode_sweep asks), the 33rd with
    keys (4,200 keys, 128 a slice; under the window fewer slices, the rest empty):
    the merge loads them in a wider tile (64 slices) and still gives the reference."""
    from mii.ops.triton_attention import MAX_KV_SPLITS

    case = ([(4199, 1), (20, 2)], 2, 2, 16, 16, window, 0)  # no rotary: 512 positions
    _assert_split_attention_matches(case, 5, MAX_KV_SPLITS + 1, min_keys=1)


@pytest.mark.parametrize("merge", ["kernel", "launch"])
@pytest.mark.parametrize("index", range(len(SPLIT_CASES)))
def test_split_kv_merged_in_the_launch_or_after_it(index, merge, monkeypatch):
    """The slices are merged by the last of each tile's programs to finish
    (``MII_SPLIT_KV_MERGE=kernel``: arrival counts) or by a merge launch after the
    attention (the default); each twice in a row, as graph replays run it, which
    holds only if every count was reset."""
    from mii.ops import triton_arrivals

    monkeypatch.setenv("MII_SPLIT_KV_MERGE", merge)
    for seed in range(2):
        _assert_split_attention_matches(SPLIT_CASES[index], seed, 3, min_keys=1)
    device = torch.empty(0, device=DEVICE).device
    if merge == "kernel":
        assert int(triton_arrivals._counts[device].count_nonzero()) == 0


@triton.jit
def _store_arrival_slots(Out):
    pid = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * tl.num_programs(2)
    tl.store(Out + pid + tl.program_id(2), _arrival_slot())


@pytest.mark.parametrize("grid", [(32, 2, 9), (8, 3, 32), (5, 4, 3)])
def test_arrival_slots_are_one_per_result(grid):
    """The interpreter runs a tile's slices one after another, so a slot shared by two
    results would still merge right here: the slots are checked directly. The
    programs of one (program_id(0), program_id(1)) share one, in [0, grid0 x grid1),
    and no two results share one."""
    out = torch.full(grid, -1, dtype=torch.int32, device=DEVICE)
    _store_arrival_slots[grid](out)
    slots = out.cpu()
    assert (slots == slots[:, :, :1]).all()  # every slice of a result: its slot
    firsts = slots[:, :, 0].flatten()
    assert sorted(firsts.tolist()) == list(range(grid[0] * grid[1]))


def _assert_split_attention_matches(case, seed, splits, min_keys):
    """Rotary + cache write, then attention from the cache with ``splits`` (fp32),
    against the reference."""
    from mii.ops.triton_attention import paged_attention_from_cache, rotary_cache_write

    shapes, hq, hkv, dim, block, window, rot = case
    ref_q, ref_k, ref_v, pos, cs, ref_kc, ref_vc, ref_batch = make_case(
        shapes, hq, hkv, dim, block, torch.float32, rot, seed=seed
    )
    expected = rotary_paged_attention_reference(
        ref_q.clone(), ref_k, ref_v, pos, cs, ref_kc, ref_vc, ref_batch, dim**-0.5, window
    )
    q, k, v, pos_d, cs_d, kc, vc, batch = to_device(
        make_case(shapes, hq, hkv, dim, block, torch.float32, rot, seed)
    )
    rotary_cache_write(q, k, v, pos_d, cs_d, kc, vc, batch.slot_mapping)
    out = paged_attention_from_cache(
        q, kc, vc, batch, dim**-0.5, window, splits=splits, split_min_keys=min_keys
    )
    torch.testing.assert_close(out.cpu(), expected, rtol=2e-5, atol=2e-5)


# More query than KV heads; the layouts below change decode programs only (tiles of
# up to 16 queries: prompt tiles have a launch of their own), so the prompts of more
# than 16 tokens, the interpreter's slowest part, are left out.
GQA_CASES = [
    ([(cached, new) for cached, new in case[0] if new <= 16], *case[1:])
    for case in CASES
    if case[1] > case[2]
]
DECODE_LAYOUTS = {  # name: (query heads per program, head-major, MII_GQA_DECODE_QUERIES)
    "pack4": (4, True, "tile"),
    "pack2": (2, True, "tile"),
    "head_major": (1, True, "tile"),
    "tile_major": (1, False, "tile"),
    # 16 rows a pass: 4 (8) queries of a tile at a time, several passes for more
    "pack4_fill": (4, True, "pack"),
    "pack2_fill": (2, True, "pack"),
}


@pytest.mark.parametrize("splits", [1, 3])
@pytest.mark.parametrize("layout", sorted(DECODE_LAYOUTS))
@pytest.mark.parametrize("index", range(len(GQA_CASES)))
def test_grouped_query_decode_layouts(index, layout, splits, monkeypatch):
    """Every layout of grouped-query decode programs gives the reference: packs of
    4 or 2 query heads per program, or one head per program launched head-major or
    tile-major; packs whose rows hold the whole 16-query tile or 16 rows a pass (the
    cases' tiles of 2-9 queries take several passes); with and without split-KV."""
    from mii.ops import triton_attention

    pack, head_major, queries = DECODE_LAYOUTS[layout]
    monkeypatch.setenv("MII_GQA_DECODE_QUERIES", queries)
    monkeypatch.setattr(triton_attention, "GQA_DECODE_PACK", pack)
    monkeypatch.setattr(triton_attention, "HEAD_MAJOR_DECODE", head_major)
    _assert_split_attention_matches(GQA_CASES[index], index, splits, min_keys=1)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton compiles only on CUDA")
def test_attention_compiles_once_whatever_the_batch(monkeypatch):
    """Token counts, split counts and block-table widths change every pass: none of
    them may make Triton compile a new variant (W1 stalled 0.7 s per compile)."""
    import triton

    from mii.ops.triton_attention import paged_attention_from_cache, rotary_cache_write

    compiled: list[str] = []
    monkeypatch.setattr(
        triton.knobs.runtime, "jit_post_compile_hook", lambda **kw: compiled.append(kw["repr"])
    )

    def attend(shapes, splits):
        q, k, v, pos, cs, kc, vc, batch = to_device(
            make_case(shapes, 4, 2, 16, 16, torch.bfloat16, 16, seed=len(shapes))
        )
        rotary_cache_write(q, k, v, pos, cs, kc, vc, batch.slot_mapping)
        paged_attention_from_cache(q, kc, vc, batch, 0.25, None, splits=splits, split_min_keys=32)

    attend([(300, 1), (150, 1), (0, 20), (5, 1)], splits=2)  # decode and prompt tiles
    assert compiled, "the hook saw no compile: it no longer reports them"
    compiled.clear()
    for shapes, splits in [
        ([(300, 1)], 3),  # one token
        ([(290, 1)] * 16, 5),  # 16 tokens, 16 sequences
        ([(450, 1), (0, 31), (64, 17)], 2),  # 49 tokens, a wider block table
        ([(0, 500)] * 3 + [(33, 1)] * 3 + [(0, 291)], 7),  # 1794 tokens (positions < 512)
        ([(400, 1)] * 2, 16),  # 16 splits: a multiple of 16, as automatic splitting picks
    ]:
        attend(shapes, splits)
    assert compiled == []


# Mixed passes with decode tiles and prompt tiles: the small CASES and one large
# enough (64 decodes of 2,000 keys beside two 512-token prompts, Llama-3's heads)
# that a decode launch still running when the call returns would be caught.
OVERLAP_CASES = [
    CASES[0],
    CASES[7],
    ([(2000, 1)] * 64 + [(0, 512), (300, 512)], 32, 8, 128, 16, None, 0),
]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="a second CUDA stream")
@pytest.mark.parametrize("overlap", ["streams", "priority"])
@pytest.mark.parametrize("index", range(len(OVERLAP_CASES)))
def test_mixed_pass_decode_tiles_on_a_second_stream(index, overlap, monkeypatch):
    """MII_ATTENTION_OVERLAP runs a mixed pass's decode tiles on a second stream:
    the same kernels on the same inputs, so the same bits as one after the other,
    read on the caller's stream right after the call returns."""
    from mii.ops.triton_attention import paged_attention_from_cache

    shapes, hq, hkv, dim, block, window, rot = OVERLAP_CASES[index]
    q, _, _, _, _, kc, vc, batch = to_device(
        make_case(shapes, hq, hkv, dim, block, torch.bfloat16, rot, seed=index)
    )
    outputs = {}
    for choice in ("off", overlap, "off"):
        monkeypatch.setenv("MII_ATTENTION_OVERLAP", choice)
        out = paged_attention_from_cache(q, kc, vc, batch, dim**-0.5, window)
        outputs.setdefault(choice, []).append(out.clone())  # on the caller's stream
    assert torch.equal(outputs["off"][0], outputs["off"][1])  # deterministic to begin with
    assert torch.equal(outputs[overlap][0], outputs["off"][0])
