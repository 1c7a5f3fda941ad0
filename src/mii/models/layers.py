"""Layers shared by every model family, written for tensor parallelism.

A module whose parameters need more than a plain copy (fused, sharded) has a
``weight_loader(param_name, param, loaded, shard_id)`` method that copies this
rank's slice of a full Hugging Face tensor into the local parameter, and a
``weight_shards(param_name)`` method listing the shard ids that fill it, so that
loaders never need to know the layout. (Methods on the module rather than
attributes on the parameter, because moving a module between devices makes new
parameter objects.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mii import envs
from mii.models.checkpoint_tensor import LazyTensor, materialize
from mii.models.parallel import (
    all_gather_last_dim,
    all_reduce,
    divide,
    kv_head_layout,
    tp_rank,
    tp_world_size,
    vocab_range,
)
from mii.models.weight_quant import (
    channel_scales,
    copy_weight_rows,
    fp8_mode,
    fp8_parameter,
    row_scales,
    scale_parameter,
    scale_shards,
)
from mii.ops import fp8_activations
from mii.ops.dispatch import (
    FUSED_ACTIVATIONS,
    fused_kernels_enabled,
    skinny_fp8_linear_enabled,
    skinny_linear_enabled,
)
from mii.ops.fp8_linear import fp8_linear


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``; a decode batch of a few rows on CUDA goes through the skinny
    kernel of ``ops.triton_gemv``, which reads the weights faster than cuBLAS at
    these sizes (benchmarks/gemv_sweep.py)."""
    if skinny_linear_enabled(x, weight, bias):
        from mii.ops.triton_gemv import skinny_linear  # Triton: a CUDA-only dependency

        return skinny_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def layer_linear(layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``linear`` with ``layer``'s weight: float8 ones (``layer.fp8``) through
    ``ops.fp8_linear`` with their per-channel ``weight_scale``."""
    if layer.fp8:
        return fp8_linear(x, layer.weight, layer.weight_scale, bias)
    return linear(x, layer.weight, bias)


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor | LazyTensor) -> None:
    """Copy a whole tensor into ``param`` (converting its dtype)."""
    loaded = materialize(loaded)
    if param.shape != loaded.shape:
        raise ValueError(f"weight shape {tuple(loaded.shape)} does not match {tuple(param.shape)}")
    param.data.copy_(loaded)


class ColumnParallelLinear(nn.Module):
    """y = x Wᵀ + b with W's output rows split across ranks.

    ``output_sizes`` lists the fused sub-matrices (e.g. q, k, v or gate, up); each
    is split across ranks separately so that every rank holds its own q, k and v
    heads side by side. Shard id ``i`` loads sub-matrix ``i``; ``"packed"`` loads
    a tensor holding all of them in order. ``layouts`` overrides the even split:
    for each part, (rows this rank holds, first row of the full part) — how key
    and value heads are replicated when there are fewer of them than ranks.
    """

    def __init__(
        self,
        input_size: int,
        output_sizes: Sequence[int],
        bias: bool,
        layouts: Sequence[tuple[int, int]] | None = None,
    ) -> None:
        super().__init__()
        world, rank = tp_world_size(), tp_rank()
        self.full_sizes = list(output_sizes)
        if layouts is None:
            sizes = [divide(s, world, "linear output size") for s in output_sizes]
            layouts = [(size, rank * size) for size in sizes]
        self.layouts = list(layouts)
        self.output_sizes = [size for size, _ in self.layouts]
        self.input_size = input_size
        self.fp8 = fp8_mode()  # float8 weights with per-row scales (models.weight_quant)
        rows = sum(self.output_sizes)
        if self.fp8:
            self.weight = fp8_parameter(rows, input_size)
        else:
            self.weight = nn.Parameter(torch.empty(rows, input_size))
        if bias:
            self.bias = nn.Parameter(torch.empty(rows))
        else:
            self.register_parameter("bias", None)
        if self.fp8:  # split with its rows
            self.weight_scale = scale_parameter(rows)

    reads_slices = True  # its loader only narrows a part's rows (see checkpoint_tensor)

    def weight_shards(self, name: str) -> list:
        shards = [None] if len(self.output_sizes) == 1 else list(range(len(self.output_sizes)))
        return scale_shards(self.fp8, shards) if name == "weight_scale" else shards

    def weight_loader(self, name: str, param: nn.Parameter, loaded: torch.Tensor, shard_id) -> None:
        if name == "weight_scale" and shard_id == "packed":  # per-tensor: every part's
            loaded = channel_scales(loaded, sum(self.full_sizes))
        if shard_id == "packed":
            for index, part in enumerate(loaded.split(self.full_sizes, dim=0)):
                self.weight_loader(name, param, part, index)
            return
        if shard_id is None and len(self.output_sizes) > 1:
            raise ValueError("a fused weight needs a shard id")
        index = 0 if shard_id is None else shard_id
        size, first = self.layouts[index]
        offset = sum(self.output_sizes[:index])
        if name == "weight_scale" and shard_id != "packed":
            loaded = channel_scales(loaded, self.full_sizes[index])
        if loaded.shape[0] != self.full_sizes[index]:
            raise ValueError(
                f"weight part {index} has {loaded.shape[0]} rows, expected {self.full_sizes[index]}"
            )
        dest, rows = param.data.narrow(0, offset, size), loaded.narrow(0, first, size)
        if self.fp8 and name == "weight":
            scales = self.weight_scale.data.narrow(0, offset, size)
            copy_weight_rows(dest, scales, rows, self.fp8)
        else:
            default_weight_loader(dest, rows)

    @property
    def kernel_bias(self) -> torch.Tensor | None:
        """The bias its matmul kernel adds (ops.fp8_activations asks)."""
        return self.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_linear(self, x, self.kernel_bias)


def qkv_layouts(num_heads: int, num_kv_heads: int, head_dim: int) -> list[tuple[int, int]]:
    """Row layouts of a fused [q, k, v] projection on this rank (see ``kv_head_layout``)."""
    world, rank = tp_world_size(), tp_rank()
    q_heads = divide(num_heads, world, "num_attention_heads")
    kv_heads, first_kv = kv_head_layout(num_kv_heads, world, rank)
    q = (q_heads * head_dim, rank * q_heads * head_dim)
    kv = (kv_heads * head_dim, first_kv * head_dim)
    return [q, kv, kv]


class RowParallelLinear(nn.Module):
    """y = x Wᵀ + b with W's input columns split across ranks; partial sums are all-reduced."""

    reads_slices = True  # its loader only narrows this rank's slice

    def __init__(self, input_size: int, output_size: int, bias: bool) -> None:
        super().__init__()
        self.input_size = divide(input_size, tp_world_size(), "linear input size")
        self.fp8 = fp8_mode()  # float8 weights with per-row scales (models.weight_quant)
        if self.fp8:
            self.weight = fp8_parameter(output_size, self.input_size)
        else:
            self.weight = nn.Parameter(torch.empty(output_size, self.input_size))
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size))
        else:
            self.register_parameter("bias", None)
        if self.fp8:  # every output channel on every rank: not split
            self.weight_scale = scale_parameter(output_size)

    def weight_shards(self, name: str) -> list:
        return scale_shards(self.fp8, [None]) if name == "weight_scale" else [None]

    def weight_loader(
        self, name: str, param: nn.Parameter, loaded: torch.Tensor, shard_id=None
    ) -> None:
        columns = (1, tp_rank() * self.input_size, self.input_size)
        if name == "weight" and self.fp8:
            # Scales of whole rows, so that every rank's slice is quantized as one rank's.
            whole = materialize(loaded)
            rows, scale = whole.narrow(*columns), row_scales(whole, param.device)
            copy_weight_rows(param.data, self.weight_scale.data, rows, self.fp8, scale)
            return
        if name == "weight":
            loaded = loaded.narrow(*columns)
        elif name == "weight_scale":
            loaded = channel_scales(loaded, param.shape[0])
        default_weight_loader(param, loaded)

    kernel_bias = None  # its bias is added once, after the all-reduce

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = all_reduce(layer_linear(self, x, self.kernel_bias))
        if self.bias is not None:
            out = out + self.bias  # added once, after the reduction
        return out


def load_vocab_rows(param: nn.Parameter, loaded: torch.Tensor, vocab_size: int) -> None:
    """Copy this rank's rows of a [V, ...] tensor; rows past V (padding) become zero."""
    if loaded.shape[0] != vocab_size:
        raise ValueError(f"vocabulary weight has {loaded.shape[0]} rows, expected {vocab_size}")
    start, count = vocab_range(vocab_size, tp_world_size(), tp_rank())
    real = max(0, min(count, vocab_size - start))
    param.data.zero_()
    if real:  # a last rank may hold padding only (tiny vocabularies)
        default_weight_loader(param.data.narrow(0, 0, real), loaded.narrow(0, start, real))


class VocabEmbedding(nn.Module):
    """Token embedding with the vocabulary split across ranks: each rank embeds
    the ids in its range, zeros elsewhere, and the sum over ranks is the result."""

    reads_slices = True  # its loader only narrows this rank's slice

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.vocab_start, rows = vocab_range(vocab_size, tp_world_size(), tp_rank())
        self.weight = nn.Parameter(torch.empty(rows, hidden_size))

    def weight_loader(
        self, name: str, param: nn.Parameter, loaded: torch.Tensor, shard_id=None
    ) -> None:
        load_vocab_rows(param, loaded, self.vocab_size)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        if tp_world_size() == 1:
            return F.embedding(token_ids, self.weight)
        local = token_ids - self.vocab_start
        mine = (local >= 0) & (local < self.weight.shape[0])
        out = F.embedding(torch.where(mine, local, 0), self.weight)
        return all_reduce(out * mine.unsqueeze(-1).to(out.dtype))


class LMHead(nn.Module):
    """Final projection to vocabulary logits, optionally sharing the embedding matrix.
    Each rank computes the logits of its vocabulary slice; they are gathered."""

    reads_slices = True  # its loader only narrows this rank's slice

    def __init__(
        self, hidden_size: int, vocab_size: int, bias: bool, tied_to: VocabEmbedding | None
    ) -> None:
        super().__init__()
        self.vocab_size = vocab_size
        _, rows = vocab_range(vocab_size, tp_world_size(), tp_rank())
        # A plain attribute in a tuple, so the tied matrix is not registered twice.
        self._tied = (tied_to,) if tied_to is not None else None
        if tied_to is None:
            self.weight = nn.Parameter(torch.empty(rows, hidden_size))
        self.bias = nn.Parameter(torch.empty(rows)) if bias else None

    def weight_loader(
        self, name: str, param: nn.Parameter, loaded: torch.Tensor, shard_id=None
    ) -> None:
        load_vocab_rows(param, loaded, self.vocab_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden: [S, D] -> float32 logits [S, V]."""
        weight = self._tied[0].weight if self._tied is not None else self.weight
        logits = linear(hidden, weight, self.bias)
        if tp_world_size() > 1:
            logits = all_gather_last_dim(logits)[:, : self.vocab_size]
        return logits.float()


class RMSNorm(nn.Module):
    """RMS normalisation; ``offset=1`` is Gemma's variant, scaling by (1 + w)."""

    def __init__(self, hidden_size: int, eps: float, offset: float = 0.0) -> None:
        super().__init__()
        self.eps = eps
        self.offset = offset
        self.weight = nn.Parameter(torch.empty(hidden_size))

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None = None,
        quantize_for: nn.Module | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """norm(x); with ``residual``, ``(norm(x + residual), x + residual)`` (one
        fused kernel on CUDA). ``quantize_for``: the linear layer that reads the
        result; where it reads float8 slices, the kernel writes them too
        (``ops.fp8_activations``)."""
        if fused_kernels_enabled(x.device):
            from mii.ops.fused_elementwise import rms_norm  # Triton: a CUDA-only dependency

            slices = fp8_activations.slices_for(x, quantize_for)
            return rms_norm(x, self.weight, self.eps, bool(self.offset), residual, slices)
        if residual is not None:
            summed = x + residual
            return self._norm(summed), summed
        return self._norm(x)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 as Hugging Face does, then cast back.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.offset:
            return (x32 * (self.offset + self.weight.float())).to(dtype)
        return self.weight * x32.to(dtype)


def norm_then_linear(
    norm: RMSNorm, x: torch.Tensor, residual: torch.Tensor | None, layer: ColumnParallelLinear
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(layer(norm(x + residual)), x + residual)``, or with no residual
    ``(layer(norm(x)), x)``: the norm's kernel (which writes the float8 copy a float8
    layer reads), then the layer."""
    if residual is None:
        return layer(norm(x, quantize_for=layer)), x
    h, residual = norm(x, residual=residual, quantize_for=layer)
    return layer(h), residual


class LayerNorm(nn.Module):
    """LayerNorm with weight and (optional) bias, computed in float32."""

    def __init__(self, hidden_size: int, eps: float, bias: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size))
        self.bias = nn.Parameter(torch.empty(hidden_size)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.float()
        out = F.layer_norm(x.float(), x.shape[-1:], self.weight.float(), bias, self.eps)
        return out.to(x.dtype)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), gate and up fused into one column-parallel matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str, bias: bool) -> None:
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(
            hidden_size, [intermediate_size, intermediate_size], bias
        )
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias)
        self.act = activation(act)
        self.act_name = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._gated_kernel_takes(x):
            from mii.ops.triton_gemv import skinny_gated_linear  # Triton: CUDA-only here

            layer = self.gate_up_proj
            scale = layer.weight_scale if layer.fp8 else None
            inner = skinny_gated_linear(x, layer.weight, self.act_name, scale, layer.kernel_bias)
            return self.down_proj(inner)
        return self.down_from_gate_up(self.gate_up_proj(x))

    def _gated_kernel_takes(self, x: torch.Tensor) -> bool:
        """Whether act(gate) * up runs in the gate/up projection's skinny kernel
        (``MII_GATED_GEMV``; by default for float8 weights only, see ``envs``): a
        decode batch that kernel takes, an activation the fused kernel has, and no
        float8 copy of act * up wanted by the down projection
        (``MII_FP8_FUSED_QUANT=on``, written by the act-and-mul kernel only)."""
        if not fused_kernels_enabled(x.device):  # (first: False while torch.compile traces)
            return False
        layer = self.gate_up_proj
        choice = envs.GATED_GEMV.get()
        if choice == "off" or (choice == "auto" and not layer.fp8):
            return False
        if self.act_name not in FUSED_ACTIVATIONS:
            return False
        if envs.FP8_FUSED_QUANT.get() == "on" and self._down_reads_a_copy(x):
            return False
        if layer.fp8:
            return skinny_fp8_linear_enabled(x, layer.weight, layer.weight_scale, layer.kernel_bias)
        return skinny_linear_enabled(x, layer.weight, layer.kernel_bias)

    def _down_reads_a_copy(self, x: torch.Tensor) -> bool:
        """Whether the down projection's launch at x's rows reads a float8 copy of its
        input (which the act-and-mul kernel writes and the gated kernel does not);
        not at one row, whose CUDA-core launch reads x unquantized."""
        if not self.down_proj.fp8:
            return False
        from mii.ops.triton_gemv_launch import fp8_config_for, prequantized_slices

        n, k = self.down_proj.weight.shape
        config = fp8_config_for(x.numel() // x.shape[-1], n, k, x.device)
        return prequantized_slices(config, x.dtype) > 0

    def down_from_gate_up(self, gate_up: torch.Tensor) -> torch.Tensor:
        """The layer from its gate/up projection's output on: [T, 2 I] -> [T, hidden]."""
        if self.act_name in FUSED_ACTIVATIONS and fused_kernels_enabled(gate_up.device):
            from mii.ops.fused_elementwise import act_and_mul

            slices = fp8_activations.slices_for(gate_up, self.down_proj, writer="act")
            return self.down_proj(act_and_mul(gate_up, self.act_name, slices))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


class MLP(nn.Module):
    """down(act(up(x))), the ungated feed-forward of OPT, Falcon and Phi."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str, bias: bool) -> None:
        super().__init__()
        self.up_proj = ColumnParallelLinear(hidden_size, [intermediate_size], bias)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


def activation(name: str):
    table = {
        "silu": F.silu,
        "swish": F.silu,
        "gelu": F.gelu,
        "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "relu": F.relu,
    }
    if name not in table:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(table)}")
    return table[name]
