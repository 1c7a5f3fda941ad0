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

from mii.ops import triton_pdl
from mii.ops.dispatch import FUSED_ACTIVATIONS, INTERPRETED


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
    HAS_RESIDUAL: tl.constexpr,
    GEMMA: tl.constexpr,
    ROUND: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    triton_pdl.wait_for_predecessor(PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < N
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(Residual + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
        summed = _cast(x + r, ResidualOut.dtype.element_ty, ROUND)
        tl.store(ResidualOut + row * stride_ro + cols, summed, mask=mask)
        x = summed.to(tl.float32)
    mean_square = tl.sum(x * x, 0) / N
    y = x / tl.sqrt(mean_square + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if GEMMA:  # noqa: SIM108 (Triton needs a constexpr branch here)
        out = y * (1.0 + w)
    else:
        out = _cast(y, Out.dtype.element_ty, ROUND).to(tl.float32) * w
    tl.store(Out + row * stride_o + cols, _cast(out, Out.dtype.element_ty, ROUND), mask=mask)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    gemma: bool = False,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last dimension; with ``residual``, of ``x + residual``,
    returning ``(normalised, x + residual)``. ``gemma``: scale by ``1 + weight``."""
    shape, n = x.shape, x.shape[-1]
    rows = x.reshape(-1, n)
    out = torch.empty_like(rows)
    if residual is not None:
        res = residual.reshape(-1, n)
        res_out = torch.empty_like(rows)
    else:
        res = res_out = rows  # unused
    if rows.shape[0]:
        _rms_norm_kernel[(rows.shape[0],)](
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
            HAS_RESIDUAL=residual is not None,
            GEMMA=gemma,
            ROUND=_interpreted_bf16(x),
            BLOCK=triton.next_power_of_2(n),
            num_warps=_warps(n),
            **triton_pdl.launch_options(x.device),
        )
    if residual is None:
        return out.view(shape)
    return out.view(shape), res_out.view(shape)


@triton.jit
def _act_and_mul_kernel(
    X,
    Out,
    stride_x,
    stride_o,
    N,
    ACT: tl.constexpr,
    ROUND: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    triton_pdl.wait_for_predecessor(PDL)
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < N
    gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + N + cols, mask=mask, other=0.0).to(tl.float32)
    if ACT == 0:  # silu
        act = gate / (1.0 + tl.exp(tl.minimum(-gate, 80.0)))  # no overflow to inf
    else:  # gelu, tanh approximation; tanh(z) = 2 sigmoid(2z) - 1
        z = 0.7978845608028654 * (gate + 0.044715 * gate * gate * gate)
        act = 0.5 * gate * (2.0 / (1.0 + tl.exp(tl.minimum(-2.0 * z, 80.0))))
    act = _cast(act, Out.dtype.element_ty, ROUND).to(tl.float32)
    tl.store(Out + row * stride_o + cols, _cast(act * up, Out.dtype.element_ty, ROUND), mask=mask)


def act_and_mul(gate_up: torch.Tensor, activation: str) -> torch.Tensor:
    """``act(gate) * up`` where ``gate_up`` is ``[..., 2 * I]`` (gate first)."""
    if activation not in FUSED_ACTIVATIONS:
        raise ValueError(f"no fused kernel for activation {activation!r}")
    n = gate_up.shape[-1] // 2
    rows = gate_up.reshape(-1, 2 * n)
    out = torch.empty(rows.shape[0], n, dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(n))
    if rows.shape[0]:
        _act_and_mul_kernel[(rows.shape[0], triton.cdiv(n, block))](
            rows,
            out,
            rows.stride(0),
            out.stride(0),
            n,
            ACT=FUSED_ACTIVATIONS[activation],
            ROUND=_interpreted_bf16(gate_up),
            BLOCK=block,
            num_warps=4,
            **triton_pdl.launch_options(gate_up.device),
        )
    return out.view(*gate_up.shape[:-1], n)


def _interpreted_bf16(x: torch.Tensor) -> bool:
    return INTERPRETED and x.dtype == torch.bfloat16


def _warps(n: int) -> int:
    return 4 if n <= 2048 else 8 if n <= 8192 else 16
