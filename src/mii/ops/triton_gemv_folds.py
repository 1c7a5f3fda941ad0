"""The skinny linear kernel with an input stage folded in (``ops.triton_gemv_inputs``):
an RMSNorm (``MII_FUSED_NORM_LINEAR``) or act(gate) * up (``MII_FUSED_ACT_LINEAR``)
computed by the kernel itself from what the small kernel before it would have read."""

from __future__ import annotations

import torch

from mii.ops.dispatch import FUSED_ACTIVATIONS
from mii.ops.triton_gemv import FoldedNorm, check_operands, launch
from mii.ops.triton_gemv_launch import GemvConfig, bf16_config_for


def skinny_norm_linear(
    x: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    gemma: bool,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F.linear(norm(h), weight, bias), h)`` in one launch, h = ``x + residual``
    (or ``x``): ``ops.fused_elementwise.rms_norm`` folded into the skinny kernel's
    reads of its input (16/32-bit weights; K unsplit: ``config.split_k`` is not
    used). The products take h * g cast to x's dtype and are divided by each row's
    root mean square at the end, where rms_norm casts h / rms and then its product
    with g: the same result within a unit in the last place of the norm's output."""
    check_operands(x, weight, bias, "skinny_norm_linear")
    if norm_weight.shape != (x.shape[1],) or not norm_weight.is_contiguous():
        raise ValueError(f"skinny_norm_linear needs a contiguous norm weight of {x.shape[1]}")
    if residual is not None and (residual.shape != x.shape or residual.stride(1) != 1):
        raise ValueError("skinny_norm_linear needs a residual shaped as x, rows contiguous")
    summed = torch.empty_like(x) if residual is not None else x
    norm = FoldedNorm(norm_weight, eps, gemma, residual, summed if residual is not None else None)
    config = config or bf16_config_for(x.shape[0], weight.shape[0], x.device)
    return launch(x, weight, None, bias, config, norm), summed


def skinny_act_linear(
    gate_up: torch.Tensor,
    activation: str,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: GemvConfig | None = None,
) -> torch.Tensor:
    """``F.linear(act(gate) * up, weight, bias)`` in one launch, gate_up [M, 2 K]
    (gate first): ``ops.fused_elementwise.act_and_mul`` folded into the skinny
    kernel's reads of its input, the same input bit for bit (16/32-bit weights)."""
    if activation not in FUSED_ACTIVATIONS:
        raise ValueError(f"no fused kernel for activation {activation!r}")
    k = weight.shape[1]
    if gate_up.dim() != 2 or gate_up.shape[1] != 2 * k:
        raise ValueError(f"skinny_act_linear needs gate_up [M, {2 * k}] for a weight [N, {k}]")
    gate = gate_up[:, :k]  # the kernel reads up K columns further along each row
    check_operands(gate, weight, bias, "skinny_act_linear")
    config = config or bf16_config_for(gate_up.shape[0], weight.shape[0], gate_up.device)
    return launch(gate, weight, None, bias, config, activation=FUSED_ACTIVATIONS[activation])
