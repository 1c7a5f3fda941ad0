"""CUDA graphs for decode-only passes.

A decode pass (every sequence contributes exactly its one newest token) has a
shape that depends only on the number of sequences. For a few bucketed batch
sizes we capture the whole forward, LM head included, once; a pass then copies
its inputs into the static buffers, pads up to the bucket, and replays the
graph: one launch instead of hundreds, which is what batch-1 decode is bound by.

Padding rows attend to nothing (key length 0) and write their KV into a scratch
block that no sequence owns.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from mii.engine.model_runner import PassInputs, fill_pending
from mii.models.base import CausalLM, ForwardContext
from mii.ops.attention import SMALL_TILE, AttentionBatch, TileSet

log = logging.getLogger(__name__)


def graph_batch_sizes(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8, *range(16, max_batch + 1, 16)]
    return sorted({s for s in sizes if s <= max_batch} | {max_batch})


def stage_decode_inputs(
    inputs: PassInputs,
    scratch_slot: int,
    host: np.ndarray,
    tables: np.ndarray,
    size: int,
) -> None:
    """Fill the host staging buffers of a decode pass padded to ``size`` rows.

    ``host`` rows: token id, position, cache slot, key length; ``tables``: block
    tables. Padding rows have key length 0 (they attend to nothing) and write
    their KV into the scratch slot.
    """
    n, width = inputs.block_tables.shape
    host[:, :size] = 0
    host[2, :size] = scratch_slot
    tables[:size] = 0
    host[0, :n] = inputs.token_ids
    host[1, :n] = inputs.positions
    host[2, :n] = inputs.slots
    host[3, :n] = inputs.seq_lens
    tables[:n, :width] = inputs.block_tables


class CudaGraphRunner:
    def __init__(
        self,
        model: CausalLM,
        forward,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        block_size: int,
        max_batch: int,
        max_blocks_per_seq: int,
        scratch_block: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.forward = forward  # model.forward, or its torch.compile'd version
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.scratch_slot = scratch_block * block_size
        self.sizes = graph_batch_sizes(max_batch)
        n, width = self.sizes[-1], max_blocks_per_seq
        self.max_blocks = width

        def zeros(*shape, dtype):
            return torch.zeros(*shape, dtype=dtype, device=device)

        # Static inputs, shared by every graph (each uses the first `size` rows).
        self.token_ids = zeros(n, dtype=torch.int64)
        self.positions = zeros(n, dtype=torch.int64)
        self.slots = torch.full((n,), self.scratch_slot, dtype=torch.int64, device=device)
        self.block_tables = zeros(n, width, dtype=torch.int32)
        self.seq_lens = zeros(n, dtype=torch.int32)
        self.cu_seqlens = torch.arange(n + 1, dtype=torch.int32, device=device)
        self.tile_seq = torch.arange(n, dtype=torch.int32, device=device)
        self.tile_start = zeros(n, dtype=torch.int32)
        # Pinned host staging: one host-to-device copy per buffer per pass. Two
        # sets, used in turn: with async scheduling the next pass is staged while
        # the copies of the one in flight may still be queued on the device.
        self.staging = [
            (
                torch.zeros(4, n, dtype=torch.int64, pin_memory=True),
                torch.zeros(n, width, dtype=torch.int32, pin_memory=True),
            )
            for _ in range(2)
        ]
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}
        self.pool = None
        self.replays = 0

    def can_run(self, inputs: PassInputs) -> bool:
        return (
            inputs.is_decode
            and len(inputs.query_lens) <= self.sizes[-1]
            and inputs.block_tables.shape[1] <= self.max_blocks
        )

    def _batch(self, size: int) -> AttentionBatch:
        return AttentionBatch(
            slot_mapping=self.slots[:size],
            block_tables=self.block_tables[:size],
            cu_seqlens_q=self.cu_seqlens[: size + 1],
            seq_lens=self.seq_lens[:size],
            query_lens_host=[1] * size,
            seq_lens_host=[0] * size,
            tiles=[TileSet(SMALL_TILE, self.tile_seq[:size], self.tile_start[:size])],
        )

    def _forward(self, size: int) -> torch.Tensor:
        ctx = ForwardContext(self._batch(size), self.kv_caches)
        hidden = self.forward(self.token_ids[:size], self.positions[:size], ctx)
        return self.model.compute_logits(hidden)

    @torch.inference_mode()
    def capture(self) -> float:
        """Capture one graph per batch size (largest first, sharing one memory pool)."""
        start = time.perf_counter()
        self.pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for size in reversed(self.sizes):
                for _ in range(2):  # warm up: Triton compiles, allocator settles
                    self._forward(size)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self.pool, stream=stream):
                    self.outputs[size] = self._forward(size)
                self.graphs[size] = graph
        torch.cuda.current_stream(self.device).wait_stream(stream)
        torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - start
        log.info("captured %d CUDA graphs in %.1f s", len(self.graphs), elapsed)
        return elapsed

    @torch.inference_mode()
    def run(self, inputs: PassInputs, pending: torch.Tensor | None = None) -> torch.Tensor:
        """Replay the smallest graph that fits; float32 logits [sequences, V].

        ``pending``: sampled tokens of the pass in flight (see ``fill_pending``).
        The logits live in the graph's output buffer: use them before the next run.
        """
        count = len(inputs.query_lens)
        size = next(s for s in self.sizes if s >= count)
        host, host_tables = self.staging[self.replays % 2]
        stage_decode_inputs(inputs, self.scratch_slot, host.numpy(), host_tables.numpy(), size)
        # Copies come from the pinned tensors themselves, not their numpy views.
        self.token_ids[:size].copy_(host[0, :size], non_blocking=True)
        self.positions[:size].copy_(host[1, :size], non_blocking=True)
        self.slots[:size].copy_(host[2, :size], non_blocking=True)
        self.seq_lens[:size].copy_(host[3, :size], non_blocking=True)
        self.block_tables[:size].copy_(host_tables[:size], non_blocking=True)
        fill_pending(self.token_ids[:size], inputs, pending)
        self.graphs[size].replay()
        self.replays += 1
        return self.outputs[size][:count]
