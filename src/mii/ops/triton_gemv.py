"""Linear layers of decode batches (a few to a few hundred rows), in Triton.

At batch 1 a decode step is ``y = x Wᵀ`` for every weight of the model, and its
time is the time to read the weights once. This kernel gives each program a
band of ``BLOCK_N`` output rows of ``W`` and ``BLOCK_M`` rows of ``x`` and
streams them along ``K`` in ``BLOCK_K`` slices through a software pipeline
(``num_stages`` slices in flight) onto the tensor cores (``x`` padded to 16 rows,
free where the weights' bytes set the pace). Past ``BLOCK_M`` rows, the programs
of one weight band are launched next to each other, so the band is read from
memory once and from the L2 cache by the others.

Used by ``models.layers.linear`` on CUDA for at most ``MAX_ROWS`` rows outside
torch.compile (``MII_GEMV=torch`` turns it off); larger batches stay with cuBLAS
until ``benchmarks/gemv_sweep.py --rows 64 128 256`` shows the kernel ahead.
Tested on CPU under ``TRITON_INTERPRET=1`` against ``torch.nn.functional.linear``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from mii.ops import triton_limits
from mii.ops.dispatch import INTERPRETED, SKINNY_MAX_ROWS

MAX_ROWS = SKINNY_MAX_ROWS


@triton.jit(do_not_specialize=["M"])
def _skinny_linear_kernel(
    X,
    W,
    Bias,
    Out,
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_om,
    HAS_BIAS: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """Out[m, n] = sum_k X[m, k] W[n, k] (+ Bias[n]) for this program's BLOCK_N
    rows of W and BLOCK_M rows of X (row tiles vary fastest: one weight band's
    programs run together)."""
    row_tiles = tl.cdiv(M, BLOCK_M)
    band = tl.program_id(0) // row_tiles
    offs_n = band * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = (tl.program_id(0) - band * row_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, BLOCK_K)
    n_mask = offs_n < N
    m_mask = offs_m < M
    acc = tl.zeros([BLOCK_N, BLOCK_M], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = (k0 + offs_k) < K
        w = tl.load(
            W + offs_n[:, None] * stride_wn + (k0 + offs_k)[None, :],
            mask=n_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        x = tl.load(
            X + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :],
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        if UPCAST:  # the CPU interpreter's bf16/fp16 dot is wrong: compute in fp32 there
            w = w.to(tl.float32)
            x = x.to(tl.float32)
        if IEEE:  # Triton needs a constexpr branch here
            acc += tl.dot(w, tl.trans(x), input_precision="ieee")
        else:
            acc += tl.dot(w, tl.trans(x))
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    tl.store(
        Out + offs_m[None, :] * stride_om + offs_n[:, None],
        acc.to(Out.dtype.element_ty),
        mask=n_mask[:, None] & m_mask[None, :],
    )


class GemvConfig(NamedTuple):
    """A launch of the skinny linear kernel."""

    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 4
    block_m: int = 16  # rows of x per program (at least 16: the tensor cores' minimum)


# From benchmarks/gemv_sweep.py on an H100 (2026-11-25, docs/performance.md): within
# 0.3 us of the best of 44 settings on each Llama-2-7B projection at 1 and 16 rows.
# 120 KB of bf16 pipeline stages; fewer stages where the GPU has less shared memory.
DEFAULT_CONFIG = GemvConfig(64, 128, num_warps=4, num_stages=6)
# Past 16 rows (not routed here yet; a first guess for the sweep to beat).
WIDE_CONFIG = GemvConfig(128, 64, num_warps=4, num_stages=3, block_m=64)


def config_for(rows: int) -> GemvConfig:
    """The launch for a batch of ``rows``."""
    return DEFAULT_CONFIG if rows <= MAX_ROWS else WIDE_CONFIG


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for x of shape [M, K] (tuned for M <= ``MAX_ROWS``)."""
    rows, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k or weight.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError("skinny_linear needs x [M, K] and weight [N, K], rows contiguous")
    if bias is not None and (bias.shape != (n,) or not bias.is_contiguous()):
        raise ValueError(f"skinny_linear needs a contiguous bias of {n} values")
    if weight.numel() >= 2**31:  # the kernel's offsets are int32
        raise ValueError("skinny_linear takes weights of fewer than 2**31 elements")
    out = torch.empty(rows, n, device=x.device, dtype=x.dtype)
    if rows == 0:
        return out
    config = config or config_for(rows)
    stage_bytes = (config.block_n + config.block_m) * config.block_k * x.element_size()
    grid = (triton.cdiv(n, config.block_n) * triton.cdiv(rows, config.block_m),)
    _skinny_linear_kernel[grid](
        x,
        weight,
        bias if bias is not None else weight,
        out,
        rows,
        n,
        k,
        x.stride(0),
        weight.stride(0),
        out.stride(0),
        HAS_BIAS=bias is not None,
        IEEE=x.dtype == torch.float32,
        UPCAST=INTERPRETED and x.dtype != torch.float32,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        num_warps=config.num_warps,
        num_stages=triton_limits.stages_that_fit(config.num_stages, stage_bytes, x.device),
    )
    return out
