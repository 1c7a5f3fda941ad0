"""Grouped expert GEMM for mixture-of-experts layers, in Triton.

The (token, expert) pairs of a batch are sorted by expert on the device and
each expert's run of pairs is padded to a multiple of ``BLOCK_M``, so that
every row block of the sorted order belongs to one expert
(``ops/triton_moe_layout.py``). One launch then
multiplies every block by its own expert's weight matrix: all experts in one
grid, no Python loop over experts and no host sync (the padded layout has a
size known from the shapes alone, so it can be captured in a CUDA graph).

``moe_grouped_mlp`` is the whole expert MLP in two such launches: gate/up for
every pair (reading the token's row of ``x`` in place, nothing gathered), the
activation, then the down projection scaled by the routing weight, summed over
each token's ``top_k`` pairs.

Float8 experts (``quantization="fp8"``): the weights stay e4m3, one byte each,
with a float32 scale per (expert, output channel). With 16-bit activations (by
default, ``TileConfig.fp8_dot``) each row's ``BLOCK_K`` slice of the activations
is quantized to e4m3 in registers with its own scale and the tensor cores
multiply float8 by float8, each slice's product scaled back before it joins the
float32 sum; otherwise (float32 activations always) each weight tile is
converted to the activations' dtype in registers (exact: e4m3 values are
bfloat16 and float16 values) and the activations are not quantized. Either way
the sum is scaled by its channel's scale once, before the routing weight.

Tested against the torch loop of ``models.moe.SparseMoE`` on CPU under
``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from mii.ops import triton_limits as limits
from mii.ops.dispatch import INTERPRETED
from mii.ops.triton_fp8 import dequantize_e4m3, quantize_rows_e4m3
from mii.ops.triton_moe_layout import align_by_expert


# num_pairs only masks the padding rows: not specialised (see triton_moe_layout's
# note), so decode-sized eager passes compile no variant of their own mid-serving.
@triton.jit(do_not_specialize=["num_pairs"])
def _grouped_gemm_kernel(
    A,
    B,
    B_scale,
    C,
    sorted_pairs,
    block_expert,
    pair_weights,
    A_scale,
    num_pairs,
    N,
    K,
    stride_am,
    stride_be,
    stride_bn,
    stride_cm,
    stride_se,
    stride_as,
    A_ROWS_PER_PAIR: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr,
    B_SCALED: tl.constexpr,
    DEQUANT: tl.constexpr,
    A_FP8: tl.constexpr,
    A_GROUPS: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
    SWAP_AB: tl.constexpr,
):
    """C[pair, n] = sum_k A[row(pair), k] * B[expert, n, k] for the pairs of one
    row block and one column block; ``row(pair)`` is ``pair // A_ROWS_PER_PAIR``
    (the token, for the first projection; the pair itself for the second). With
    B_SCALED, B is float8 and the sum is multiplied by B_scale[expert, n].

    GROUP_M > 0: a 1-D grid in which consecutive programs take GROUP_M row blocks
    (mostly one expert's) down every column block, so that those rows of A and
    that expert's columns of B are read from L2 rather than memory again
    (``TileConfig.group_m``); else a 2-D grid, row blocks varying fastest.

    SWAP_AB: the tensor cores compute the transposed tile, B's BLOCK_N columns as
    the rows of the product and the pairs as its columns (``TileConfig.swap_ab``)."""
    if GROUP_M > 0:
        row_blocks = tl.num_programs(0) // tl.cdiv(N, BLOCK_N)
        per_group = GROUP_M * tl.cdiv(N, BLOCK_N)
        first_m = tl.program_id(0) // per_group * GROUP_M
        group_rows = tl.minimum(row_blocks - first_m, GROUP_M)
        within = tl.program_id(0) % per_group
        pid_m = first_m + within % group_rows
        pid_n = within // group_rows
    else:
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
    expert = tl.load(block_expert + pid_m)
    if expert < 0:
        return  # a block past the end of the padded layout
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_pairs + offs_m)
    valid = pairs < num_pairs  # padding rows carry num_pairs
    rows = pairs // A_ROWS_PER_PAIR
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = A + rows[:, None].to(tl.int64) * stride_am + offs_k[None, :]
    b_base = B + expert.to(tl.int64) * stride_be
    if SWAP_AB:  # B's tile as [BLOCK_N, BLOCK_K], the product's rows
        b_ptrs = b_base + offs_n[:, None] * stride_bn + offs_k[None, :]
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        b_ptrs = b_base + offs_n[None, :] * stride_bn + offs_k[:, None]
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # A_GROUPS: each slice's scales loaded one trip ahead (a load that feeds no dot
    # stays out of Triton's software pipeline: loaded in its own trip, every trip
    # would wait for it; as in ops/triton_gemv.py).
    scales_ahead = tl.full([BLOCK_M], 1.0, tl.float32)
    if A_GROUPS:
        scales_ahead = tl.load(A_scale + rows * stride_as, mask=valid, other=1.0)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k + k0 < K
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        if SWAP_AB:
            b = tl.load(b_ptrs, mask=(offs_n[:, None] < N) & k_ok[None, :], other=0.0)
        else:
            b = tl.load(b_ptrs, mask=k_ok[:, None] & (offs_n[None, :] < N), other=0.0)
        if A_GROUPS:
            # A arrives as float8 already, one scale per row and BLOCK_K slice
            # (TileConfig.a_groups): quantized once, not once per column block.
            a_scale = scales_ahead
            ahead = A_scale + rows * stride_as + (k0 + BLOCK_K) // BLOCK_K
            scales_ahead = tl.load(ahead, mask=valid & (k0 + BLOCK_K < K), other=1.0)
            if UPCAST:  # the interpreter: a float32 dot of the exact float8 values
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc += _scaled_by_row(_tile_dot(a, b, SWAP_AB, UPCAST), a_scale, SWAP_AB)
        elif A_FP8:
            # Float8 experts times float8 activations (TileConfig.fp8_dot): each row's
            # slice quantized with its own scale, the slice's product scaled back.
            aq, a_scale = quantize_rows_e4m3(a, UPCAST)
            if UPCAST:  # the interpreter: float32 dot
                b = b.to(tl.float32)
            acc += _scaled_by_row(_tile_dot(aq, b, SWAP_AB, UPCAST), a_scale, SWAP_AB)
        else:
            if B_SCALED:  # float8 -> a's dtype: exact (e4m3 is a subset of bf16 and fp16)
                b = dequantize_e4m3(b, A.dtype.element_ty, DEQUANT)
            if UPCAST:  # the CPU interpreter's bf16/fp16 dot is wrong: compute in fp32 there
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            acc += _tile_dot(a, b, SWAP_AB, IEEE)  # IEEE: fp32 weights, full precision
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    if SWAP_AB:
        acc = tl.trans(acc)
    if B_SCALED:  # each (expert, output channel)'s scale, once, on the whole sum
        scale_ptrs = B_scale + expert.to(tl.int64) * stride_se + offs_n
        acc = acc * tl.load(scale_ptrs, mask=offs_n < N, other=1.0)[None, :]
    if HAS_WEIGHTS:
        w = tl.load(pair_weights + pairs, mask=valid, other=0.0)
        acc = acc * w[:, None].to(tl.float32)
    c_ptrs = C + pairs[:, None].to(tl.int64) * stride_cm + offs_n[None, :]
    tl.store(c_ptrs, acc.to(C.dtype.element_ty), mask=valid[:, None] & (offs_n[None, :] < N))


@triton.jit
def _tile_dot(a, b, SWAP_AB: tl.constexpr, IEEE: tl.constexpr):
    """a [BLOCK_M, BLOCK_K] times B's tile: [BLOCK_M, BLOCK_N] from b [BLOCK_K,
    BLOCK_N], or with SWAP_AB its transpose [BLOCK_N, BLOCK_M] from b [BLOCK_N,
    BLOCK_K]. IEEE: full float32 precision (fp32 weights, the interpreter)."""
    if SWAP_AB:
        # The weights on the tensor cores' 64-row side: Hopper's float8 wgmma needs
        # 64 rows there, so a 16-pair tile on that side fell back to mma.sync with
        # every float8 weight converted to f16 first (tests/cuda_compile.py).
        left = b
        right = tl.trans(a)
    else:
        left = a
        right = b
    # (one expression per constexpr test: Triton compiles an early return in a
    # constexpr branch as if both branches ran)
    return tl.dot(left, right, input_precision="ieee") if IEEE else tl.dot(left, right)


@triton.jit
def _scaled_by_row(part, row_scale, SWAP_AB: tl.constexpr):
    """``part`` with each pair's row (a column with SWAP_AB) times its scale."""
    return part * row_scale[None, :] if SWAP_AB else part * row_scale[:, None]


class TileConfig(NamedTuple):
    """Tile sizes and launch options of one grouped GEMM launch."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3
    dequant: int = 0  # float8 experts: how they are converted (ops/triton_fp8.py)
    # Float8 experts, 16-bit activations: quantize each row's BLOCK_K slice of the
    # activations to e4m3 in the kernel and multiply float8 by float8 (no conversion
    # of the weights; twice the tensor cores' bf16 rate). ``dequant`` then unused.
    fp8_dot: bool = True
    # With fp8_dot: quantize the activations' BLOCK_K slices once, in a launch of
    # their own (ops/triton_quant.quantize_groups_fp8), instead of in every column
    # block's loop (224 times over for Mixtral's w13). Same numbers.
    a_groups: bool = False
    # Row blocks per group of the L2-friendly program order (see the kernel); 0: the
    # 2-D grid. Not yet measured on a GPU (moe_fp8.py sweeps it).
    group_m: int = 0
    # The product computed transposed, the weights' columns on the tensor cores'
    # 64-row side (the kernel's SWAP_AB), as the skinny decode kernel does: for
    # decode-sized row blocks (16 pairs), wgmma instead of mma.sync (float8 experts:
    # on float8 operands, not on weights converted to f16). See default_tiles.
    swap_ab: bool = False


def default_tiles(num_pairs: int, fp8: bool = False) -> TileConfig:
    """Tiles by batch size, from the sweep of ``benchmarks/kernel_times.py`` on an H100
    (Mixtral-8x7B layer, bf16, 2026-11-25): small row blocks while the launch is
    bound by reading the weights, wide ones for prompts (more reuse per tile).
    Float8 experts (``fp8``), from ``benchmarks/moe_fp8.py`` on an H200 (2026-12-03,
    792186b, 30 settings): float8 products with the activations quantized once per
    GEMM (``a_groups``) won at every size, on 16 x 64 x 512 tiles up to 32 tokens and
    64 x 128 x 128 past that. Timed as the default in the next call: 160 / 409 / 496
    us and 1.57 / 5.59 ms at 1 / 16 / 128 / 1,024 / 4,096 tokens (bf16 experts 245 /
    723 / 807 us, 1.94 / 6.40 ms); one setting timed twice in a call differed by up
    to 8 % (docs/performance.md).
    Decode-sized bf16 launches compute the tile transposed (``swap_ab``): H200,
    2026-12-04, 5ec5b40, Mixtral-8x7B batch 1 131.5 vs 128.7 tok/s, and the swapped
    16 x 64 x 256 tile led the bf16 sweep at 1 and 16 tokens (192.7 / 662.7 us vs 196.2
    / 673.1 unswapped). Float8 decode tiles stay unswapped: 200.2 vs 200.9 tok/s, and
    their float8 wgmma accumulates in less precision than mma.sync's float32."""
    if fp8 and num_pairs <= 64:
        return TileConfig(16, 64, 512, num_warps=4, num_stages=3, a_groups=True)
    if fp8:
        return TileConfig(64, 128, 128, num_warps=8, num_stages=3, a_groups=True)
    if num_pairs <= 8:  # 1-4 tokens
        return TileConfig(16, 64, 128, swap_ab=True)
    if num_pairs <= 64:  # best at 16 tokens: 1.03 ms vs 1.05 ms
        return TileConfig(16, 64, 256, num_warps=4, num_stages=4, swap_ab=True)
    if num_pairs <= 512:  # best at 128 tokens: 1.16 ms vs 1.29 ms for 16x64x128
        return TileConfig(64, 128, 64, num_warps=8, num_stages=4)
    # best at 1024 and 4096 tokens: 2.02 / 6.42 ms vs 2.47 / 7.12 ms for 64x128x64
    return TileConfig(128, 256, 64, num_warps=8, num_stages=3)


def default_down_tiles(num_pairs: int, fp8: bool = False) -> TileConfig | None:
    """The down projection's own tiles where they beat ``default_tiles`` (None: the
    same). From ``benchmarks/moe_fp8.py --down-sweep`` on an H200 (2026-12-03,
    46a55f0, Mixtral-8x7B layer, 18 settings per size): for bf16 experts at 1 token
    16 x 64 x 256 with 4 stages took the layer from 210.3 to 198.8 us; at 16 and 128
    tokens and for float8 experts no setting gained more than 1-2 % (noise)."""
    if not fp8 and num_pairs <= 8:
        return TileConfig(16, 64, 256, num_warps=4, num_stages=4, swap_ab=True)
    return None


def stages_that_fit(
    tiles: TileConfig,
    block_k: int,
    element_size: int,
    device: torch.device,
    b_element_size: int | None = None,
) -> int:
    """``tiles.num_stages``, fewer where the A and B tiles of each stage would not
    fit the shared memory of ``device`` (fp32 tiles take twice the bytes of bf16;
    ``b_element_size``: B's where it differs from A's, 1 for float8 weights)."""
    b_size = element_size if b_element_size is None else b_element_size
    per_stage = (tiles.block_m * element_size + tiles.block_n * b_size) * block_k
    return limits.stages_that_fit(tiles.num_stages, per_stage, device)


def grouped_gemm(
    a: torch.Tensor,
    weight: torch.Tensor,
    sorted_pairs: torch.Tensor,
    block_expert: torch.Tensor,
    num_pairs: int,
    a_rows_per_pair: int,
    tiles: TileConfig,
    pair_weights: torch.Tensor | None = None,
    weight_scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """[num_pairs, N]: each pair's row of ``a`` times its expert's ``weight`` [E, N, K]^T.
    ``sorted_pairs``/``block_expert`` come from ``align_by_expert`` with ``tiles.block_m``.
    A float8 e4m3 ``weight`` comes with ``weight_scale`` [E, N] float32: it stands
    for ``weight * weight_scale[..., None]``."""
    n, k = weight.shape[1], weight.shape[2]
    if a.stride(-1) != 1 or weight.stride(-1) != 1:
        raise ValueError("grouped_gemm needs contiguous rows in a and weight")
    fp8 = weight.dtype == torch.float8_e4m3fn
    if fp8 != (weight_scale is not None):
        raise ValueError("grouped_gemm takes a weight_scale exactly with float8_e4m3fn weights")
    if fp8 and (
        weight_scale.shape != weight.shape[:2]
        or weight_scale.dtype != torch.float32
        or weight_scale.stride(-1) != 1
    ):
        raise ValueError(
            f"grouped_gemm needs a float32 weight_scale of shape {tuple(weight.shape[:2])} "
            "with contiguous rows"
        )
    out = torch.empty(num_pairs, n, dtype=a.dtype, device=a.device)
    block_k = min(tiles.block_k, max(16, triton.next_power_of_2(k)))
    # float32 activations ask for precision: they keep the exact 32-bit products;
    # a float8 dot needs slices of at least 32 (a tiny hidden size, or a TP shard).
    a_fp8 = fp8 and tiles.fp8_dot and a.dtype != torch.float32 and block_k >= 32
    a_groups = a_fp8 and tiles.a_groups
    a_scales = out  # unused without a_groups
    if a_groups:
        from mii.ops.triton_quant import quantize_groups_fp8

        a, a_scales = quantize_groups_fp8(a, block_k)
    grid = (block_expert.numel(), triton.cdiv(n, tiles.block_n))
    if tiles.group_m:
        grid = (grid[0] * grid[1],)
    _grouped_gemm_kernel[grid](
        a,
        weight,
        weight_scale if fp8 else out,  # unused without
        out,
        sorted_pairs,
        block_expert,
        pair_weights if pair_weights is not None else out,  # unused without weights
        a_scales,
        num_pairs,
        n,
        k,
        a.stride(0),
        weight.stride(0),
        weight.stride(1),
        out.stride(0),
        weight_scale.stride(0) if fp8 else 0,
        a_scales.stride(0),
        A_ROWS_PER_PAIR=a_rows_per_pair,
        HAS_WEIGHTS=pair_weights is not None,
        B_SCALED=fp8,
        DEQUANT=tiles.dequant,
        A_FP8=a_fp8,
        A_GROUPS=a_groups,
        IEEE=a.dtype == torch.float32 or INTERPRETED,
        UPCAST=INTERPRETED and (a.dtype != torch.float32 or a_fp8),
        BLOCK_M=tiles.block_m,
        BLOCK_N=tiles.block_n,
        BLOCK_K=block_k,
        GROUP_M=tiles.group_m,
        SWAP_AB=tiles.swap_ab,
        num_warps=tiles.num_warps,
        num_stages=stages_that_fit(
            tiles, block_k, a.element_size(), a.device, weight.element_size()
        ),
    )
    return out


def moe_grouped_mlp(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor],
    tiles: TileConfig | None = None,
    w13_scale: torch.Tensor | None = None,
    w2_scale: torch.Tensor | None = None,
    fused_activation: str | None = None,
    layout: tuple[torch.Tensor, torch.Tensor] | None = None,
    down_tiles: TileConfig | None = None,
) -> torch.Tensor:
    """x [T, H], w13 [E, 2I, H], w2 [E, H, I], routing weights/experts [T, k] -> [T, H]:
    ``sum_k weights[t, k] * down_e(act(gate_e(x_t)) * up_e(x_t))`` with ``e = experts[t, k]``.
    Float8 e4m3 experts come with their scales, ``w13_scale`` [E, 2I] and
    ``w2_scale`` [E, H] (float32, per expert and output channel). With
    ``fused_activation`` (a name in ``ops.fused_elementwise.FUSED_ACTIVATIONS``),
    ``act(gate) * up`` is one launch of the fused kernel, the same numbers as ``act``.
    ``layout``: (sorted_pairs, block_expert) of ``experts`` for ``tiles.block_m``
    when the caller has it (``route_and_align``); computed here otherwise.
    ``down_tiles``: the down projection's tiles where they differ from ``tiles``
    (same ``block_m``: both GEMMs share the layout). At decode sizes its N (the
    hidden size) makes few column blocks, e.g. 64 per expert for Mixtral, so
    narrower ones may fill the GPU better (``benchmarks/moe_fp8.py --down-sweep``)."""
    tokens, top_k = experts.shape
    num_pairs = tokens * top_k
    if tiles is None:
        fp8 = w13_scale is not None
        tiles = default_tiles(num_pairs, fp8)
        down_tiles = down_tiles or default_down_tiles(num_pairs, fp8)
    down_tiles = down_tiles or tiles
    if down_tiles.block_m != tiles.block_m:
        raise ValueError(
            f"down_tiles.block_m ({down_tiles.block_m}) must equal tiles.block_m "
            f"({tiles.block_m}): both GEMMs read one layout"
        )
    if layout is None:
        layout = align_by_expert(experts, w13.shape[0], tiles.block_m)
    sorted_pairs, block_expert = layout
    hidden = grouped_gemm(
        x, w13, sorted_pairs, block_expert, num_pairs, top_k, tiles, None, w13_scale
    )
    if fused_activation is not None:
        from mii.ops.fused_elementwise import act_and_mul

        inner = act_and_mul(hidden, fused_activation)
    else:
        gate, up = hidden.chunk(2, dim=-1)
        inner = (act(gate) * up).contiguous()
    out = grouped_gemm(
        inner,
        w2,
        sorted_pairs,
        block_expert,
        num_pairs,
        1,
        down_tiles,
        weights.reshape(-1),
        w2_scale,
    )
    return out.view(tokens, top_k, -1).sum(dim=1)
