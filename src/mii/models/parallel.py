"""Tensor-parallel group state and the collectives the sharded layers use.

The state is process-wide: one engine per process, and every rank of a
tensor-parallel engine is its own process (``torchrun``, or the worker
processes of a deployment). ``mii.engine.distributed`` fills it in before the
model is built; at world size 1 (the default) every collective is a no-op.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class ParallelState:
    rank: int = 0
    world_size: int = 1
    group: Any = None  # the data-plane process group (NCCL on GPUs, gloo on CPU)


_STATE = ParallelState()


def tp_rank() -> int:
    return _STATE.rank


def tp_world_size() -> int:
    return _STATE.world_size


def set_parallel_state(rank: int, world_size: int, group: Any = None) -> None:
    """Make this process rank ``rank`` of ``world_size`` (before building a model)."""
    global _STATE
    _STATE = ParallelState(rank, world_size, group)


@contextlib.contextmanager
def parallel_state(rank: int, world_size: int, group: Any = None) -> Iterator[None]:
    """Temporarily act as ``rank`` of ``world_size``: layers built inside take that
    rank's shapes and load that rank's slices (tests build shards in one process)."""
    global _STATE
    saved = _STATE
    _STATE = ParallelState(rank, world_size, group)
    try:
        yield
    finally:
        _STATE = saved


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the tensor-parallel group in place (a no-op at world size 1)."""
    if _STATE.world_size == 1:
        return x
    torch.distributed.all_reduce(x, group=_STATE.group)
    return x


def all_gather_last_dim(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``x`` along the last dimension, in rank order."""
    if _STATE.world_size == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_STATE.world_size)]
    torch.distributed.all_gather(parts, x.contiguous(), group=_STATE.group)
    return torch.cat(parts, dim=-1)


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(
            f"{what} ({numerator}) is not divisible by tensor_parallel ({denominator}); "
            "choose a tensor_parallel that divides it"
        )
    return numerator // denominator


def kv_head_layout(num_kv_heads: int, world_size: int, rank: int) -> tuple[int, int]:
    """(KV heads this rank holds, index of its first KV head).

    With at least as many KV heads as ranks they are split evenly. With fewer
    (multi-query Falcon-7B, GQA with few KV heads) each rank holds one KV head,
    replicated over the ``world_size // num_kv_heads`` ranks whose query heads use it.
    """
    if num_kv_heads >= world_size:
        local = divide(num_kv_heads, world_size, "num_key_value_heads")
        return local, rank * local
    if world_size % num_kv_heads:
        raise ValueError(
            f"tensor_parallel ({world_size}) must be a multiple of the model's "
            f"{num_kv_heads} key/value heads when it exceeds them"
        )
    return 1, rank * num_kv_heads // world_size


def local_kv_heads(num_kv_heads: int) -> int:
    """KV heads this rank holds (and caches): see ``kv_head_layout``."""
    return kv_head_layout(num_kv_heads, _STATE.world_size, _STATE.rank)[0]


def vocab_range(vocab_size: int, world_size: int, rank: int) -> tuple[int, int]:
    """(first id, padded count) of this rank's slice of the vocabulary. Every rank
    holds ``ceil(V / world)`` rows; the last rank's tail past V is padding."""
    per_rank = -(-vocab_size // world_size)
    return rank * per_rank, per_rank
