"""Triton kernels for paged attention over a ragged batch.

Same contract as ``ops.attention.paged_attention_reference`` (which they are
tested against, on CPU under ``TRITON_INTERPRET=1``):

1. ``_rotary_cache_write_kernel``: one program per token rotates q in place and
   k (GPT-NeoX layout, full or partial rotary) and writes the rotated k and v
   into their cache slots — the KV write fused with rotary embedding.
2. ``_paged_attention_kernel``: one program per (tile of up to BLOCK_M query
   tokens of one sequence, query head). It streams the sequence's keys and
   values through its block table with an online softmax (flash attention),
   causal within the chunk and over all earlier blocks, and honours a sliding
   window. Prompt chunks and single decode tokens share one launch. GQA/MQA
   read the KV head of the query head's group; nothing is repeated in memory.

The host builds a small tile table (sequence, first query of the tile) so that
the ragged batch maps onto a dense grid.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from mii import envs
from mii.ops import triton_arrivals, triton_limits, triton_pdl
from mii.ops.attention import (
    FP8_KV_DTYPE,
    LARGE_TILE,
    SMALL_TILE,
    AttentionBatch,
    TileSet,
    tile_sets,
)
from mii.ops.dispatch import INTERPRETED

# Largest finite float8_e4m3fn: fp8 KV caches store values clamped to it (scale 1,
# as vLLM's uncalibrated fp8 cache), so an outlier saturates instead of overflowing.
FP8_MAX = tl.constexpr(448.0)
INTERPRET_FP8 = tl.constexpr(INTERPRETED)


@triton.jit
def _to_cache(x, dtype: tl.constexpr, CLAMP: tl.constexpr):
    if CLAMP:
        x = x.to(tl.float32)
        x = tl.minimum(tl.maximum(x, -FP8_MAX), FP8_MAX)
        if INTERPRET_FP8:
            # The CPU interpreter loses the carry when rounding up to fp8 (1.98 -> 1.0):
            # round to e4m3's precision here, so that its conversion is exact.
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & 0xFFF00000  # 3 mantissa bits
            # below 2^-6 (subnormal): steps of 2^-9, ties to even, sign kept (-0.0 too)
            steps = tl.abs(x) * 512.0
            r = tl.floor(steps + 0.5)
            r = tl.where((r - steps == 0.5) & (r - 2.0 * tl.floor(r * 0.5) == 1.0), r - 1.0, r)
            subnormal = tl.where(x < 0, -r, r) / 512.0
            x = tl.where(tl.abs(x) < 0.015625, subnormal, bits.to(tl.float32, bitcast=True))
    return x.to(dtype)


@triton.jit
def _rotary_cache_write_kernel(
    Q,
    K,
    V,
    positions,
    cos_sin,
    K_cache,
    V_cache,
    slots,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cache_slot,
    stride_cache_h,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    ROT_HALF: tl.constexpr,
    H_PAD: tl.constexpr,
    HALF_PAD: tl.constexpr,
    D_PAD: tl.constexpr,
    HAS_ROTARY: tl.constexpr,
    CLAMP: tl.constexpr,
    PDL: tl.constexpr,
):
    # Nothing before the wait, not even the step's positions: the rotary rows may be
    # the previous kernel's output (length-dependent rope scalings compute them with
    # torch right before this launch), and only the wait makes its writes visible.
    triton_pdl.wait_for_predecessor(PDL)
    t = tl.program_id(0)
    pos = tl.load(positions + t)
    slot = tl.load(slots + t)
    heads = tl.arange(0, H_PAD)
    dims = tl.arange(0, D_PAD)
    if HAS_ROTARY:
        half = tl.arange(0, HALF_PAD)
        half_mask = half < ROT_HALF
        cos = tl.load(cos_sin + pos * 2 * ROT_HALF + half, mask=half_mask, other=1.0)
        sin = tl.load(cos_sin + pos * 2 * ROT_HALF + ROT_HALF + half, mask=half_mask, other=0.0)
        # q, rotated in place: [H, half] pairs (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)
        qm = (heads[:, None] < NUM_Q_HEADS) & half_mask[None, :]
        q1p = Q + t * stride_qt + heads[:, None] * stride_qh + half[None, :]
        q1 = tl.load(q1p, mask=qm, other=0.0).to(tl.float32)
        q2 = tl.load(q1p + ROT_HALF, mask=qm, other=0.0).to(tl.float32)
        tl.store(q1p, (q1 * cos[None, :] - q2 * sin[None, :]).to(Q.dtype.element_ty), mask=qm)
        tl.store(
            q1p + ROT_HALF, (q2 * cos[None, :] + q1 * sin[None, :]).to(Q.dtype.element_ty), mask=qm
        )
        km = (heads[:, None] < NUM_KV_HEADS) & half_mask[None, :]
        k1p = K + t * stride_kt + heads[:, None] * stride_kh + half[None, :]
        k1 = tl.load(k1p, mask=km, other=0.0).to(tl.float32)
        k2 = tl.load(k1p + ROT_HALF, mask=km, other=0.0).to(tl.float32)
        c1p = K_cache + slot * stride_cache_slot + heads[:, None] * stride_cache_h + half[None, :]
        tl.store(
            c1p,
            _to_cache(k1 * cos[None, :] - k2 * sin[None, :], K_cache.dtype.element_ty, CLAMP),
            mask=km,
        )
        tl.store(
            c1p + ROT_HALF,
            _to_cache(k2 * cos[None, :] + k1 * sin[None, :], K_cache.dtype.element_ty, CLAMP),
            mask=km,
        )
        # channels past the rotary part are copied unchanged
        rest = (
            (heads[:, None] < NUM_KV_HEADS)
            & (dims[None, :] >= 2 * ROT_HALF)
            & (dims[None, :] < HEAD_DIM)
        )
    else:
        rest = (heads[:, None] < NUM_KV_HEADS) & (dims[None, :] < HEAD_DIM)
    k_rest = tl.load(K + t * stride_kt + heads[:, None] * stride_kh + dims[None, :], mask=rest)
    tl.store(
        K_cache + slot * stride_cache_slot + heads[:, None] * stride_cache_h + dims[None, :],
        _to_cache(k_rest, K_cache.dtype.element_ty, CLAMP),
        mask=rest,
    )
    vm = (heads[:, None] < NUM_KV_HEADS) & (dims[None, :] < HEAD_DIM)
    v = tl.load(V + t * stride_vt + heads[:, None] * stride_vh + dims[None, :], mask=vm)
    tl.store(
        V_cache + slot * stride_cache_slot + heads[:, None] * stride_cache_h + dims[None, :],
        _to_cache(v, V_cache.dtype.element_ty, CLAMP),
        mask=vm,
    )


@triton.jit
def _splits_used(keys, splits, SPLIT_MIN_KEYS: tl.constexpr):
    """How many of the ``splits`` programs of a tile share its ``keys``: each takes
    at least SPLIT_MIN_KEYS, so a short context stays in one program, which then
    writes the output itself (no partials, nothing to merge)."""
    return tl.minimum(splits, tl.maximum(1, tl.cdiv(keys, SPLIT_MIN_KEYS)))


@triton.jit
def _key_range(
    seq_len,
    context,
    first,
    window,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
):
    """[lo, hi) of the keys a tile of queries can see: up to its last query; with
    a window, from the first query's window start (rounded down to BLOCK_N)."""
    hi = tl.minimum(seq_len, context + first + BLOCK_M)
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(0, context + first - window + 1)
        lo = (lo // BLOCK_N) * BLOCK_N
    return lo, hi


@triton.jit
def _attend_keys(
    q, acc, m_i, l_i, start, K_cache, V_cache, block_tables, seq, stride_bt, stride_cb,
    stride_cs, stride_ch, kv_head, offs_d, d_mask, seq_len, q_pos, window, qk_scale,
    KV_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr,
    HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    KV_CAST: tl.constexpr, FP8_AS_F16: tl.constexpr, V_PAIRS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """One online-softmax step over BLOCK_N keys from ``start``: the updated
    (acc, m_i, l_i), scores in log2 units. MASKED: apply the causal mask, the
    window and the end of the sequence (unmasked blocks are whole and visible to
    every row). V_PAIRS (an fp8 cache computed in float16): the values read as
    16-bit pairs (``_fp8_value_pairs``), the same numbers."""
    offs_n = start + tl.arange(0, BLOCK_N)
    if MASKED:
        n_mask = offs_n < seq_len
        block = tl.load(block_tables + seq * stride_bt + offs_n // KV_BLOCK, mask=n_mask, other=0)
    else:
        block = tl.load(block_tables + seq * stride_bt + offs_n // KV_BLOCK)
    kv_off = (
        block[:, None] * stride_cb
        + (offs_n % KV_BLOCK)[:, None] * stride_cs
        + kv_head * stride_ch
        + offs_d[None, :]
    )
    if MASKED:
        kv_mask = n_mask[:, None] & d_mask[None, :]
    else:
        kv_mask = d_mask[None, :] & (offs_n[:, None] >= 0)
    k = tl.load(K_cache + kv_off, mask=kv_mask, other=0.0)
    if V_PAIRS:
        v_even, v_odd = _fp8_value_pairs(
            V_cache, block, offs_n, kv_head, stride_cb, stride_cs, stride_ch, seq_len,
            offs_d.shape[0] // 2, HEAD_DIM, KV_BLOCK, MASKED,
        )  # fmt: skip
        v = v_even  # (its dtype: the products' operand type)
    else:
        v = tl.load(V_cache + kv_off, mask=kv_mask, other=0.0)
        v_even = v  # unused
        v_odd = v
    if FP8_AS_F16:
        k = k.to(tl.float16)
        v = v.to(tl.float16)
    elif KV_CAST:  # an fp8 cache under float32 activations
        k = k.to(q.dtype)
        v = v.to(q.dtype)
    if UPCAST:  # the CPU interpreter's bf16/fp16 dot is wrong: compute in fp32 there
        q = q.to(tl.float32)
        k = k.to(tl.float32)
        v = v.to(tl.float32)
        v_even = v_even.to(tl.float32)
        v_odd = v_odd.to(tl.float32)
    if IEEE:  # noqa: SIM108 (Triton needs a constexpr branch here)
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * qk_scale
    if MASKED:
        visible = (offs_n[None, :] <= q_pos[:, None]) & n_mask[None, :]
        if HAS_WINDOW:
            visible &= offs_n[None, :] > q_pos[:, None] - window
        s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows that see nothing yet
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if V_PAIRS:
        # Each output column's sum over the keys as in one product: column 2j from
        # the even dimensions' product, 2j + 1 from the odd ones'.
        p16 = p.to(v.dtype)
        pv = tl.reshape(tl.join(tl.dot(p16, v_even), tl.dot(p16, v_odd)), acc.shape)
    elif IEEE:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i


@triton.jit
def _attend_one_query(
    q_ptr, K_cache, V_cache, block_tables, seq, stride_bt, stride_cb, stride_cs, stride_ch,
    kv_head, offs_d, d_mask, q_pos, lo, hi, window, qk_scale,
    KV_BLOCK: tl.constexpr, BLOCK_N: tl.constexpr, HAS_WINDOW: tl.constexpr,
    STAGES: tl.constexpr,
):  # fmt: skip
    """One query (a decode) over keys [lo, hi): (acc [D_PAD], m, l), scores in log2
    units, in float32 on the CUDA cores. A 16-row tensor-core product spends 15 of
    its rows on nothing here, and on an fp8 cache its operands must pass through
    shared memory after their conversion; here a score is a dot product of two rows
    and the output a sum of value rows, so each key and value is converted where it
    is loaded and used there (exact: e4m3 values are float32 values).

    Each of the BLOCK_N lanes of a step (keys lane, lane + BLOCK_N, ...) keeps its own
    online softmax (max, sum, weighted values), merged once at the end: a step then
    reduces only along the head dimension (within a few threads), never across the
    keys, which would cross warps through shared memory at every step. STAGES: the
    loop's software pipeline (its loads feed no tensor-core product, so Triton
    pipelines them only when asked). Every key before the query is visible to it
    (the end of the sequence and the window masked)."""
    q = tl.load(q_ptr + offs_d, mask=d_mask, other=0.0).to(tl.float32) * qk_scale
    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, q.shape[0]], tl.float32)
    for start in tl.range(lo, hi, BLOCK_N, num_stages=STAGES):
        offs_n = start + tl.arange(0, BLOCK_N)
        visible = offs_n < hi
        if HAS_WINDOW:
            visible &= offs_n > q_pos - window
        block = tl.load(block_tables + seq * stride_bt + offs_n // KV_BLOCK, mask=visible, other=0)
        kv_off = (
            block[:, None] * stride_cb
            + (offs_n % KV_BLOCK)[:, None] * stride_cs
            + kv_head * stride_ch
            + offs_d[None, :]
        )
        kv_mask = visible[:, None] & d_mask[None, :]
        k = tl.load(K_cache + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.where(visible, tl.sum(k * q[None, :], 1), float("-inf"))  # [BLOCK_N]
        m_new = tl.maximum(m, s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # lanes that saw nothing yet
        p = tl.exp2(s - m_safe)
        alpha = tl.exp2(m - m_safe)
        l_sum = l_sum * alpha + p
        v = tl.load(V_cache + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        acc = acc * alpha[:, None] + p[:, None] * v
        m = m_new
    # The lanes merged: each weighted by 2^(its max - the overall max).
    m_all = tl.max(m, 0)
    weight = tl.exp2(m - tl.where(m_all == float("-inf"), 0.0, m_all))
    return tl.sum(acc * weight[:, None], 0), m_all, tl.sum(l_sum * weight, 0)


@triton.jit
def _fp8_value_pairs(
    V_cache, block, offs_n, kv_head, stride_cb, stride_cs, stride_ch, seq_len,
    HALF: tl.constexpr, HEAD_DIM: tl.constexpr, KV_BLOCK: tl.constexpr, MASKED: tl.constexpr,
):  # fmt: skip
    """The values of keys ``offs_n`` (their cache ``block``s) from an fp8 cache as
    float16: (even dimensions, odd dimensions), each [keys, HALF]. Read as 16-bit
    pairs of neighbouring dimensions, which the P x V product's operand layout
    transposes as a bf16 cache's values (ldmatrix.trans), where float8 values took
    one shared-memory load per byte. Each byte is decoded by moving e4m3's sign,
    exponent and mantissa into a float16's fields (exponent bias 15 instead of 7,
    so x 2^8 after), exact for every finite e4m3 value, subnormals included.
    Strides are even (cache rows of whole heads)."""
    offs_h = tl.arange(0, HALF)
    pair_off = (
        block[:, None] * (stride_cb // 2)
        + (offs_n % KV_BLOCK)[:, None] * (stride_cs // 2)
        + kv_head * (stride_ch // 2)
        + offs_h[None, :]
    )
    pairs_ptr = V_cache.to(tl.pointer_type(tl.uint16), bitcast=True)
    pair_ok = offs_h < HEAD_DIM // 2  # HALF pads to a power of two
    if MASKED:
        mask = (offs_n < seq_len)[:, None] & pair_ok[None, :]
    else:
        mask = (offs_n >= 0)[:, None] & pair_ok[None, :]
    pairs = tl.load(pairs_ptr + pair_off, mask=mask, other=0)
    return _e4m3_bits_to_f16(pairs & 0xFF), _e4m3_bits_to_f16(pairs >> 8)


@triton.jit
def _e4m3_bits_to_f16(bits):
    """e4m3 bit patterns (uint16 holding 0-255) -> their values as float16."""
    f16_bits = ((bits & 0x80) << 8) | ((bits & 0x7F) << 7)
    return f16_bits.to(tl.float16, bitcast=True) * 256.0


# Integers that change from pass to pass are not specialised: Triton would compile
# a variant per value that is 1 or a multiple of 16 (a 0.7 s stall in the middle of
# serving, measured on W1), and none of them shapes a tile.
@triton.jit(do_not_specialize=["window", "num_tokens", "splits", "stride_bt"])
def _paged_attention_kernel(
    Q,
    K_cache,
    V_cache,
    Out,
    Part_O,
    Part_M,
    Part_L,
    Arrivals,
    block_tables,
    seq_lens,
    cu_seqlens_q,
    tile_seq,
    tile_start,
    scale,
    window,
    num_tokens,
    stride_qt,
    stride_qh,
    stride_cb,
    stride_cs,
    stride_ch,
    stride_bt,
    stride_ot,
    stride_oh,
    splits,
    GROUP: tl.constexpr,
    NUM_HEADS: tl.constexpr,
    SPLIT: tl.constexpr,
    SPLIT_MIN_KEYS: tl.constexpr,
    KV_BLOCK: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    KV_CAST: tl.constexpr,
    FP8_AS_F16: tl.constexpr,
    V_PAIRS: tl.constexpr,
    ONE_QUERY: tl.constexpr,
    HEAD_MAJOR: tl.constexpr,
    PACK: tl.constexpr,
    QUERIES: tl.constexpr,
    MERGE_HERE: tl.constexpr,
    SPLITS_P2: tl.constexpr,
    EARLY: tl.constexpr,
    PREFETCH_KEYS: tl.constexpr,
    LINE: tl.constexpr,
    PDL: tl.constexpr,
):
    # EARLY: until the wait (PDL: the previous kernel, this layer's rotary + KV write,
    # may still run) only what it does not write: the step's tile table, lengths and
    # block tables (written before the step's first kernel) and the lines of the
    # cached keys and values, pulled into L2 (the new token's are written into L2 too,
    # where the predecessor's stores then land). q, which it rotates in place, after.
    if not EARLY:
        triton_pdl.wait_for_predecessor(PDL)
    # A program's rows are (query, head) pairs: QUERIES queries of one tile at a time
    # (all BLOCK_M of them, or one 16-row product's worth), each for PACK query heads
    # that share one KV head (PACK 1: one head).
    ROWS: tl.constexpr = QUERIES * PACK
    rows = tl.arange(0, ROWS)
    if PACK > 1:
        # Grouped-query decode tiles: the PACK heads read the KV head once, and an
        # fp8 cache is converted once, instead of once per query head.
        packs_per_kv_head: tl.constexpr = (GROUP + PACK - 1) // PACK
        kv_head = tl.program_id(0) // packs_per_kv_head
        in_group = (tl.program_id(0) % packs_per_kv_head) * PACK + rows % PACK
        heads = kv_head * GROUP + in_group
        tile = tl.program_id(1)
        head_ok = in_group < GROUP
    else:
        if HEAD_MAJOR:
            # Decode tiles: the heads of one sequence are neighbouring programs, so
            # the GROUP query heads that share a KV head run together and read it
            # once from memory, the others from the L2 cache (tile-major, they were
            # a whole batch of programs apart and each read it from memory).
            head = tl.program_id(0)
            tile = tl.program_id(1)
        else:
            tile = tl.program_id(0)
            head = tl.program_id(1)
        kv_head = head // GROUP
        heads = head + tl.zeros([ROWS], tl.int32)
        head_ok = rows >= 0
    seq = tl.load(tile_seq + tile)
    first = tl.load(tile_start + tile)  # index of the tile's first query within its chunk
    q_begin = tl.load(cu_seqlens_q + seq)
    q_len = tl.load(cu_seqlens_q + seq + 1) - q_begin
    seq_len = tl.load(seq_lens + seq)
    context = seq_len - q_len  # position of the chunk's first query

    # The whole tile's keys, whatever QUERIES: split-KV's slices (and the merge
    # kernel, which recomputes them) follow the tile.
    lo, hi = _key_range(seq_len, context, first, window, BLOCK_M, BLOCK_N, HAS_WINDOW)
    split = 0
    used = 1
    if SPLIT:
        # Split-KV (flash decoding): this program covers one slice of the keys; the
        # last of the tile's slices to finish (MII_SPLIT_KV_MERGE=kernel) or
        # _merge_splits_kernel then combines their partial softmax results.
        # Programs past the slices in use see no keys.
        split = tl.program_id(2)
        used = _splits_used(hi - lo, splits, SPLIT_MIN_KEYS)
        chunk = tl.cdiv(tl.cdiv(hi - lo, used), BLOCK_N) * BLOCK_N
        lo = lo + split * chunk
        hi = tl.minimum(hi, lo + chunk)
    if EARLY:
        if PDL and PREFETCH_KEYS > 0:  # noqa: SIM102 (a constexpr test, then a runtime one)
            if lo < hi:  # (slices past the keys have none)
                _prefetch_keys(
                    K_cache, V_cache, block_tables, seq, stride_bt, stride_cb, stride_cs,
                    stride_ch, kv_head, lo, hi, KV_BLOCK, PREFETCH_KEYS, D_PAD, LINE,
                )  # fmt: skip
        triton_pdl.wait_for_predecessor(PDL)
    # Keys below the tile's first query position are visible to every row of the
    # tile: those blocks skip the causal mask (most of a long context). Only the
    # blocks from there on (the diagonal), or every block under a sliding window,
    # are masked.
    unmasked_end = lo
    if not HAS_WINDOW:
        unmasked_end = tl.minimum(hi, tl.maximum(lo, ((context + first) // BLOCK_N) * BLOCK_N))
    passes = 1  # the whole tile at once
    if QUERIES < BLOCK_M:
        # A decode is one query: one pass. A tile of a few more queries (a short chunk)
        # takes a pass over its keys per QUERIES of them.
        passes = tl.cdiv(tl.minimum(BLOCK_M, q_len - first), QUERIES)
    for part in range(0, passes):
        _attend_rows(
            Q, K_cache, V_cache, Out, Part_O, Part_M, Part_L, Arrivals, block_tables,
            scale, window, num_tokens, stride_qt, stride_qh, stride_cb, stride_cs,
            stride_ch, stride_bt, stride_ot, stride_oh, rows, heads, head_ok, kv_head,
            seq, first, first + part * QUERIES, q_begin, q_len, seq_len, context, lo,
            hi, unmasked_end, split, used, NUM_HEADS, HEAD_DIM, D_PAD, BLOCK_M,
            BLOCK_N, KV_BLOCK, HAS_WINDOW, IEEE, UPCAST, KV_CAST, FP8_AS_F16, V_PAIRS,
            PACK, SPLIT, MERGE_HERE, SPLITS_P2, ONE_QUERY,
        )  # fmt: skip


@triton.jit
def _attend_rows(
    Q, K_cache, V_cache, Out, Part_O, Part_M, Part_L, Arrivals, block_tables, scale,
    window, num_tokens, stride_qt, stride_qh, stride_cb, stride_cs, stride_ch, stride_bt,
    stride_ot, stride_oh, rows, heads, head_ok, kv_head, seq, first, rows_first, q_begin,
    q_len, seq_len, context, lo, hi, unmasked_end, split, used,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KV_BLOCK: tl.constexpr,
    HAS_WINDOW: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    KV_CAST: tl.constexpr, FP8_AS_F16: tl.constexpr, V_PAIRS: tl.constexpr,
    PACK: tl.constexpr, SPLIT: tl.constexpr, MERGE_HERE: tl.constexpr,
    SPLITS_P2: tl.constexpr, ONE_QUERY: tl.constexpr,
):  # fmt: skip
    """The program's rows (queries from ``rows_first`` of the tile's chunk, PACK heads
    each) over keys [lo, hi): load q, run the key loops, store the output (or, split,
    the partial results and, MERGE_HERE, the merge)."""
    offs_m = rows_first + rows // PACK
    m_mask = (offs_m < q_len) & head_ok  # (QUERIES divides BLOCK_M: passes end at the tile's)
    q_pos = context + offs_m
    offs_d = tl.arange(0, D_PAD)
    d_mask = offs_d < HEAD_DIM
    q = tl.load(
        Q + (q_begin + offs_m)[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    if FP8_AS_F16:
        # An fp8 cache under 16-bit activations: compute in float16, which holds
        # every e4m3 value exactly and which the hardware converts e4m3 to in one
        # instruction (to bfloat16 it takes several: the decode sweep ran at half the
        # copy bandwidth). q saturates at float16's range instead of overflowing.
        q = tl.clamp(q.to(tl.float32), -65504.0, 65504.0, propagate_nan=tl.PropagateNan.ALL)
        q = q.to(tl.float16)

    ROWS: tl.constexpr = rows.shape[0]
    m_i = tl.full([ROWS], float("-inf"), tl.float32)  # running maxima, in log2 units
    l_i = tl.zeros([ROWS], tl.float32)
    acc = tl.zeros([ROWS, D_PAD], tl.float32)
    # Scores in log2 units (exp2 is the hardware's instruction; folding log2(e)
    # into the softmax scale saves a multiply per score).
    qk_scale = scale * 1.4426950408889634
    if ONE_QUERY > 0 and q_len == 1:
        # A decode: one real row of the 16. Its scores and weighted sum on the CUDA
        # cores, the keys and values converted in registers (see _attend_one_query).
        head = tl.max(heads, 0)  # (one head: PACK is 1 here)
        acc1, m1, l1 = _attend_one_query(
            Q + (q_begin + rows_first) * stride_qt + head * stride_qh, K_cache, V_cache,
            block_tables, seq, stride_bt, stride_cb, stride_cs, stride_ch, kv_head, offs_d,
            d_mask, context + rows_first, lo, hi, window, qk_scale, KV_BLOCK, BLOCK_N,
            HAS_WINDOW, ONE_QUERY,
        )  # fmt: skip
        first_row = rows == 0
        acc = tl.where(first_row[:, None], acc1[None, :], 0.0)
        m_i = tl.where(first_row, m1, float("-inf"))
        l_i = tl.where(first_row, l1, 0.0)
    else:
        for start in range(lo, unmasked_end, BLOCK_N):
            acc, m_i, l_i = _attend_keys(
                q, acc, m_i, l_i, start, K_cache, V_cache, block_tables, seq, stride_bt,
                stride_cb, stride_cs, stride_ch, kv_head, offs_d, d_mask, seq_len, q_pos,
                window, qk_scale, KV_BLOCK, BLOCK_N, False, HAS_WINDOW, IEEE, UPCAST,
                KV_CAST, FP8_AS_F16, V_PAIRS, HEAD_DIM,
            )  # fmt: skip
        for start in range(unmasked_end, hi, BLOCK_N):
            acc, m_i, l_i = _attend_keys(
                q, acc, m_i, l_i, start, K_cache, V_cache, block_tables, seq, stride_bt,
                stride_cb, stride_cs, stride_ch, kv_head, offs_d, d_mask, seq_len, q_pos,
                window, qk_scale, KV_BLOCK, BLOCK_N, True, HAS_WINDOW, IEEE, UPCAST,
                KV_CAST, FP8_AS_F16, V_PAIRS, HEAD_DIM,
            )  # fmt: skip
    direct = m_mask  # this program writes the output itself
    if SPLIT:
        # partials: O [splits, T, H, D_PAD], M and L [splits, T, H], float32
        row = (split * num_tokens + q_begin + offs_m) * NUM_HEADS + heads
        partial = m_mask & (used > 1) & (split < used)
        tl.store(Part_M + row, m_i * 0.6931471805599453, mask=partial)  # natural units
        tl.store(Part_L + row, l_i, mask=partial)
        tl.store(Part_O + row[:, None] * D_PAD + offs_d[None, :], acc, mask=partial[:, None])
        direct = m_mask & (used == 1) & (split == 0)
        if MERGE_HERE and ((used > 1) & (split < used)):
            # The last of the tile's slices to finish merges them all (one launch,
            # no merge kernel): the others' partials are visible to it once it has
            # seen their arrivals (ops/triton_arrivals.py). (Its rows hold the whole
            # tile: the launch gives it QUERIES = BLOCK_M.)
            tl.debug_barrier()
            slot = _arrival_slot()
            arrived = tl.atomic_add(Arrivals + slot, 1, sem="acq_rel", scope="gpu")
            if arrived == used - 1:
                for i in range(0, tl.minimum(BLOCK_M, q_len - first)):
                    for p in tl.static_range(PACK):
                        head_p = tl.sum(tl.where(rows == p, heads, 0))
                        ok_p = tl.sum(tl.where(rows == p, head_ok.to(tl.int32), 0)) > 0
                        if ok_p:
                            _merge_one(
                                Out, Part_O, Part_M, Part_L, q_begin + first + i, head_p,
                                used, num_tokens, stride_ot, stride_oh, NUM_HEADS, HEAD_DIM,
                                D_PAD, SPLITS_P2,
                            )  # fmt: skip
                tl.atomic_xchg(Arrivals + slot, 0)  # ready for the next launch
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    out_rows = (q_begin + offs_m) * stride_ot + heads * stride_oh
    tl.store(
        Out + out_rows[:, None] + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=direct[:, None] & d_mask[None, :],
    )


@triton.jit(do_not_specialize=["window", "num_tokens", "splits"])
def _merge_splits_kernel(
    Out,
    Part_O,
    Part_M,
    Part_L,
    seq_lens,
    cu_seqlens_q,
    tile_seq,
    tile_start,
    window,
    num_tokens,
    stride_ot,
    stride_oh,
    splits,
    NUM_HEADS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT_MIN_KEYS: tl.constexpr,
    SPLITS_P2: tl.constexpr,
    HAS_WINDOW: tl.constexpr,
    PDL: tl.constexpr,
):
    """out = sum_s e^(m_s - m) o_s / sum_s e^(m_s - m) l_s for each query of a tile
    and one head, for the tiles whose keys were split (the others wrote their output).
    The attention kernel merges them itself where arrival counts are at hand
    (``MERGE_HERE``); this launch is for where they are not.

    All slices of a query are loaded at once (``_merge_one``): at 16 slices a loop
    over slices, not the attention, set batch 1's pace at long contexts."""
    triton_pdl.wait_for_predecessor(PDL)
    tile = tl.program_id(0)
    head = tl.program_id(1)
    seq = tl.load(tile_seq + tile)
    first = tl.load(tile_start + tile)
    q_begin = tl.load(cu_seqlens_q + seq)
    q_len = tl.load(cu_seqlens_q + seq + 1) - q_begin
    seq_len = tl.load(seq_lens + seq)
    lo, hi = _key_range(seq_len, seq_len - q_len, first, window, BLOCK_M, BLOCK_N, HAS_WINDOW)
    used = _splits_used(hi - lo, splits, SPLIT_MIN_KEYS)
    # Queries of this tile whose keys were split (none when one program took them).
    queries = tl.where(used > 1, tl.minimum(BLOCK_M, q_len - first), 0)
    for i in range(0, queries):
        _merge_one(
            Out, Part_O, Part_M, Part_L, q_begin + first + i, head, used, num_tokens,
            stride_ot, stride_oh, NUM_HEADS, HEAD_DIM, D_PAD, SPLITS_P2,
        )  # fmt: skip


@triton.jit
def _arrival_slot():
    """The arrival count of this program's result: one per (program_id(0),
    program_id(1)), a tile and a head (or pack of heads) in either grid order; the
    programs sharing a result differ only in program_id(2), their slice of keys."""
    return tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)


@triton.jit
def _merge_one(
    Out, Part_O, Part_M, Part_L, token, head, used, num_tokens, stride_ot, stride_oh,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    SPLITS_P2: tl.constexpr,
):  # fmt: skip
    """Out[token, head] from its ``used`` split-KV partials: all slices in one load
    ([SPLITS_P2, D_PAD]: one memory latency, where a loop over slices paid one per
    slice). The partials bypass L1 (``.cg``): other programs wrote them."""
    offs_s = tl.arange(0, SPLITS_P2)
    s_mask = offs_s < used
    offs_d = tl.arange(0, D_PAD)
    row = (offs_s * num_tokens + token) * NUM_HEADS + head
    m_s = tl.load(Part_M + row, mask=s_mask, other=float("-inf"), cache_modifier=".cg")
    l_s = tl.load(Part_L + row, mask=s_mask, other=0.0, cache_modifier=".cg")
    o_s = tl.load(
        Part_O + row[:, None] * D_PAD + offs_d[None, :],
        mask=s_mask[:, None],
        other=0.0,
        cache_modifier=".cg",
    )
    m = tl.max(m_s, 0)
    weight = tl.exp(m_s - tl.where(m == float("-inf"), 0.0, m))  # 0 for empty slices
    total = tl.sum(weight * l_s, 0)
    out = tl.sum(o_s * weight[:, None], 0) / tl.where(total == 0.0, 1.0, total)
    tl.store(
        Out + token * stride_ot + head * stride_oh + offs_d,
        out.to(Out.dtype.element_ty),
        mask=offs_d < HEAD_DIM,
    )


@triton.jit
def _prefetch_keys(
    K_cache, V_cache, block_tables, seq, stride_bt, stride_cb, stride_cs, stride_ch, kv_head,
    lo, hi, KV_BLOCK: tl.constexpr, KEYS: tl.constexpr, D_PAD: tl.constexpr,
    LINE: tl.constexpr,
):  # fmt: skip
    """Ask for the L2 lines of the first KEYS keys and values of [lo, hi) of one KV
    head (LINE elements per 128-byte line); nothing waits for them."""
    keys = lo + tl.arange(0, KEYS)
    wanted = keys < hi
    block = tl.load(block_tables + seq * stride_bt + keys // KV_BLOCK, mask=wanted, other=0)
    lines = tl.arange(0, D_PAD // LINE) * LINE
    offsets = (
        block[:, None] * stride_cb
        + (keys % KV_BLOCK)[:, None] * stride_cs
        + kv_head * stride_ch
        + lines[None, :]
    )
    offsets = tl.where(wanted[:, None] & (lines[None, :] >= 0), offsets, 0)
    triton_pdl.prefetch_to_l2(K_cache + offsets)
    triton_pdl.prefetch_to_l2(V_cache + offsets)


# Fewest keys one split-KV program takes: below it, the merge would cost more
# than the parallelism gains (the batch-1 profile of a 192-token context spent
# more time merging nine mostly empty slices than attending). decode_sweep's batch-1
# rows (H100, 2026-11-25, 5fe16bc): 128 is the best or within 0.5 us of it from 256
# to 4096 keys, bf16 and fp8 (a 256-key context: 14.6 us with 128, 17.1 us with 256).
SPLIT_MIN_KEYS = 128
# Launch of the prompt-tile (attention.LARGE_TILE = 128-query) attention kernel:
# the best of benchmarks/prefill_sweep.py on the H200 (2026-12-02, with the
# unmasked/masked key loops and exp2): 128-query tiles, 64 keys per step, 4 warps,
# 3 stages ran one causal 1,024 / 4,096-token prompt in 0.90x / 0.83x flash SDPA's
# time and the last 4,096-token chunk of a 32k prompt at 434 TFLOP/s (64-query
# tiles: 1.41x / 0.84x SDPA, 383 TFLOP/s).
PROMPT_LAUNCH = {"block_n": 64, "num_warps": 4, "num_stages": 3}
# Launch of the decode-tile (16-query) kernel, from benchmarks/decode_sweep.py (H200,
# 2026-11-25): on a bf16 cache 64 keys per step are within 5 % of the best setting
# (100-107 % of copy bandwidth); an fp8 cache wants 128 keys and 2 stages (20 %
# faster than 64/3: each step's tile is half the bytes).
DECODE_LAUNCH = {"block_n": 64, "num_warps": 4, "num_stages": 3}
DECODE_LAUNCH_FP8 = {"block_n": 128, "num_warps": 4, "num_stages": 2}
# One-head decode programs on an fp8 cache when they fill the GPU without split-KV
# (Llama-2-7B's layout, W1's and serving's decode batches): 3 stages. decode_sweep
# (H200, 2026-12-04, two runs): 256 x 640 keys 451.8 us vs 501.5 with 2 stages (70 vs
# 63 % of copy bandwidth), 32 x 4096 350.2 vs 367.1; split-KV (4 x 16,384) keeps 2
# (245.8 us with 3 vs 166.5), and packed grouped-query programs were within 2 % either way.
DECODE_LAUNCH_FP8_MHA = {"block_n": 128, "num_warps": 4, "num_stages": 3}
# One-head decode programs that take a decode's single query on the CUDA cores
# (MII_DECODE_ONE_QUERY=cores), split-KV or not. decode_sweep --one-query (H100,
# 2026-12-05, fab48f0), Llama-2-7B heads: 32 keys a step, 4 warps, 3 stages was the best
# of 36 settings at 233 x 760, 4 x 16,384 and 1 x 32,768 keys (90, 90, 80 % of copy
# bandwidth; 64 keys: 87, 84, 72 %); at 64 x 2,600 it is not among the top five (the
# fifth is 0.9 % from the best, 16/2/1; only the top five are kept). (Its
# accumulator is keys a step x head_dim float32, so wider steps than the products' spill.)
DECODE_LAUNCH_ONE_QUERY = {"block_n": 32, "num_warps": 4, "num_stages": 3}
# The same programs unsplit, when there are many per multiprocessor: 16 keys a step, 2
# warps, 3 stages. decode_sweep --one-query, Llama-2-7B heads, 233 x 760 and 64 x 2,600
# keys: on the H200 (2026-12-05, 3d60168) 387.1 and 350.2 us against 412.7 and 390.3 with
# 32/4/3; on the H100 (366af50) 511.5 and 470.6 against 512.2 and 489.2. Split-KV (4 x
# 16,384, 1 x 32,768) keeps 32/4/3, the best of both cards there. With few programs per
# multiprocessor the narrow launch keeps half the bytes in flight: W1 with the fp8 cache
# (H100, narrow from 2 programs a multiprocessor, the split-KV threshold) took 6.40 / 6.40 s
# against 6.33 / 6.35 wide, hence a threshold of its own (ONE_QUERY_NARROW_MIN_PER_SM).
DECODE_LAUNCH_ONE_QUERY_UNSPLIT = {"block_n": 16, "num_warps": 2, "num_stages": 3}
ONE_QUERY_NARROW_MIN_PER_SM = 8


def one_query_launch(num_splits: int, programs: int, device: torch.device) -> dict:
    """The launch of ``programs`` one-head CUDA-core decode programs (per split) split
    ``num_splits`` ways (MII_ONE_QUERY_UNSPLIT_LAUNCH=wide: always the split-KV launch)."""
    if num_splits > 1 or envs.ONE_QUERY_UNSPLIT_LAUNCH.get() != "narrow":
        return DECODE_LAUNCH_ONE_QUERY
    many = programs >= ONE_QUERY_NARROW_MIN_PER_SM * triton_limits.multiprocessors(device)
    return DECODE_LAUNCH_ONE_QUERY_UNSPLIT if many else DECODE_LAUNCH_ONE_QUERY


# DECODE_LAUNCH's programs when split-KV is on (too few sequences to fill the GPU, so
# each program's serial key loop sets the pace): 128 keys per step.
# decode_sweep --batch1-launch (H200, 2026-12-03, 5704d3a), Llama-2-7B's 32 heads at
# batch 1 (9 slices): 14.2 / 33.3 / 143.1 us at 384 / 4k / 32k keys against 14.9 /
# 34.4 / 152.6 with 64; the top 3 of 18 settings were 128 keys, 4 warps and 2, 3 or 4
# stages, one kernel: a 128-key stage of a 128-wide bf16 head is 64 KB, so
# triton_limits.PLANNED_BYTES leaves 2 stages whatever is asked (1 at head_dim 256,
# where the 64-key launch kept 2: wider heads keep DECODE_LAUNCH).
DECODE_LAUNCH_SPLIT = {"block_n": 128, "num_warps": 4, "num_stages": 3}
# Grouped-query decode programs (4 query heads each) on a bf16 cache: 2 stages were
# as fast or faster than 3 at every shape of decode_sweep --gqa-only (H100,
# 2026-11-25, 8dc3db2: 256 x 640 260.7 vs 262.0 us, 32 x 4096 200.9 vs 211.5,
# 4 x 16384 144.5 vs 164.3). On an fp8 cache the fp8 launch stays: 64-key steps won
# at 640 keys (191 vs 237 us) but lost by 16-38 % at 4096-16384.
DECODE_LAUNCH_GQA = {"block_n": 64, "num_warps": 4, "num_stages": 2}
# The same programs when their passes take 16 rows (MII_GQA_DECODE_QUERIES=pack):
# decode_sweep --gqa-only (H200, 2026-12-04, 23dbeb2), 32 query heads on 8 KV heads,
# bf16 cache: 2 warps 171.7 / 143.3 / 85.4 us at 256 x 640 / 32 x 4096 / 4 x 16,384
# keys against 177.8 / 177.3 / 85.8 with 4 warps and the 64-row programs' 191.4 /
# 154.7 / 114.2 (a 16 x 64 product is too small to split over 4 warps); fp8 cache:
# 3 stages 156.4 / 117.3 / 80.9 against 166.7 / 118.8 / 81.4 with 2 and 190.2 / 145.1 /
# 104.1 at 64 rows.
DECODE_LAUNCH_GQA_FILL = {"block_n": 64, "num_warps": 2, "num_stages": 2}
DECODE_LAUNCH_FP8_GQA_FILL = {"block_n": 128, "num_warps": 4, "num_stages": 3}


def launch_settings(
    tile_size: int, fp8: bool, pack: int, num_splits: int, d_pad: int, fill_rows: bool
) -> tuple[dict[str, int], int]:
    """The launch (keys a step, warps, stages) of the programs of ``tile_size``-query
    tiles, and the queries each pass over the keys takes: the whole tile, or
    (``fill_rows``: MII_GQA_DECODE_QUERIES=pack without the in-kernel merge) for
    packed grouped-query decode programs as many as fill one 16-row product with
    their heads: a decode's 1 query x 4 heads in 16 rows, not 64 (16 queries x 4
    heads, 60 of them empty). The engine and the sm_90 compile test both ask here."""
    decode = tile_size <= 16
    launch = PROMPT_LAUNCH
    if decode and fp8:
        launch = DECODE_LAUNCH_FP8
    elif decode:
        launch = DECODE_LAUNCH_GQA if pack > 1 else DECODE_LAUNCH
    queries = tile_size
    # (timed on heads of 128: wider ones keep the whole-tile programs)
    if fill_rows and pack > 1 and decode and d_pad <= 128:
        queries = min(tile_size, max(1, 16 // pack))
        launch = DECODE_LAUNCH_FP8_GQA_FILL if fp8 else DECODE_LAUNCH_GQA_FILL
    if launch is DECODE_LAUNCH and num_splits > 1 and d_pad <= 128:
        # few programs: each one's loop latency shows (wider heads: not measured)
        launch = DECODE_LAUNCH_SPLIT
    elif launch is DECODE_LAUNCH_FP8 and num_splits == 1 and pack == 1 and d_pad <= 128:
        launch = DECODE_LAUNCH_FP8_MHA
    return launch, queries


# Decode tiles of grouped-query models launched head-major (see the kernel); a
# switch for benchmarks/decode_sweep.py, which times both orders.
HEAD_MAJOR_DECODE = True
# Query heads of one KV head that a grouped-query decode program takes together
# (its rows: 16 queries x this many heads); 1 turns packing off. Larger groups
# (MQA) are split into packs of this size.
GQA_DECODE_PACK = 4


# Most split-KV slices per decode program. At batch 1 a grouped-query model has
# few programs (Llama-3-8B: 8 KV heads, 4 query heads packed per program), so this
# caps its parallelism. decode_sweep --long-context (H200, 2026-12-03, 1a1bfdb),
# Llama-3-8B's layout at batch 1, bf16 cache: 32 slices are the best of 1-128 from
# 4k to 128k keys (32k: 53.1 us vs 71.0 with 16, 56.7 with 64; 128k: 150.1 vs 225.2,
# 84 % of copy bandwidth) and within 1 us of 8 at 1k (fp8 cache: best or tied from 4k,
# 2 us behind 8 at 1k). Llama-2-7B's 32 programs take 9 slices (2 x SMs), whatever
# this cap above 9 (the same call: fp8 cache at 32k, 9 slices 149.9 us vs 106.0 with
# 8 and 109.2 with 16; bf16 151.7 vs 149.0 with 8: to re-measure).
MAX_KV_SPLITS = 32
# Keys per decode program whose cached K and V lines are pulled into L2 before the
# PDL wait, while the rotary + KV write kernel still runs (MII_ATTENTION_EARLY_LOADS).
PREFETCH_KEYS = 128


def _auto_splits(tiles: TileSet, programs: int, device: torch.device) -> int:
    """Split-KV only for decode tiles that would leave most multiprocessors idle."""
    if tiles.size > 16 or device.type != "cuda":
        return 1
    target = 2 * triton_limits.multiprocessors(device)
    return 1 if programs >= target else min(MAX_KV_SPLITS, triton.cdiv(target, programs))


def _tile_sets(batch: AttentionBatch, device: torch.device) -> list[TileSet]:
    if batch.tiles is not None:
        return batch.tiles
    return tile_sets(batch.query_lens_host, device)


def rotary_cache_write(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slots: torch.Tensor,
) -> None:
    """Rotate q in place and write rotated k and v into the cache (one launch)."""
    tokens, q_heads, dim = q.shape
    kv_heads = k.shape[1]
    if tokens == 0:
        return
    rot_half = cos_sin.shape[-1] // 2 if cos_sin is not None else 0
    cache_slot_stride = k_cache.stride(1)
    _rotary_cache_write_kernel[(tokens,)](
        q,
        k,
        v,
        positions,
        cos_sin if cos_sin is not None else q,
        k_cache,
        v_cache,
        slots,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        cache_slot_stride,
        k_cache.stride(2),
        NUM_Q_HEADS=q_heads,
        NUM_KV_HEADS=kv_heads,
        HEAD_DIM=dim,
        ROT_HALF=rot_half,
        H_PAD=triton.next_power_of_2(max(q_heads, kv_heads)),
        HALF_PAD=triton.next_power_of_2(max(rot_half, 1)),
        D_PAD=triton.next_power_of_2(dim),
        HAS_ROTARY=cos_sin is not None,
        CLAMP=k_cache.dtype == FP8_KV_DTYPE,
        **triton_pdl.launch_options(q.device, small=True),
    )


def paged_attention_from_cache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
    sliding_window: int | None = None,
    splits: int | None = None,
    split_min_keys: int = SPLIT_MIN_KEYS,
) -> torch.Tensor:
    """Attention of q ([T, Hq, D]) over the keys already in the cache -> [T, Hq, D].

    ``splits`` > 1 divides each sequence's keys among up to that many programs
    (split-KV), each taking at least ``split_min_keys``; by default ``splits`` is
    chosen so that a few decoding sequences still fill the GPU. The number of
    slices in use is decided on the device from each sequence's length, so a CUDA
    graph captured once serves short and long contexts alike."""
    tokens, q_heads, dim = q.shape
    out = torch.empty_like(q)
    if tokens == 0:
        return out
    kv_heads, kv_block = k_cache.shape[2], k_cache.shape[1]
    d_pad = max(16, triton.next_power_of_2(dim))
    dependent_launch = triton_pdl.launch_options(q.device, small=True)
    merge_in_kernel = envs.SPLIT_KV_MERGE.get() == "kernel"
    fp8_as_f16 = k_cache.dtype == FP8_KV_DTYPE and q.dtype != torch.float32
    early_loads = envs.ATTENTION_EARLY_LOADS.get() == "on"
    one_query_cores = fp8_as_f16 and envs.DECODE_ONE_QUERY.get() == "cores"

    def launch(tiles: TileSet) -> None:
        count = tiles.seq.shape[0]
        group = q_heads // kv_heads
        pack = 1
        if tiles.size <= 16 and group > 1 and count < 65536:  # count: the grid's axis 1
            # a power of two: the tile's rows are a tl.arange
            pack = min(triton.next_power_of_2(GQA_DECODE_PACK), triton.next_power_of_2(group))
        programs_per_tile = kv_heads * triton.cdiv(group, pack)  # q_heads when unpacked
        num_splits = splits or _auto_splits(tiles, count * programs_per_tile, q.device)
        arrivals = None
        if num_splits > 1 and merge_in_kernel:  # one count per (tile, head or pack)
            arrivals = triton_arrivals.arrival_counts(q.device, count * programs_per_tile)
        # The in-kernel merge keeps whole-tile rows.
        fill_rows = envs.GQA_DECODE_QUERIES.get() == "pack" and arrivals is None
        launch, queries = launch_settings(
            tiles.size, k_cache.dtype == FP8_KV_DTYPE, pack, num_splits, d_pad, fill_rows
        )
        one_query = tiles.size <= 16 and pack == 1 and one_query_cores
        if one_query:
            launch = one_query_launch(num_splits, count * programs_per_tile, q.device)
            # Its float32 accumulator is keys x head_dim, read per key whatever the
            # cache's block size: the launch's keys at heads of up to 128, fewer above.
            block_n = max(16, launch["block_n"] * 128 // max(d_pad, 128))
        else:
            # Several KV blocks per iteration: more bytes in flight, fewer loop trips.
            block_n = max(launch["block_n"], triton.next_power_of_2(kv_block))
        # Prompt tiles stay tile-major: a sequence's tiles share its keys in L2.
        head_major = HEAD_MAJOR_DECODE and tiles.size <= 16 and q_heads > kv_heads
        head_major = head_major and count < 65536  # the grid's second axis limit
        if pack > 1 or head_major:
            grid = (programs_per_tile, count, num_splits)
        else:
            grid = (count, q_heads, num_splits)
        if num_splits > 1:
            parts = (
                torch.empty(num_splits, tokens, q_heads, d_pad, device=q.device),
                torch.empty(num_splits, tokens, q_heads, device=q.device),
                torch.empty(num_splits, tokens, q_heads, device=q.device),
            )
        else:
            parts = (out, out, out)  # unused
        # One width for every split count up to MAX_KV_SPLITS: a width per count
        # would compile a variant per batch size mid-serving.
        splits_p2 = triton.next_power_of_2(max(num_splits, MAX_KV_SPLITS))
        prefetch_keys = PREFETCH_KEYS if early_loads and tiles.size <= 16 else 0
        # The passes over a tile's queries end where the tile does (the kernel's masks
        # rely on it): powers of two, so this holds; asserted should that change.
        assert tiles.size % queries == 0, (tiles.size, queries)
        # K and V tiles of each stage in flight; fewer stages where the GPU's shared
        # memory is smaller than the H200 the launch was tuned on.
        stages = triton_limits.stages_that_fit(
            launch["num_stages"],
            2 * block_n * d_pad * k_cache.element_size(),
            q.device,
            reserved=queries * pack * d_pad * q.element_size(),  # the query tile
        )
        _paged_attention_kernel[grid](
            q,
            k_cache,
            v_cache,
            out,
            *parts,
            arrivals if arrivals is not None else out,  # unused without
            batch.block_tables,
            batch.seq_lens,
            batch.cu_seqlens_q,
            tiles.seq,
            tiles.start,
            scale,
            sliding_window or 0,
            tokens,
            q.stride(0),
            q.stride(1),
            k_cache.stride(0),
            k_cache.stride(1),
            k_cache.stride(2),
            batch.block_tables.stride(0),
            out.stride(0),
            out.stride(1),
            num_splits,
            GROUP=group,
            NUM_HEADS=q_heads,
            SPLIT=num_splits > 1,
            SPLIT_MIN_KEYS=split_min_keys,
            KV_BLOCK=kv_block,
            HEAD_DIM=dim,
            D_PAD=d_pad,
            BLOCK_M=tiles.size,
            BLOCK_N=block_n,
            HAS_WINDOW=sliding_window is not None,
            IEEE=q.dtype == torch.float32 or INTERPRETED,
            UPCAST=INTERPRETED and q.dtype != torch.float32,
            KV_CAST=k_cache.dtype != q.dtype,
            FP8_AS_F16=fp8_as_f16,
            V_PAIRS=fp8_as_f16 and dim % 2 == 0 and envs.FP8_KV_VALUES.get() == "pairs",
            ONE_QUERY=stages if one_query else 0,  # 0: off; else its loop's stages
            HEAD_MAJOR=head_major,
            PACK=pack,
            QUERIES=queries,
            MERGE_HERE=arrivals is not None,
            SPLITS_P2=splits_p2,
            EARLY=early_loads,
            PREFETCH_KEYS=prefetch_keys,
            LINE=min(d_pad, 128 // k_cache.element_size()),  # elements per 128-byte line
            num_warps=launch["num_warps"],
            num_stages=stages,
            **dependent_launch,
        )
        if num_splits > 1 and arrivals is None:
            _merge_splits_kernel[(count, q_heads)](
                out,
                *parts,
                batch.seq_lens,
                batch.cu_seqlens_q,
                tiles.seq,
                tiles.start,
                sliding_window or 0,
                tokens,
                out.stride(0),
                out.stride(1),
                num_splits,
                NUM_HEADS=q_heads,
                HEAD_DIM=dim,
                D_PAD=d_pad,
                BLOCK_M=tiles.size,
                BLOCK_N=block_n,
                SPLIT_MIN_KEYS=split_min_keys,
                SPLITS_P2=splits_p2,
                HAS_WINDOW=sliding_window is not None,
                **dependent_launch,
            )

    tile_sets = _tile_sets(batch, q.device)  # at most two launches (decode / prompt tiles)
    overlap = envs.ATTENTION_OVERLAP.get()
    if len(tile_sets) < 2 or overlap == "off" or q.device.type != "cuda":
        for tiles in tile_sets:
            launch(tiles)
        return out
    # A mixed pass: the prompt tiles are bound by the tensor cores, the decode tiles by
    # the KV reads, and one after the other they add up (benchmarks/mixed_attention.py).
    # The decode tiles go on a second stream so that the two launches' programs can
    # share the multiprocessors; the caller's stream waits for both.
    main = torch.cuda.current_stream(q.device)
    side = _side_stream(q.device, overlap == "priority")
    side.wait_stream(main)
    for tiles in tile_sets:
        if tiles.size > 16:
            launch(tiles)
    with torch.cuda.stream(side):
        for tiles in tile_sets:
            if tiles.size <= 16:
                launch(tiles)
    main.wait_stream(side)
    return out


@functools.cache
def _side_stream(device: torch.device, high_priority: bool) -> torch.cuda.Stream:
    """The stream that a mixed pass's decode tiles run on (MII_ATTENTION_OVERLAP)."""
    return torch.cuda.Stream(device, priority=-1 if high_priority else 0)


def paged_attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """Rotary + cache write + attention: the fused path (q is rotated in place)."""
    rotary_cache_write(q, k, v, positions, cos_sin, k_cache, v_cache, batch.slot_mapping)
    return paged_attention_from_cache(q, k_cache, v_cache, batch, scale, sliding_window)


# ----- the same path as one opaque PyTorch operator -------------------------------
# torch.compile traces the rest of the model and treats attention as a black box
# (Dynamo cannot trace into Triton launches with host-built tile tables).


@torch.library.custom_op("mii::paged_attention", mutates_args=("q", "k_cache", "v_cache"))
def paged_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    block_tables: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    seq_lens: torch.Tensor,
    small_seq: torch.Tensor,
    small_start: torch.Tensor,
    large_seq: torch.Tensor,
    large_start: torch.Tensor,
    scale: float,
    window: int,
) -> torch.Tensor:
    tiles = [
        TileSet(size, seq, start)
        for size, seq, start in (
            (SMALL_TILE, small_seq, small_start),
            (LARGE_TILE, large_seq, large_start),
        )
        if seq.numel()
    ]
    batch = AttentionBatch(slot_mapping, block_tables, cu_seqlens_q, seq_lens, [], [], tiles)
    return paged_attention_triton(
        q, k, v, positions, cos_sin, k_cache, v_cache, batch, scale, window if window > 0 else None
    )


@paged_attention_op.register_fake
def _(q, k, v, positions, cos_sin, k_cache, v_cache, *rest) -> torch.Tensor:
    return torch.empty_like(q)


@functools.cache
def _no_tiles(device: torch.device) -> torch.Tensor:
    """An empty tile list, made once per device rather than once per layer and pass."""
    return torch.empty(0, dtype=torch.int32, device=device)


def call_paged_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """``paged_attention_triton`` through the custom operator (tiles as tensors)."""
    sets = {t.size: t for t in _tile_sets(batch, q.device)}
    if torch.compiler.is_compiling():  # traced: an op of the graph, not a cached tensor
        empty = torch.empty(0, dtype=torch.int32, device=q.device)
    else:
        empty = _no_tiles(q.device)
    small, large = sets.get(SMALL_TILE), sets.get(LARGE_TILE)
    if len(sets) != (small is not None) + (large is not None):  # a size it has no slot for
        raise ValueError(
            f"tile sizes {sorted(sets)}: the operator takes {SMALL_TILE} and {LARGE_TILE}"
        )
    return paged_attention_op(
        q,
        k,
        v,
        positions,
        cos_sin,
        k_cache,
        v_cache,
        batch.slot_mapping,
        batch.block_tables,
        batch.cu_seqlens_q,
        batch.seq_lens,
        small.seq if small else empty,
        small.start if small else empty,
        large.seq if large else empty,
        large.start if large else empty,
        scale,
        sliding_window or 0,
    )
