"""The blocked KV cache: a pool of fixed-size blocks, a free list, and per-sequence
block tables.

Block tables are append-only while a sequence runs; all of a sequence's blocks
return to the free list at once when it finishes, is aborted or is preempted.
The scheduler speaks to ``BlockManager`` only through sequences and token
counts; it never sees block ids.
"""

from __future__ import annotations

from collections import deque

import torch

from mii.engine.sequence import Sequence
from mii.models.base import KVCacheSpec


def blocks_for(num_tokens: int, block_size: int) -> int:
    return (num_tokens + block_size - 1) // block_size


class BlockManager:
    """Hands out cache blocks to sequences as they grow."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks <= 0:
            raise ValueError("the KV cache needs at least one block")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks in use, 0..1."""
        return 1.0 - len(self._free) / self.num_blocks

    def blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Extra blocks ``seq`` needs to hold KV for ``num_new_tokens`` more tokens."""
        total = blocks_for(seq.num_computed + num_new_tokens, self.block_size)
        return max(0, total - len(seq.block_table))

    def tokens_that_fit(self, seq: Sequence, wanted: int) -> int:
        """How many of ``wanted`` new tokens the free blocks (plus slack in the
        sequence's last block) can hold."""
        capacity = (len(seq.block_table) + self.num_free) * self.block_size
        return max(0, min(wanted, capacity - seq.num_computed))

    def can_fit_alone(self, num_tokens: int) -> bool:
        """Whether a sequence of ``num_tokens`` fits in the whole, empty pool."""
        return blocks_for(num_tokens, self.block_size) <= self.num_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow ``seq``'s block table so that ``num_new_tokens`` more tokens fit."""
        needed = self.blocks_needed(seq, num_new_tokens)
        if needed > len(self._free):
            raise RuntimeError(f"asked for {needed} KV blocks with {len(self._free)} free")
        seq.block_table.extend(self._free.popleft() for _ in range(needed))

    def free(self, seq: Sequence) -> None:
        """Return every block of ``seq`` to the pool."""
        self._free.extend(seq.block_table)
        seq.block_table = []


def allocate_kv_tensors(
    spec: KVCacheSpec, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, key and value caches of shape [num_blocks, block_size, Hkv, D]."""
    shape = (num_blocks, block_size, spec.num_kv_heads, spec.head_dim)
    return [
        (
            torch.zeros(shape, dtype=dtype, device=device),
            torch.zeros(shape, dtype=dtype, device=device),
        )
        for _ in range(spec.num_layers)
    ]


def bytes_per_block(spec: KVCacheSpec, block_size: int, dtype: torch.dtype) -> int:
    element = torch.tensor([], dtype=dtype).element_size()
    return 2 * spec.num_layers * block_size * spec.num_kv_heads * spec.head_dim * element


def choose_num_blocks(
    spec: KVCacheSpec,
    block_size: int,
    dtype: torch.dtype,
    device: torch.device,
    *,
    requested: int | None,
    memory_fraction: float,
    cpu_bytes: int,
    max_length: int,
    max_num_seqs: int,
) -> int:
    """Pool size: ``requested`` if given; on CUDA a fraction of free memory (after
    the weights are loaded); on CPU ``cpu_bytes`` but no more than every sequence
    at full length would use."""
    if requested is not None:
        return requested
    per_block = bytes_per_block(spec, block_size, dtype)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        # Leave room for activations of the largest forward pass.
        return max(1, int(free * memory_fraction) // per_block)
    useful = blocks_for(max_length, block_size) * max_num_seqs
    return max(blocks_for(max_length, block_size), min(useful, cpu_bytes // per_block))
