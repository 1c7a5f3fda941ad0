"""Checkpoint tensors read on demand, so that a tensor-parallel rank reads only
its slice of each weight.

``LazyTensor`` offers the part of the tensor interface the sharded layers'
weight loaders use: ``shape``, ``dim()`` and ``narrow()``, the last reading only
that slice from the safetensors file. Anything else first ``materialize``s the
whole tensor.
"""

from __future__ import annotations

from typing import Any

import torch


class LazyTensor:
    def __init__(self, handle: Any, name: str) -> None:
        self._slice = handle.get_slice(name)
        self.shape = torch.Size(self._slice.get_shape())
        self.elements_read = 0  # for tests: how much of the tensor was read

    def dim(self) -> int:
        return len(self.shape)

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index: list[slice] = [slice(None)] * self.dim()
        index[dim] = slice(start, start + length)
        part = self._slice[tuple(index)]
        self.elements_read += part.numel()
        return part

    def materialize(self) -> torch.Tensor:
        whole = self._slice[:] if self.dim() else self._slice[()]
        self.elements_read += whole.numel()
        return whole


def materialize(tensor: torch.Tensor | LazyTensor) -> torch.Tensor:
    """The whole tensor, read now if it was lazy."""
    return tensor.materialize() if isinstance(tensor, LazyTensor) else tensor
