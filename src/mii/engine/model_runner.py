"""Turns a scheduled pass into one ragged batch and runs the model on it."""

from __future__ import annotations

import numpy as np
import torch

from mii.engine.scheduler import ScheduledChunk
from mii.models.base import CausalLM, ForwardContext
from mii.ops.attention import AttentionBatch, TileSet, plan_tiles


def pending_inputs(chunks: list[ScheduledChunk]) -> tuple[list[int], list[int]]:
    """Input tokens of a pass still on the device (async scheduling): their flat
    index in the pass and their row in the in-flight pass's sampled tokens.

    Only a sequence's last token can be pending, so only a chunk that reaches
    the end of its sequence reads one.
    """
    dst: list[int] = []
    src: list[int] = []
    offset = 0
    for chunk in chunks:
        offset += chunk.num_tokens
        if chunk.seq.pending_row is not None and chunk.samples:
            dst.append(offset - 1)
            src.append(chunk.seq.pending_row)
    return dst, src


def fill_pending(
    token_ids: torch.Tensor, chunks: list[ScheduledChunk], pending: torch.Tensor | None
) -> None:
    """Copy the pending input tokens of ``chunks`` from ``pending`` (the in-flight
    pass's sampled tokens) into ``token_ids``, on the device: no host sync."""
    dst, src = pending_inputs(chunks)
    if not dst:
        return
    if pending is None:
        raise RuntimeError("a sequence waits for a sampled token but no pass is in flight")
    index = torch.tensor([dst, src], dtype=torch.int64).to(token_ids.device, non_blocking=True)
    token_ids.index_copy_(0, index[0], pending.index_select(0, index[1]))


class ModelRunner:
    def __init__(
        self,
        model: CausalLM,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        block_size: int,
        device: torch.device,
    ) -> None:
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.graphs = None  # a CudaGraphRunner once captured (decode-only passes)
        self.forward = model.forward  # replaced by a torch.compile'd version when enabled

    def enable_compile(self) -> None:
        """torch.compile the model (attention stays an opaque custom op); shapes are
        dynamic because every pass has a different number of tokens."""
        self.forward = torch.compile(self.model.forward, dynamic=True)

    def prepare(
        self, chunks: list[ScheduledChunk]
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionBatch, torch.Tensor]:
        """Flatten the chunks into (token_ids [T], positions [T], attention batch,
        indices [S] of the tokens whose logits are sampled)."""
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        cu_seqlens = [0]
        seq_lens: list[int] = []
        query_lens: list[int] = []
        sample_rows: list[int] = []
        for chunk in chunks:
            seq, start = chunk.seq, chunk.seq.num_computed
            end = start + chunk.num_tokens
            token_ids.extend(seq.token_ids[start:end])
            positions.extend(range(start, end))
            table = seq.block_table
            slots.extend(
                table[p // self.block_size] * self.block_size + p % self.block_size
                for p in range(start, end)
            )
            cu_seqlens.append(cu_seqlens[-1] + chunk.num_tokens)
            query_lens.append(chunk.num_tokens)
            seq_lens.append(end)
            if chunk.samples:
                sample_rows.append(cu_seqlens[-1] - 1)
        width = max(len(c.seq.block_table) for c in chunks)
        tables = np.zeros((len(chunks), width), dtype=np.int32)
        for i, chunk in enumerate(chunks):
            tables[i, : len(chunk.seq.block_table)] = chunk.seq.block_table

        def on_device(values, dtype):
            if isinstance(values, np.ndarray):
                return torch.from_numpy(values).to(self.device, non_blocking=True)
            return torch.tensor(values, dtype=dtype).to(self.device, non_blocking=True)

        tiles = [
            TileSet(size, on_device(seqs, torch.int32), on_device(starts, torch.int32))
            for size, seqs, starts in plan_tiles(query_lens)
        ]
        batch = AttentionBatch(
            slot_mapping=on_device(slots, torch.int64),
            block_tables=on_device(tables, torch.int32),
            cu_seqlens_q=on_device(cu_seqlens, torch.int32),
            seq_lens=on_device(seq_lens, torch.int32),
            query_lens_host=query_lens,
            seq_lens_host=seq_lens,
            tiles=tiles,
        )
        return (
            on_device(token_ids, torch.int64),
            on_device(positions, torch.int64),
            batch,
            on_device(sample_rows, torch.int64),
        )

    @torch.inference_mode()
    def run(
        self, chunks: list[ScheduledChunk], pending: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Forward one pass; float32 logits [S, V] for the chunks that sample.

        ``pending``: the sampled tokens of the pass still in flight, which the
        sequences' pending last tokens (``Sequence.pending_row``) are read from.
        """
        if self.graphs is not None and self.graphs.can_run(chunks):
            return self.graphs.run(chunks, pending)
        token_ids, positions, batch, sample_rows = self.prepare(chunks)
        fill_pending(token_ids, chunks, pending)
        hidden = self.forward(token_ids, positions, ForwardContext(batch, self.kv_caches))
        return self.model.compute_logits(hidden.index_select(0, sample_rows))
