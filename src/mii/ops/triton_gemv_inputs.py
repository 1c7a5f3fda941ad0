"""Input stages folded into the skinny linear kernel (``ops.triton_gemv``): the
kernel computes its input from what the small kernel before it would have read,
slice by slice as its weight loop reads it, and that kernel's launch goes.

- An RMSNorm (``skinny_norm_linear``, ``MII_FUSED_NORM_LINEAR=on``): at batch 1
  the norm in front of qkv and gate_up is 64 launches per Llama-2-7B token
  (0.14 ms with PDL off: eighth session's profile). Each program first reads its
  rows whole for their mean square (from L2 after the first program), then
  normalises each slice with the rounding of ``ops.fused_elementwise.rms_norm``:
  the same output but for the mean square's summation order. One program per row
  tile writes the residual stream's new value.
- act(gate) * up (``skinny_act_linear``, ``MII_FUSED_ACT_LINEAR=on``): the down
  projection reads gate and up and applies ``fused_elementwise.gated_activation``,
  the act_and_mul kernel's own code: the same input, bit for bit (32 launches per
  Llama-2-7B token, 0.047 ms with PDL off).
"""

from __future__ import annotations

import triton
import triton.language as tl

from mii.ops.fused_elementwise import _cast, gated_activation


@triton.jit
def _norm_input(
    X, Residual, offs_m, m_mask, cols, k_mask, stride_xm, stride_rm,
    NORM: tl.constexpr, ROUND: tl.constexpr,
):  # fmt: skip
    """[BLOCK_M, cols] of the norm's input in float32: X, or (NORM 2) X + Residual
    rounded to X's dtype, as the unfused model adds them."""
    mask = m_mask[:, None] & k_mask[None, :]
    h = tl.load(X + offs_m[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
    h = h.to(tl.float32)
    if NORM == 2:
        r = tl.load(Residual + offs_m[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0)
        h = _cast(h + r.to(tl.float32), X.dtype.element_ty, ROUND).to(tl.float32)
    return h


@triton.jit
def norm_rows(
    X, Residual, ResidualOut, offs_m, m_mask, K, eps, stride_xm, stride_rm, stride_ro, writes,
    NORM: tl.constexpr, ROUND: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """sqrt(mean(h^2) + eps) of each row h of the norm's input ([BLOCK_M]); with
    ``writes`` and a residual, h (the residual stream's new value) to ResidualOut."""
    squares = tl.zeros([BLOCK_M], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        k_mask = cols < K
        h = _norm_input(
            X, Residual, offs_m, m_mask, cols, k_mask, stride_xm, stride_rm, NORM, ROUND
        )
        if NORM == 2:  # noqa: SIM102 (a constexpr test, then a runtime one)
            if writes:
                tl.store(
                    ResidualOut + offs_m[:, None] * stride_ro + cols[None, :],
                    h.to(ResidualOut.dtype.element_ty),
                    mask=m_mask[:, None] & k_mask[None, :],
                )
        squares += tl.sum(h * h, axis=1)
    return tl.sqrt(squares / K + eps)


@triton.jit
def normed_slice(
    X, Residual, NormW, offs_m, m_mask, cols, k_mask, denom, stride_xm, stride_rm,
    NORM: tl.constexpr, GEMMA: tl.constexpr, ROUND: tl.constexpr,
):  # fmt: skip
    """The RMSNorm's output for [BLOCK_M, cols], in X's dtype, with the rounding of
    ``ops.fused_elementwise.rms_norm``: normalised, cast, times the weight, cast
    (Gemma: times 1 + weight in float32, cast once)."""
    dtype = X.dtype.element_ty
    h = _norm_input(X, Residual, offs_m, m_mask, cols, k_mask, stride_xm, stride_rm, NORM, ROUND)
    y = h / denom[:, None]
    g = tl.load(NormW + cols, mask=k_mask, other=0.0).to(tl.float32)
    if GEMMA:  # noqa: SIM108 (Triton needs a constexpr branch here)
        y = y * (1.0 + g)[None, :]
    else:
        y = _cast(y, dtype, ROUND).to(tl.float32) * g[None, :]
    return _cast(y, dtype, ROUND)


@triton.jit
def gated_slice(
    X, offs_m, m_mask, cols, k_mask, stride_xm, K,
    ACT: tl.constexpr, ROUND: tl.constexpr,
):  # fmt: skip
    """act(gate) * up for [BLOCK_M, cols] from X = [gate | up] (K columns each) in X's
    dtype, as ``ops.fused_elementwise.act_and_mul`` writes it."""
    mask = m_mask[:, None] & k_mask[None, :]
    here = X + offs_m[:, None] * stride_xm + cols[None, :]
    gate = tl.load(here, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(here + K, mask=mask, other=0.0).to(tl.float32)
    return gated_activation(gate, up, X.dtype.element_ty, ACT, ROUND)
