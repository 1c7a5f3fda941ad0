"""Float8 copies of a decode activation, made by the kernel that writes it.

At decode the float8 skinny kernel (``ops.triton_gemv``, ``GemvConfig.x_groups``)
reads its input x quantized to e4m3 in slices of its ``BLOCK_K`` columns, one
scale per row and slice, which a launch of its own (``quantize_groups_fp8``)
writes first: at batch 1 of Llama-2-7B, 128 launches of ~1.2 µs per token
(ninth session's profile), 5 % of the FP8 step. The inputs of qkv, gate_up and
down are written by the RMSNorm and ``act(gate) * up`` kernels
(``ops.fused_elementwise``), which hold the row in registers anyway: asked with
``fp8_slices``, they quantize it in the same launch, with the same numbers, and
``attach`` the copy to the tensor they return; ``skinny_linear_fp8`` ``take``s it
instead of launching the quantization. The caller asks ``slices_for`` the layer
that will read the tensor, so the copy is made only where that layer's launch
reads one, at its slice width.

``MII_FP8_FUSED_QUANT`` says who writes copies: ``norm`` (the default) the RMSNorm
kernel only, since the gated gate/up kernel computes act * up without a launch of
its own; ``on`` the act-and-mul kernel too (the gated kernel then stays off);
``off`` none. The copies are exact. With one asked for, the norm runs one program
per slice, each taking the whole row's mean square: while it was one program per
row, which then quantized all the row's slices alone, ``on`` lost at batch 1 (H200,
Llama-2-7B: 360.0 vs 367.0 tok/s); per slice, ``norm`` gains 2 % (384.0 / 384.2 vs
376.3 / 376.5 tok/s ``off``; ``on`` 382.0).
"""

from __future__ import annotations

import torch
from torch import nn

from mii import envs
from mii.ops.dispatch import skinny_fp8_linear_enabled

_ATTRIBUTE = "_mii_fp8_slices"


def slices_for(x: torch.Tensor, layer: nn.Module | None, writer: str = "norm") -> int:
    """The slice width at which ``layer``'s float8 decode kernel reads an input with
    x's rows, dtype and device pre-quantized, or 0 where no copy would be read (not
    a float8 layer, not the skinny kernel's call, a launch that quantizes in its
    loop, or ``MII_FP8_FUSED_QUANT`` off for this ``writer``: "norm" or "act")."""
    if writer not in ("norm", "act"):
        raise ValueError(f"slices_for: writer must be 'norm' or 'act', not {writer!r}")
    choice = envs.FP8_FUSED_QUANT.get()
    wanted = choice == "on" or (choice == "norm" and writer == "norm")
    if layer is None or not getattr(layer, "fp8", False) or not wanted:
        return 0
    rows = x.reshape(-1, x.shape[-1])
    # the bias the layer hands its kernel (a row-parallel layer adds its own after the
    # reduction: none)
    bias = getattr(layer, "kernel_bias", None)
    if not skinny_fp8_linear_enabled(rows, layer.weight, layer.weight_scale, bias):
        return 0
    from mii.ops.triton_gemv_launch import fp8_config_for, prequantized_slices

    n, k = layer.weight.shape
    return prequantized_slices(fp8_config_for(rows.shape[0], n, k, x.device), x.dtype)


def attach(x: torch.Tensor, values: torch.Tensor, scales: torch.Tensor, width: int) -> None:
    """Record ``values`` (float8 [M, K]) and ``scales`` (float32 [M, ceil(K / width)])
    as x's copy quantized in slices of ``width`` columns, as x is now."""
    setattr(x, _ATTRIBUTE, (values, scales, width, _version(x)))


def take(x: torch.Tensor, width: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """x's attached copy at slice width ``width`` (values, scales), or None; also
    None once x was changed in place after the copy was made (where torch counts
    x's versions: not for tensors made under ``torch.inference_mode``, as the
    engine's are, whose layers never change a norm's or an activation's output)."""
    copy = getattr(x, _ATTRIBUTE, None)
    if copy is None or copy[2] != width or copy[0].shape != x.shape or copy[3] != _version(x):
        return None
    return copy[0], copy[1]


def _version(x: torch.Tensor) -> int | None:
    return None if x.is_inference() else x._version
