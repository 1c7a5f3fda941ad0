"""Linear layers of a few rows (decode batches of 1 to 16 tokens), in Triton.

At batch 1 a decode step is ``y = x Wᵀ`` for every weight of the model, and its
time is the time to read the weights once. This kernel gives each program a
band of ``BLOCK_N`` output rows of ``W`` and streams them along ``K`` in
``BLOCK_K`` slices through a software pipeline (``num_stages`` slices in
flight), multiplying by the few rows of ``x`` on the tensor cores (``x`` padded
to 16 rows, free where the weights' bytes set the pace).

Used by ``models.layers.linear`` on CUDA for at most ``MAX_ROWS`` rows outside
torch.compile (``MII_GEMV=torch`` turns it off); tested on CPU under
``TRITON_INTERPRET=1`` against ``torch.nn.functional.linear``.
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
    rows of W and all M (<= BLOCK_M) rows of X."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
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


# From benchmarks/gemv_sweep.py on an H100 (2026-11-25, docs/performance.md): within
# 0.3 us of the best of 60 settings on each Llama-2-7B projection at 1 and 16 rows.
# 120 KB of bf16 pipeline stages; fewer stages where the GPU has less shared memory.
DEFAULT_CONFIG = GemvConfig(64, 128, num_warps=4, num_stages=6)


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: GemvConfig = DEFAULT_CONFIG,
) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for x of at most ``MAX_ROWS`` rows ([M, K])."""
    rows, k = x.shape
    n = weight.shape[0]
    if rows > MAX_ROWS:
        raise ValueError(f"skinny_linear takes at most {MAX_ROWS} rows, got {rows}")
    if weight.shape[1] != k or weight.stride(1) != 1 or x.stride(1) != 1:
        raise ValueError("skinny_linear needs x [M, K] and weight [N, K], rows contiguous")
    if bias is not None and (bias.shape != (n,) or not bias.is_contiguous()):
        raise ValueError(f"skinny_linear needs a contiguous bias of {n} values")
    if weight.numel() >= 2**31:  # the kernel's offsets are int32
        raise ValueError("skinny_linear takes weights of fewer than 2**31 elements")
    out = torch.empty(rows, n, device=x.device, dtype=x.dtype)
    if rows == 0:
        return out
    stage_bytes = (config.block_n + MAX_ROWS) * config.block_k * x.element_size()
    _skinny_linear_kernel[(triton.cdiv(n, config.block_n),)](
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
        BLOCK_M=MAX_ROWS,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
        num_warps=config.num_warps,
        num_stages=triton_limits.stages_that_fit(config.num_stages, stage_bytes, x.device),
    )
    return out
