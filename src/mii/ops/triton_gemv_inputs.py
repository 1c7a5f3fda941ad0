"""Input stages folded into the skinny linear kernel (``ops.triton_gemv``): the
kernel computes its input from what the small kernel before it would have read,
slice by slice as its weight loop reads it, and that kernel's launch goes.

- An RMSNorm (``skinny_norm_linear``, ``MII_FUSED_NORM_LINEAR=on``): at batch 1
  the norm in front of qkv and gate_up is 64 launches per Llama-2-7B token
  (0.14 ms with PDL off: eighth session's profile). The product is linear in the
  norm's input, so W (h g / rms) = (W (h g)) / rms: the loop multiplies h * g
  (cast to X's dtype) and sums h^2 beside it, and the sums are divided by each
  row's root mean square at the end. (A first version read the rows whole for the
  mean square before the loop, a chain of dependent loads: on an H200 it made a
  Llama-2-7B token 2.6x slower.) The rounding differs from rms_norm's (h g is
  cast, not h / rms and then its product with g): within a unit in the last
  place. One program per row tile writes the residual stream's new value.
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
def weighted_slice(
    X, Residual, ResidualOut, NormW, offs_m, m_mask, cols, k_mask, squares, writes,
    stride_xm, stride_rm, stride_ro,
    NORM: tl.constexpr, GEMMA: tl.constexpr, ROUND: tl.constexpr,
):  # fmt: skip
    """(h * g in X's dtype, ``squares`` + each row's sum of h^2 over ``cols``) for
    [BLOCK_M, cols] of the norm's input h and its weight g (Gemma: 1 + g); with
    ``writes`` and a residual, h (the residual stream's new value) to ResidualOut.
    The caller divides its sums by the rows' root mean square once at the end."""
    mask = m_mask[:, None] & k_mask[None, :]
    h = _norm_input(X, Residual, offs_m, m_mask, cols, k_mask, stride_xm, stride_rm, NORM, ROUND)
    if NORM == 2:  # noqa: SIM102 (a constexpr test, then a runtime one)
        if writes:
            out = ResidualOut + offs_m[:, None] * stride_ro + cols[None, :]
            tl.store(out, h.to(ResidualOut.dtype.element_ty), mask=mask)
    # g as a [BLOCK_M, cols] tile of the valid rows, not a vector: a load of one
    # 16-bit value per thread stays out of the software pipeline, and its latency
    # then showed in every trip of the weight loop.
    g = tl.load(NormW + offs_m[:, None] * 0 + cols[None, :], mask=mask, other=0.0)
    g = g.to(tl.float32)
    if GEMMA:
        g = 1.0 + g
    return _cast(h * g, X.dtype.element_ty, ROUND), squares + tl.sum(h * h, axis=1)


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
