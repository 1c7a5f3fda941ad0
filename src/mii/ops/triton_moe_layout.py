"""Mixture-of-experts routing layout on the device, in Triton.

The grouped expert GEMM (``ops/triton_moe.py``) reads the (token, expert) pairs
of a batch sorted by expert, each expert's run padded to a multiple of the row
block, so that every row block belongs to one expert (``align_by_expert``). The
layout's size depends only on the shapes, so it can be captured in a CUDA graph.

- ``align_by_expert``: the layout of given top-k experts, in one Triton program
  (the torch operations of ``align_by_expert_torch``, its reference, are ~25
  small launches: at decode batch sizes they cost more than reading the experts'
  weights); past ``ONE_PROGRAM_LAYOUT_MAX`` the torch operations, which spread
  over the GPU.
- ``route_and_align``: the router's softmax, top-k and renormalisation and the
  layout, in one program (``MII_MOE_ROUTING=fused``).

Tested against the torch operations on CPU under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mii.ops import triton_pdl
from mii.ops.dispatch import INTERPRETED


# The pass's sizes are loop bounds here, never a tile's shape: not specialised, or
# Triton compiles a variant per pattern of (== 1, divisible by 16) over them, and
# eager passes no CUDA graph captured reach new ones mid-serving (Mixtral: 33-127
# tokens, not a multiple of 16, under MII_MOE_ROUTING=auto; see the attention
# kernel's note on the stall).
@triton.jit(do_not_specialize=["num_pairs", "capacity", "num_blocks"])
def _align_kernel(
    Experts,
    SortedPairs,
    BlockExpert,
    num_pairs,
    capacity,
    num_blocks,
    NUM_EXPERTS: tl.constexpr,
    EXPERTS_P2: tl.constexpr,
    BLOCK_M: tl.constexpr,
    CHUNK: tl.constexpr,
    PDL: tl.constexpr,
):
    """``align_by_expert`` in one program: count each expert's pairs, pad the runs
    to BLOCK_M, then place each pair at its expert's next slot in pair order (a
    stable sort), and name each row block's expert. Chunks of CHUNK pairs carry
    the per-expert running counts from one to the next. (Also the last step of
    ``_route_kernel``, which calls it.)"""
    triton_pdl.wait_for_predecessor(PDL)
    ids = tl.arange(0, EXPERTS_P2)
    counts = tl.zeros([EXPERTS_P2], tl.int32)
    for first in range(0, num_pairs, CHUNK):
        offs = first + tl.arange(0, CHUNK)
        expert = tl.load(Experts + offs, mask=offs < num_pairs, other=-1)
        counts += tl.sum((expert[:, None] == ids[None, :]).to(tl.int32), axis=0)
    padded = (counts + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    padded_end = tl.cumsum(padded, axis=0)
    group_start = padded_end - padded
    for first in range(0, capacity, CHUNK):  # padding rows point past the pairs
        offs = first + tl.arange(0, CHUNK)
        past = tl.full([CHUNK], 0, tl.int32) + num_pairs
        tl.store(SortedPairs + offs, past, mask=offs < capacity)
    tl.debug_barrier()  # the fill lands before the pairs overwrite their slots
    placed = tl.zeros([EXPERTS_P2], tl.int32)
    for first in range(0, num_pairs, CHUNK):
        offs = first + tl.arange(0, CHUNK)
        expert = tl.load(Experts + offs, mask=offs < num_pairs, other=-1)
        onehot = (expert[:, None] == ids[None, :]).to(tl.int32)  # [CHUNK, experts]
        earlier = tl.cumsum(onehot, axis=0) - onehot  # same-expert pairs before, this chunk
        slot = tl.sum(onehot * (earlier + (group_start + placed)[None, :]), axis=1)
        tl.store(SortedPairs + slot, offs, mask=offs < num_pairs)
        placed += tl.sum(onehot, axis=0)
    real = (ids < NUM_EXPERTS)[None, :]
    for first in range(0, num_blocks, CHUNK):
        blocks = first + tl.arange(0, CHUNK)
        # the block's expert: how many experts' padded runs end at or before its first row
        ended = (padded_end[None, :] <= (blocks * BLOCK_M)[:, None]) & real
        owner = tl.sum(ended.to(tl.int32), axis=1)
        owner = tl.where(owner < NUM_EXPERTS, owner, -1)
        tl.store(BlockExpert + blocks, owner, mask=blocks < num_blocks)


@triton.jit(do_not_specialize=["tokens", "capacity", "num_blocks"])
def _route_kernel(
    Logits,
    Weights,
    Experts,
    SortedPairs,
    BlockExpert,
    tokens,
    stride_l,
    capacity,
    num_blocks,
    NUM_EXPERTS: tl.constexpr,
    EXPERTS_P2: tl.constexpr,
    TOP_K: tl.constexpr,
    TOP_K_P2: tl.constexpr,
    RENORMALIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    CHUNK: tl.constexpr,
    TOKEN_CHUNK: tl.constexpr,
    PDL: tl.constexpr,
):
    """One program: each token's softmax over its router logits (float32), its
    TOP_K largest probabilities (lowest expert first among equals), optionally
    renormalised to sum 1, written to Weights/Experts [tokens, TOP_K]; then the
    layout of those pairs (``_align_kernel``)."""
    triton_pdl.wait_for_predecessor(PDL)
    ids = tl.arange(0, EXPERTS_P2)
    slots = tl.arange(0, TOP_K_P2)
    real = (ids < NUM_EXPERTS)[None, :]
    for first in range(0, tokens, TOKEN_CHUNK):
        rows = first + tl.arange(0, TOKEN_CHUNK)
        row_ok = rows < tokens
        logits = tl.load(
            Logits + rows[:, None] * stride_l + ids[None, :],
            mask=row_ok[:, None] & real,
            other=0.0,
        ).to(tl.float32)
        logits = tl.where(real, logits, float("-inf"))  # rows past the end stay finite
        shifted = tl.exp(logits - tl.max(logits, axis=1)[:, None])
        probs = shifted / tl.sum(shifted, axis=1)[:, None]
        remaining = tl.where(real, probs, -1.0)  # padding experts are never chosen
        weights = tl.zeros([TOKEN_CHUNK, TOP_K_P2], tl.float32)
        experts = tl.zeros([TOKEN_CHUNK, TOP_K_P2], tl.int32)
        for k in tl.static_range(TOP_K):
            value = tl.max(remaining, axis=1)
            best = tl.argmax(remaining, axis=1, tie_break_left=True)
            weights = tl.where(slots[None, :] == k, value[:, None], weights)
            experts = tl.where(slots[None, :] == k, best[:, None].to(tl.int32), experts)
            remaining = tl.where(ids[None, :] == best[:, None], -2.0, remaining)
        if RENORMALIZE:
            weights = weights / tl.sum(weights, axis=1)[:, None]
        pairs = rows[:, None] * TOP_K + slots[None, :]
        keep = row_ok[:, None] & (slots < TOP_K)[None, :]
        tl.store(Weights + pairs, weights, mask=keep)
        tl.store(Experts + pairs, experts, mask=keep)
    tl.debug_barrier()  # the experts are written before the layout reads them back
    _align_kernel(
        Experts,
        SortedPairs,
        BlockExpert,
        tokens * TOP_K,
        capacity,
        num_blocks,
        NUM_EXPERTS,
        EXPERTS_P2,
        BLOCK_M,
        CHUNK,
        False,  # waited for above
    )


def align_by_expert(
    experts: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """experts [T, k] -> (sorted_pairs [M], block_expert [M // block_m]), on the device.

    ``sorted_pairs`` lists the flat pair indices (token * k + slot) grouped by
    expert (pair order kept within an expert), each group padded with ``T * k``
    to a multiple of ``block_m``; ``block_expert`` names the expert of every row
    block, -1 past the end. ``M`` depends only on the shapes: ``T * k`` plus the
    worst-case padding. One launch (``align_by_expert_torch`` took ~25 small torch
    ops, which at decode batch sizes cost more than the expert weights' reading)
    while ``one_program_layout`` says one program is enough; the torch operations
    otherwise.
    """
    flat = experts.reshape(-1)
    on_device = flat.device.type == "cuda" or INTERPRETED  # else Triton cannot read it
    if not (on_device and one_program_layout(flat.numel(), num_experts)):
        return align_by_expert_torch(experts, num_experts, block_m)
    num_pairs = flat.numel()
    sorted_pairs, block_expert = _layout_outputs(num_pairs, num_experts, block_m, flat.device)
    experts_p2 = triton.next_power_of_2(num_experts)
    _align_kernel[(1,)](
        flat,
        sorted_pairs,
        block_expert,
        num_pairs,
        sorted_pairs.numel(),
        block_expert.numel(),
        NUM_EXPERTS=num_experts,
        EXPERTS_P2=experts_p2,
        BLOCK_M=block_m,
        CHUNK=_layout_chunk(experts_p2),
        **triton_pdl.launch_options(flat.device, small=True),
        num_warps=4,
    )
    return sorted_pairs, block_expert


# Most (pairs x experts, rounded up to a power of two) the one-program layout takes:
# its loops run num_pairs * experts / 8192 steps on one multiprocessor. Mixtral's
# 4,096-token passes (8,192 pairs x 8 experts: 8 steps per loop) are well inside;
# a 256-expert top-8 model's prompt pass (32,768 pairs: 1,024 steps) would spend
# milliseconds there, so it keeps the torch operations (which spread over the GPU).
ONE_PROGRAM_LAYOUT_MAX = 1 << 18


def one_program_layout(num_pairs: int, num_experts: int) -> bool:
    """Whether one program lays out ``num_pairs`` pairs over ``num_experts`` experts
    quickly enough (``ONE_PROGRAM_LAYOUT_MAX``): all of Mixtral's passes, decode
    batches of up to 128 sequences of a 256-expert top-8 model."""
    return num_pairs * triton.next_power_of_2(num_experts) <= ONE_PROGRAM_LAYOUT_MAX


# Most (token, expert) pairs that MII_MOE_ROUTING=auto routes in one launch. On the
# H200 (2026-12-03, Mixtral layer, moe_fp8.py --routing) the one launch is faster up
# to 128 tokens (256 pairs: 419 vs 435 us per layer; batch 1 126.1 vs 118.9 tok/s)
# and slower from 1,024 (1.59 vs 1.41 ms): its one program's loops grow with the
# pass while the torch operations spread over the GPU.
FUSED_ROUTING_MAX_PAIRS = 256


def fused_routing(mode: str, num_pairs: int, num_experts: int) -> bool:
    """Whether a pass routes through ``route_and_align`` under ``MII_MOE_ROUTING=mode``
    ('auto': small passes; 'fused': every pass one program can lay out; 'torch': none)."""
    if mode == "torch" or not one_program_layout(num_pairs, num_experts):
        return False
    return mode == "fused" or num_pairs <= FUSED_ROUTING_MAX_PAIRS


def _layout_outputs(
    num_pairs: int, num_experts: int, block_m: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Uninitialised (sorted_pairs, block_expert) of the padded layout's size."""
    capacity = _capacity(num_pairs, num_experts, block_m)
    sorted_pairs = torch.empty(capacity, dtype=torch.int32, device=device)
    return sorted_pairs, torch.empty(capacity // block_m, dtype=torch.int32, device=device)


def _layout_chunk(experts_p2: int) -> int:
    """Pairs per step of ``_align_kernel``: its [CHUNK, experts] one-hot stays ~8k values."""
    return max(16, min(1024, 8192 // experts_p2))


def route_and_align(
    logits: torch.Tensor, top_k: int, renormalize: bool, block_m: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights [T, k] float32, experts [T, k] int32,
    sorted_pairs, block_expert) in one launch: ``SparseMoE.route`` (softmax in
    float32, top-k, optional renormalisation) and ``align_by_expert`` together, so
    a decode step's routing is one launch per layer instead of ~6 torch ones.
    Among equal probabilities the lower expert wins. For work that
    ``one_program_layout`` allows (the caller checks)."""
    tokens, num_experts = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    device = logits.device
    weights = torch.empty(tokens, top_k, dtype=torch.float32, device=device)
    experts = torch.empty(tokens, top_k, dtype=torch.int32, device=device)
    sorted_pairs, block_expert = _layout_outputs(tokens * top_k, num_experts, block_m, device)
    experts_p2 = triton.next_power_of_2(num_experts)
    _route_kernel[(1,)](
        logits,
        weights,
        experts,
        sorted_pairs,
        block_expert,
        tokens,
        logits.stride(0),
        sorted_pairs.numel(),
        block_expert.numel(),
        NUM_EXPERTS=num_experts,
        EXPERTS_P2=experts_p2,
        TOP_K=top_k,
        TOP_K_P2=triton.next_power_of_2(top_k),
        RENORMALIZE=renormalize,
        BLOCK_M=block_m,
        CHUNK=_layout_chunk(experts_p2),
        TOKEN_CHUNK=max(1, min(128, 4096 // experts_p2)),  # a [tokens, experts] tile
        **triton_pdl.launch_options(device, small=True),
        num_warps=4,
    )
    return weights, experts, sorted_pairs, block_expert


def _capacity(num_pairs: int, num_experts: int, block_m: int) -> int:
    """Rows of the padded layout: every pair, plus up to block_m - 1 per non-empty expert."""
    groups = min(num_experts, num_pairs)  # at most this many experts are non-empty
    return triton.cdiv(num_pairs + groups * (block_m - 1), block_m) * block_m


def align_by_expert_torch(
    experts: torch.Tensor, num_experts: int, block_m: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``align_by_expert`` in torch operations (the reference of its kernel)."""
    flat = experts.reshape(-1)
    num_pairs = flat.numel()
    capacity = _capacity(num_pairs, num_experts, block_m)
    order = torch.argsort(flat, stable=True)
    # scatter_add, not bincount: bincount reads the maximum on the host.
    counts = torch.zeros(num_experts, dtype=flat.dtype, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    padded_end = torch.cumsum(padded, 0)
    start = torch.cumsum(counts, 0) - counts
    sorted_expert = flat.index_select(0, order)
    rank = torch.arange(num_pairs, device=flat.device) - start.index_select(0, sorted_expert)
    group_start = (padded_end - padded).index_select(0, sorted_expert)
    sorted_pairs = torch.full((capacity,), num_pairs, dtype=torch.int32, device=flat.device)
    sorted_pairs.scatter_(0, group_start + rank, order.to(torch.int32))
    block_starts = torch.arange(0, capacity, block_m, device=flat.device)
    block_expert = torch.searchsorted(padded_end, block_starts, right=True)
    block_expert = torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)
    return sorted_pairs, block_expert
