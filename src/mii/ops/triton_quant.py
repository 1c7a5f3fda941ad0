"""Per-token float8 quantization of activations, in one Triton launch.

``torch._scaled_mm`` (``ops.fp8_linear``) multiplies float8 activations, each
token (row) with its own scale ``amax(|row|) / 448``. Computed with torch ops
that is six launches, each a full pass over the activations in float32 (cast,
abs, amax, divide, clamp, cast back): on a 4,096-token prompt pass of
Llama-2-7B about as long as the float8 GEMMs saved. This kernel reads each row
twice (the second time from L2) and writes the float8 row and its scale once.

Same numbers as ``fp8_linear.quantize_per_token`` (the torch version, which CPU
code and the tests use): the same float32 scale and reciprocal, the product, the
clamp to +-448 and the round-to-nearest-even cast.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mii.ops import triton_pdl
from mii.ops.dispatch import INTERPRETED
from mii.ops.triton_fp8 import quantize_rows_e4m3, round_to_e4m3

BLOCK = 1024  # columns per step of a row's loops


@triton.jit
def _quantize_rows_kernel(
    X, Q, Scale, K, stride_x, stride_q, BLOCK: tl.constexpr, EMULATE_CAST: tl.constexpr
):
    """Q[row] = X[row] / Scale[row] in e4m3, Scale[row] = amax(|X[row]|) / 448 (1 for
    an all-zero row), one program per row."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    peak = tl.zeros([BLOCK], tl.float32)
    for k0 in range(0, K, BLOCK):
        x = tl.load(X + row * stride_x + k0 + offs, mask=k0 + offs < K, other=0.0)
        peak = tl.maximum(peak, tl.abs(x.to(tl.float32)))
    amax = tl.max(peak, axis=0)
    # IEEE divisions (div_rn; Triton's ``/`` is approximate on the GPU), once per row.
    # An all-zero row: scale 1 (no 0 / 0); a tiny one: 448 / amax stays finite.
    amax = tl.where(amax > 0, tl.maximum(amax, 1e-30), 448.0)
    scale = tl.math.div_rn(amax, 448.0)
    inverse = tl.math.div_rn(448.0, amax)
    tl.store(Scale + row, scale)
    for k0 in range(0, K, BLOCK):
        mask = k0 + offs < K
        x = tl.load(X + row * stride_x + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.minimum(tl.maximum(x * inverse, -448.0), 448.0)
        if EMULATE_CAST:  # the CPU interpreter's float8 cast mis-rounds (ops/triton_fp8.py)
            v = round_to_e4m3(v)
        tl.store(Q + row * stride_q + k0 + offs, v.to(tl.float8e4nv), mask=mask)


def _float8_outputs(
    x: torch.Tensor, scale_columns: int, name: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks x [M, K] (rows contiguous) for ``name``; the empty float8 [M, K] values
    and float32 [M, scale_columns] scales to fill."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"{name} needs x [M, K] with contiguous rows")
    rows, k = x.shape
    return (
        torch.empty(rows, k, device=x.device, dtype=torch.float8_e4m3fn),
        torch.empty(rows, scale_columns, device=x.device, dtype=torch.float32),
    )


def quantize_per_token_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] (16/32-bit, rows contiguous) -> (float8 e4m3 [M, K], float32 scales
    [M, 1]), as ``fp8_linear.quantize_per_token``."""
    xq, scale = _float8_outputs(x, 1, "quantize_per_token_fp8")
    rows, k = x.shape
    if rows:
        _quantize_rows_kernel[(rows,)](
            x,
            xq,
            scale,
            k,
            x.stride(0),
            xq.stride(0),
            BLOCK=BLOCK,
            EMULATE_CAST=INTERPRETED,
            num_warps=4,
        )
    return xq, scale


GROUPS_PER_PROGRAM = 4


@triton.jit
def _quantize_groups_kernel(
    X,
    Q,
    Scale,
    K,
    groups,
    stride_x,
    stride_q,
    GROUP: tl.constexpr,
    GROUPS: tl.constexpr,
    EMULATE: tl.constexpr,
    PDL: tl.constexpr,
):
    """Row ``program_id(0)``'s groups ``GROUPS * program_id(1) ...`` of ``GROUP``
    columns: Q = X / Scale in e4m3, Scale = amax(|group|) / 448 (1 for a zero group)."""
    row = tl.program_id(0).to(tl.int64)
    first = tl.program_id(1) * GROUPS
    group_ids = first + tl.arange(0, GROUPS)
    cols = group_ids[:, None] * GROUP + tl.arange(0, GROUP)[None, :]
    mask = cols < K
    triton_pdl.wait_for_predecessor(PDL)
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    xq, scale = quantize_rows_e4m3(x, EMULATE)
    tl.store(Q + row * stride_q + cols, xq.to(tl.float8e4nv), mask=mask)
    tl.store(Scale + row * groups + group_ids, scale, mask=group_ids < groups)


def quantize_groups_fp8(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [M, K] (16-bit, rows contiguous) -> (float8 e4m3 [M, K], float32 scales
    [M, ceil(K / group)]): each ``group`` columns of a row with their own scale,
    as the float8 skinny kernel's slices (``GemvConfig.x_groups``) read them. The
    same numbers as the kernel's in-loop quantization (``quantize_rows_e4m3``)."""
    if group < 16 or group & (group - 1):
        raise ValueError(f"quantize_groups_fp8 needs a power-of-two group of >= 16, not {group}")
    groups = triton.cdiv(x.shape[-1], group)
    xq, scale = _float8_outputs(x, groups, "quantize_groups_fp8")
    rows, k = x.shape
    if rows:
        _quantize_groups_kernel[(rows, triton.cdiv(groups, GROUPS_PER_PROGRAM))](
            x,
            xq,
            scale,
            k,
            groups,
            x.stride(0),
            xq.stride(0),
            GROUP=group,
            GROUPS=GROUPS_PER_PROGRAM,
            EMULATE=INTERPRETED,
            **triton_pdl.launch_options(x.device, small=True),
            num_warps=4,
        )
    return xq, scale
