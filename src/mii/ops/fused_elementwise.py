"""Fused elementwise kernels of the decoder layer, in Triton.

Eagerly, RMSNorm is seven kernels (a float32 copy, square, mean, rsqrt, two
multiplies, a cast) and the gated MLP's ``act(gate) * up`` two more; each reads
and writes the whole activation. Here each is one kernel that reads its inputs
once:

- ``rms_norm``: optionally adds the residual first (``x + residual``, rounded to
  the activation dtype as the unfused model rounds it, and returned as the new
  residual), then normalises in float32;
- ``act_and_mul``: ``act(gate) * up`` over the fused gate/up projection output.

Rounding follows the torch code they replace (``models.layers``): the norm's
result is cast to the activation dtype before the weight multiply (Hugging
Face's Llama order; Gemma's ``1 + w`` variant multiplies in float32), and the
activation is rounded before the multiply by ``up``. Used on CUDA outside
torch.compile (which fuses these itself); tested on CPU under
``TRITON_INTERPRET=1`` against the torch code.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from mii.ops import fp8_activations, triton_pdl
from mii.ops.dispatch import FUSED_ACTIVATIONS, INTERPRETED
from mii.ops.triton_fp8 import quantize_rows_e4m3

# The CPU interpreter's float8 cast mis-rounds: quantize_rows_e4m3 emulates it there.
INTERPRETED_FP8 = tl.constexpr(INTERPRETED)


@triton.jit
def _cast(x, dtype: tl.constexpr, ROUND: tl.constexpr):
    """``x.to(dtype)``; ``ROUND``: round float32 to nearest-even bfloat16 by hand
    first, because the CPU interpreter truncates that cast (the GPU rounds)."""
    if ROUND:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _rms_norm_kernel(
    X,
    Residual,
    Out,
    ResidualOut,
    W,
    stride_x,
    stride_r,
    stride_o,
    stride_ro,
    N,
    eps,
    Q,
    QScale,
    stride_q,
    groups,
    HAS_RESIDUAL: tl.constexpr,
    GEMMA: tl.constexpr,
    ROUND: tl.constexpr,
    BLOCK: tl.constexpr,
    COLS: tl.constexpr,
    SLICE: tl.constexpr,
    PDL: tl.constexpr,
):
    """Out = norm(X (+ Residual)) (* W) for COLS columns of one row (program_id(1)-th
    block; COLS == BLOCK: the whole row); with SLICE, also their float8 copy in slices
    of SLICE columns (``_store_fp8_slices``). With COLS < BLOCK each program of a row
    computes the whole row's mean square (the same sum as one program's) and writes
    only its columns: a few rows' norm and quantization spread over many programs."""
    triton_pdl.wait_for_predecessor(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = _row_input(X + row * stride_x, Residual + row * stride_r, cols, mask, HAS_RESIDUAL,
                   ResidualOut.dtype.element_ty, ROUND)  # fmt: skip
    mean_square = tl.sum(x * x, 0) / N
    if COLS < BLOCK:  # this program's columns: read again (from the L2 cache)
        cols = tl.program_id(1) * COLS + tl.arange(0, COLS)
        mask = cols < N
        x = _row_input(X + row * stride_x, Residual + row * stride_r, cols, mask, HAS_RESIDUAL,
                       ResidualOut.dtype.element_ty, ROUND)  # fmt: skip
    if HAS_RESIDUAL:
        tl.store(
            ResidualOut + row * stride_ro + cols, x.to(ResidualOut.dtype.element_ty), mask=mask
        )
    y = x / tl.sqrt(mean_square + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if GEMMA:  # noqa: SIM108 (Triton needs a constexpr branch here)
        out = y * (1.0 + w)
    else:
        out = _cast(y, Out.dtype.element_ty, ROUND).to(tl.float32) * w
    out = _cast(out, Out.dtype.element_ty, ROUND)
    tl.store(Out + row * stride_o + cols, out, mask=mask)
    if SLICE > 0:
        first = tl.program_id(1) * (COLS // SLICE)
        _store_fp8_slices(
            out, cols, mask, Q + row * stride_q, QScale + row * groups, first, groups, COLS, SLICE
        )


@triton.jit
def _row_input(
    X, Residual, cols, mask, HAS_RESIDUAL: tl.constexpr, dtype: tl.constexpr, ROUND: tl.constexpr
):
    """X[cols] in float32, or X + Residual rounded to ``dtype`` first (as the unfused
    model rounds the new residual), the values the norm is taken of."""
    x = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(Residual + cols, mask=mask, other=0.0).to(tl.float32)
        x = _cast(x + r, dtype, ROUND).to(tl.float32)
    return x


@triton.jit
def _store_fp8_slices(
    x, cols, mask, Q, QScale, first, groups, BLOCK: tl.constexpr, SLICE: tl.constexpr
):
    """x [BLOCK] (a row's columns ``cols``, already in the output dtype) quantized to
    e4m3 per SLICE columns, as ``ops.triton_quant.quantize_groups_fp8`` computes it
    from the stored row: values at Q + cols, scales at QScale + first + slice index
    (slices past ``groups`` not stored; masked columns are zeros, as its loads)."""
    tile = tl.reshape(tl.where(mask, x, 0.0), [BLOCK // SLICE, SLICE])
    xq, scale = quantize_rows_e4m3(tile, INTERPRETED_FP8)
    tl.store(
        Q + tl.reshape(cols, [BLOCK // SLICE, SLICE]),
        xq.to(tl.float8e4nv),
        mask=tl.reshape(mask, [BLOCK // SLICE, SLICE]),
    )
    ids = first + tl.arange(0, BLOCK // SLICE)
    tl.store(QScale + ids, scale, mask=ids < groups)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    gemma: bool = False,
    residual: torch.Tensor | None = None,
    fp8_slices: int = 0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dimension; with ``residual``, of ``x + residual``,
    returning ``(normalised, x + residual)``. ``gemma``: scale by ``1 + weight``.
    ``fp8_slices``: also the result's float8 copy in slices of that many columns,
    attached to it (``ops.fp8_activations``)."""
    shape, n = x.shape, x.shape[-1]
    rows = x.reshape(-1, n)
    out = torch.empty_like(rows)
    if residual is not None:
        res = residual.reshape(-1, n)
        res_out = torch.empty_like(rows)
    else:
        res = res_out = rows  # unused
    block = triton.next_power_of_2(n)
    slices, q, q_scale = _fp8_copy(rows, fp8_slices, block)
    # With a float8 copy (decode rows) each program writes one slice, taking the whole
    # row's mean square: one program per row quantized all of a row's slices (Llama-2-7B:
    # 16) alone, and lost to a launch of its own (fp8_activations). Without a copy the
    # same split lost 0.6 % (bf16 Llama-2-7B batch 1, H200, 2026-12-04: 248.1 / 248.1 vs
    # 249.7 / 249.7 tok/s), so a program writes the whole row.
    cols = slices or block
    if rows.shape[0]:
        _rms_norm_kernel[(rows.shape[0], triton.cdiv(n, cols))](
            rows,
            res,
            out,
            res_out,
            weight,
            rows.stride(0),
            res.stride(0),
            out.stride(0),
            res_out.stride(0),
            n,
            eps,
            q,
            q_scale,
            q.stride(0),
            q_scale.shape[-1],
            HAS_RESIDUAL=residual is not None,
            GEMMA=gemma,
            ROUND=_interpreted_bf16(x),
            BLOCK=block,
            COLS=cols,
            SLICE=slices,
            num_warps=_warps(n),
            **triton_pdl.launch_options(x.device, small=True),
        )
    normed = out.view(shape)
    if slices:
        fp8_activations.attach(normed, q, q_scale, slices)
    if residual is None:
        return normed
    return normed, res_out.view(shape)


@triton.jit
def gated_activation(gate, up, dtype: tl.constexpr, ACT: tl.constexpr, ROUND: tl.constexpr):
    """act(gate) * up in ``dtype`` from float32 gate and up (ACT: the code of
    ``FUSED_ACTIVATIONS``), rounded as the unfused model rounds: the activation
    cast first, then the product."""
    if ACT == 0:  # silu
        act = gate / (1.0 + tl.exp(tl.minimum(-gate, 80.0)))  # no overflow to inf
    else:  # gelu, tanh approximation; tanh(z) = 2 sigmoid(2z) - 1
        z = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        act = 0.5 * gate * (2.0 / (1.0 + tl.exp(tl.minimum(-2.0 * z, 80.0))))
    act = _cast(act, dtype, ROUND).to(tl.float32)
    return _cast(act * up, dtype, ROUND)


@triton.jit
def _act_and_mul_kernel(
    X,
    Out,
    stride_x,
    stride_o,
    N,
    Q,
    QScale,
    stride_q,
    groups,
    ACT: tl.constexpr,
    ROUND: tl.constexpr,
    BLOCK: tl.constexpr,
    SLICE: tl.constexpr,
    PDL: tl.constexpr,
):
    """BLOCK columns of one row: Out = act(gate) * up; with SLICE, also their float8
    copy in slices of SLICE columns (``_store_fp8_slices``)."""
    triton_pdl.wait_for_predecessor(PDL)
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + N + cols, mask=mask, other=0.0).to(tl.float32)
    out = gated_activation(gate, up, Out.dtype.element_ty, ACT, ROUND)
    tl.store(Out + row * stride_o + cols, out, mask=mask)
    if SLICE > 0:
        first = tl.program_id(1) * (BLOCK // SLICE)
        _store_fp8_slices(
            out, cols, mask, Q + row * stride_q, QScale + row * groups, first, groups, BLOCK, SLICE
        )


def act_and_mul(gate_up: torch.Tensor, activation: str, fp8_slices: int = 0) -> torch.Tensor:
    """``act(gate) * up`` where ``gate_up`` is ``[..., 2 * I]`` (gate first).
    ``fp8_slices``: also the result's float8 copy in slices of that many columns,
    attached to it (``ops.fp8_activations``)."""
    if activation not in FUSED_ACTIVATIONS:
        raise ValueError(f"no fused kernel for activation {activation!r}")
    n = gate_up.shape[-1] // 2
    rows = gate_up.reshape(-1, 2 * n)
    out = torch.empty(rows.shape[0], n, dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(n))
    slices, q, q_scale = _fp8_copy(out, fp8_slices, block)
    if rows.shape[0]:
        _act_and_mul_kernel[(rows.shape[0], triton.cdiv(n, block))](
            rows,
            out,
            rows.stride(0),
            out.stride(0),
            n,
            q,
            q_scale,
            q.stride(0),
            q_scale.shape[-1],
            ACT=FUSED_ACTIVATIONS[activation],
            ROUND=_interpreted_bf16(gate_up),
            BLOCK=block,
            SLICE=slices,
            num_warps=4,
            **triton_pdl.launch_options(gate_up.device, small=True),
        )
    result = out.view(*gate_up.shape[:-1], n)
    if slices:
        fp8_activations.attach(result, q, q_scale, slices)
    return result


def _fp8_copy(out: torch.Tensor, slices: int, block: int) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(slice width, float8 values [M, K], float32 scales [M, slices per row]) for a
    kernel writing ``out`` [M, K] ``block`` columns per program; width 0 (and unused
    placeholders) where no copy is asked for or its slices do not tile the block
    (a 16-bit output only: the float8 kernel quantizes only those)."""
    if not slices or block % slices or out.dtype == torch.float32:
        return 0, out, out
    rows, k = out.shape
    values = torch.empty(rows, k, device=out.device, dtype=torch.float8_e4m3fn)
    return slices, values, torch.empty(rows, triton.cdiv(k, slices), device=out.device)


def _interpreted_bf16(x: torch.Tensor) -> bool:
    return INTERPRETED and x.dtype == torch.bfloat16


def _warps(n: int) -> int:
    return 4 if n <= 2048 else 8 if n <= 8192 else 16
