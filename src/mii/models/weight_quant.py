"""Float8 weights in the linear layers: how the layers built now store their
weights, and how checkpoint tensors are copied into that storage.

The mode is process-wide while a model is built (like the tensor-parallel
state of ``models.parallel``), so that every family's layers pick it up
without passing it through each constructor:

- None: 16-bit (or 32-bit) weights, as the checkpoint holds them;
- ``"online"``: a 16/32-bit checkpoint quantized at load (``quantization="fp8"``);
  each weight row is quantized as it is copied in, so no 16-bit copy of the
  whole model is ever held;
- ``"checkpoint"``: a pre-quantized checkpoint (``models.quant_config``): float8
  weights are copied as they are, and their ``weight_scale`` tensors are
  expected too.

A quantized layer holds its weight as float8 e4m3 [N, K] and ``<weight>_scale``
float32 [N], one scale per output channel (``ops.fp8_linear``). A column-parallel
layer's scales are split with its rows; a row-parallel layer keeps every
output channel, so its scales are whole on every rank, and computed from whole
rows (every rank quantizes its slice with the same scale a single rank would).
A row's scale is the least-squared-error one of a few (``ops.fp8_linear.weight_scales``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Literal

import torch
from torch import nn

from mii.models.checkpoint_tensor import LazyTensor, materialize
from mii.ops.fp8_linear import FP8_DTYPE, quantize_rows, quantize_weight_rows, weight_scales

Fp8Mode = Literal["online", "checkpoint"] | None

_MODE: Fp8Mode = None


def fp8_mode() -> Fp8Mode:
    """How the linear layers built now store their weights (see the module docstring)."""
    return _MODE


@contextlib.contextmanager
def fp8_weights(mode: Fp8Mode) -> Iterator[None]:
    """Build the layers made inside with float8 weights (``mode`` not None)."""
    global _MODE
    saved = _MODE
    _MODE = mode
    try:
        yield
    finally:
        _MODE = saved


def fp8_parameter(*shape: int) -> nn.Parameter:
    """An empty float8 weight (no gradient: float8 tensors have none)."""
    return nn.Parameter(torch.empty(*shape, dtype=FP8_DTYPE), requires_grad=False)


def scale_parameter(*shape: int) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=torch.float32), requires_grad=False)


def scale_shards(mode: Fp8Mode, weight_shards: list) -> list:
    """The shard ids of a ``*_scale`` parameter that loading must fill: those of its
    weight for a pre-quantized checkpoint; none when quantizing at load (the weight
    fills its scale)."""
    return list(weight_shards) if mode == "checkpoint" else []


def channel_scales(loaded: torch.Tensor | LazyTensor, rows: int) -> torch.Tensor:
    """A checkpoint's ``weight_scale`` as one float32 scale per output channel [rows]:
    a per-tensor scale ([] or [1]) repeated, a per-channel one ([rows] or [rows, 1])
    flattened. Other shapes (group or block scales) are refused."""
    scale = materialize(loaded).float()
    if scale.numel() == 1:
        return scale.reshape(1).expand(rows).contiguous()
    if scale.shape in ((rows,), (rows, 1)):
        return scale.reshape(rows)
    raise ValueError(
        f"weight_scale of shape {tuple(scale.shape)} is neither per-tensor nor per-channel "
        f"({rows} rows); only those FP8 scales are supported"
    )


def copy_weight_rows(
    dest: torch.Tensor,
    dest_scale: torch.Tensor,
    loaded: torch.Tensor,
    mode: Fp8Mode,
    scale: torch.Tensor | None = None,
) -> None:
    """Fill float8 rows ``dest`` [..., K] from checkpoint rows ``loaded``: float8 ones
    as they are (a pre-quantized checkpoint; the scales come as their own tensor),
    16/32-bit ones quantized here (``ops.fp8_linear.quantize_weight_rows``), filling
    ``dest_scale`` [...] too. ``scale``: the whole rows' scales (``row_scales``) when
    ``loaded`` is a slice of each row (row-parallel)."""
    if tuple(dest.shape) != tuple(loaded.shape):
        raise ValueError(f"weight shape {tuple(loaded.shape)} does not match {tuple(dest.shape)}")
    if loaded.dtype == FP8_DTYPE:
        if mode != "checkpoint":
            raise ValueError(
                "the checkpoint holds float8 weights but its config.json has no "
                "quantization_config saying how they are scaled"
            )
        dest.copy_(loaded)
        return
    if loaded.dtype.is_floating_point and loaded.element_size() == 1:
        raise ValueError(f"float8 weights of dtype {loaded.dtype} are not supported (e4m3 only)")
    # Quantized where the weight lives (the GPU: far faster than the host for a 70B model).
    scale = None if scale is None else scale.to(dest.device)
    wq, scale = quantize_weight_rows(loaded.to(dest.device), scale)
    dest.copy_(wq)
    dest_scale.copy_(scale)


def row_scales(loaded: torch.Tensor | LazyTensor, device: torch.device) -> torch.Tensor | None:
    """Each whole row's scale (``ops.fp8_linear.weight_scales``, computed on
    ``device``) of a 16/32-bit checkpoint weight [..., K] (read whole), for
    quantizing a slice of its columns; None for a float8 weight."""
    whole = materialize(loaded)
    if whole.dtype == FP8_DTYPE:
        return None
    return weight_scales(whole.to(device))


def fill_random_fp8(weight: nn.Parameter, scale: nn.Parameter, generator: torch.Generator) -> None:
    """Random weights (``load_format="dummy"``) for a float8 weight: normal(0, 0.02)
    quantized per row, one matrix at a time (no 16-bit copy of a whole stack). The
    plain ``amax / 448`` scale: no scale search for weights that mean nothing."""
    flat_w = weight.data.view(-1, *weight.shape[-2:])
    flat_s = scale.data.view(-1, weight.shape[-2])
    for i in range(flat_w.shape[0]):
        w = torch.empty(flat_w.shape[1:], device=weight.device, dtype=torch.bfloat16)
        w.normal_(0.0, 0.02, generator=generator)
        flat_w[i], flat_s[i] = quantize_rows(w)
