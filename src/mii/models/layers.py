"""Layers shared by every model family, written for tensor parallelism.

A module whose parameters need more than a plain copy (fused, sharded) has a
``weight_loader(param_name, param, loaded, shard_id)`` method that copies this
rank's slice of a full Hugging Face tensor into the local parameter, so that
loaders never need to know the layout. (A method on the module rather than an
attribute on the parameter, because moving a module between devices makes new
parameter objects.)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mii.models.parallel import all_reduce, divide, tp_rank, tp_world_size


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"weight shape {tuple(loaded.shape)} does not match {tuple(param.shape)}")
    param.data.copy_(loaded)


class ColumnParallelLinear(nn.Module):
    """y = x Wᵀ + b with W's output rows split across ranks.

    ``output_sizes`` lists the fused sub-matrices (e.g. q, k, v or gate, up); each
    is split across ranks separately so that every rank holds its own q, k and v
    heads side by side.
    """

    def __init__(self, input_size: int, output_sizes: Sequence[int], bias: bool) -> None:
        super().__init__()
        world = tp_world_size()
        self.output_sizes = [divide(s, world, "linear output size") for s in output_sizes]
        self.input_size = input_size
        self.weight = nn.Parameter(torch.empty(sum(self.output_sizes), input_size))
        if bias:
            self.bias = nn.Parameter(torch.empty(sum(self.output_sizes)))
        else:
            self.register_parameter("bias", None)

    def weight_loader(
        self, name: str, param: nn.Parameter, loaded: torch.Tensor, shard_id: int | None
    ) -> None:
        index = 0 if shard_id is None else shard_id
        size = self.output_sizes[index]
        offset = sum(self.output_sizes[:index])
        if shard_id is None and len(self.output_sizes) > 1:
            raise ValueError("a fused weight needs a shard id")
        local = loaded.narrow(0, tp_rank() * size, size)
        target = param.data.narrow(0, offset, size)
        if target.shape != local.shape:
            raise ValueError(
                f"weight shape {tuple(local.shape)} does not match {tuple(target.shape)}"
            )
        target.copy_(local)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RowParallelLinear(nn.Module):
    """y = x Wᵀ + b with W's input columns split across ranks; partial sums are all-reduced."""

    def __init__(self, input_size: int, output_size: int, bias: bool) -> None:
        super().__init__()
        self.input_size = divide(input_size, tp_world_size(), "linear input size")
        self.weight = nn.Parameter(torch.empty(output_size, self.input_size))
        if bias:
            self.bias = nn.Parameter(torch.empty(output_size))
        else:
            self.register_parameter("bias", None)

    def weight_loader(
        self, name: str, param: nn.Parameter, loaded: torch.Tensor, shard_id=None
    ) -> None:
        if name == "weight":
            loaded = loaded.narrow(1, tp_rank() * self.input_size, self.input_size)
        default_weight_loader(param, loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = all_reduce(F.linear(x, self.weight))
        if self.bias is not None:
            out = out + self.bias  # added once, after the reduction
        return out


class VocabEmbedding(nn.Module):
    """Token embedding (vocabulary sharding arrives with tensor parallelism)."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size))

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.empty(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalise in float32 as Hugging Face does, then cast back.
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), gate and up fused into one column-parallel matmul."""

    def __init__(self, hidden_size: int, intermediate_size: int, act: str, bias: bool) -> None:
        super().__init__()
        self.gate_up_proj = ColumnParallelLinear(
            hidden_size, [intermediate_size, intermediate_size], bias
        )
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias)
        self.act = activation(act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(self.act(gate) * up)


def activation(name: str):
    table = {
        "silu": F.silu,
        "swish": F.silu,
        "gelu": F.gelu,
        "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
        "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
        "relu": F.relu,
    }
    if name not in table:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(table)}")
    return table[name]
