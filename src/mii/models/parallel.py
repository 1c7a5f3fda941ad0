"""Tensor-parallel group state. Today every engine runs with world size 1; the
sharded layers already ask this module for rank and size, so that tensor
parallelism only has to fill it in."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ParallelState:
    rank: int = 0
    world_size: int = 1


_STATE = ParallelState()


def tp_rank() -> int:
    return _STATE.rank


def tp_world_size() -> int:
    return _STATE.world_size


def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum ``x`` over the tensor-parallel group (a no-op at world size 1)."""
    if _STATE.world_size == 1:
        return x
    torch.distributed.all_reduce(x)
    return x


def divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(
            f"{what} ({numerator}) is not divisible by tensor_parallel ({denominator})"
        )
    return numerator // denominator
