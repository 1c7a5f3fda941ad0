"""Turns a scheduled pass into one ragged batch and runs the model on it.

A pass is first described on the host as ``PassInputs`` (flat numpy arrays);
the description is what tensor parallelism sends to the other ranks, so every
rank runs ``ModelRunner.execute`` on the same description.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from mii.engine.logprobs import LogprobTensors, prompt_span, score_hidden_rows
from mii.engine.scheduler import ScheduledChunk
from mii.models.base import CausalLM, ForwardContext
from mii.ops.attention import AttentionBatch, TileSet, plan_tiles
from mii.ops.transfer import upload


@dataclass
class PassInputs:
    """Everything a forward pass needs to know about its batch, on the host.

    T tokens over S sequences; R of them are sampled; P input tokens are still
    on the device (async scheduling) and are read from row ``pending_src[i]`` of
    the in-flight pass's tokens into flat position ``pending_dst[i]``.
    """

    token_ids: np.ndarray  # [T] int64 (pending tokens hold PENDING_TOKEN)
    positions: np.ndarray  # [T] int64
    slots: np.ndarray  # [T] int64: KV cache slot each token writes
    query_lens: np.ndarray  # [S] int64: tokens of each sequence in this pass
    seq_lens: np.ndarray  # [S] int64: keys each sequence attends to after the pass
    block_tables: np.ndarray  # [S, W] int64
    sample_rows: np.ndarray  # [R] int64: flat index of each sampled token
    pending_dst: np.ndarray  # [P] int64
    pending_src: np.ndarray  # [P] int64
    # [T] int64: max(position + 1, prompt length) per token, the length that
    # length-dependent rope scalings (longrope, dynamic NTK) rotate it for.
    rope_lens: np.ndarray
    # prompt_logprobs: Q flat indices of tokens whose logits score the next prompt
    # token (engine/logprobs.py), those tokens' ids, and how many most likely
    # tokens to keep ([K], or [] when Q is 0).
    prompt_rows: np.ndarray  # [Q] int64
    prompt_targets: np.ndarray  # [Q] int64
    prompt_top_k: np.ndarray  # [1] or [0] int64

    @property
    def is_decode(self) -> bool:
        """One token per sequence, every one sampled: what CUDA graphs replay."""
        return (
            bool((self.query_lens == 1).all())
            and len(self.sample_rows) == len(self.query_lens)
            and not len(self.prompt_rows)
        )

    def pack(self) -> np.ndarray:
        """One int64 array: a header of lengths, then every field flattened."""
        arrays = [getattr(self, f.name) for f in fields(self)]
        header = [len(arrays)] + [a.size for a in arrays] + [self.block_tables.shape[1]]
        return np.concatenate([np.asarray(header, dtype=np.int64), *[a.ravel() for a in arrays]])

    @classmethod
    def unpack(cls, packed: np.ndarray) -> PassInputs:
        count = int(packed[0])
        sizes = packed[1 : 1 + count].tolist()
        width = int(packed[1 + count])
        offset = 2 + count
        values = []
        for size in sizes:
            values.append(packed[offset : offset + size])
            offset += size
        inputs = cls(*values)
        inputs.block_tables = inputs.block_tables.reshape(-1, width)
        return inputs


def describe_pass(chunks: list[ScheduledChunk], block_size: int) -> PassInputs:
    """The host-side description of a scheduled pass (on the engine's hot path:
    Python lists per chunk, one vectorised slot computation at the end)."""
    token_ids: list[int] = []
    starts: list[int] = []
    prompt_lens: list[int] = []
    query_lens: list[int] = []
    sample_rows: list[int] = []
    pending_dst: list[int] = []
    pending_src: list[int] = []
    prompt_rows: list[int] = []
    prompt_targets: list[int] = []
    prompt_top_k = 0
    width = max(len(c.seq.block_table) for c in chunks)
    tables = np.zeros((len(chunks), width), dtype=np.int64)
    offset = 0
    for i, chunk in enumerate(chunks):
        seq, start, n = chunk.seq, chunk.seq.num_computed, chunk.num_tokens
        token_ids.extend(seq.token_ids[start : start + n])
        starts.append(start)
        prompt_lens.append(max(seq.prompt_len, seq.rope_len_floor))
        query_lens.append(n)
        tables[i, : len(seq.block_table)] = seq.block_table
        if seq.params.prompt_logprobs is not None:
            span = prompt_span(seq, start, n)
            # prompt token j is scored by the logits of position j - 1
            prompt_rows.extend(
                range(offset + span.start - 1 - start, offset + span.stop - 1 - start)
            )
            prompt_targets.extend(seq.token_ids[span.start : span.stop])
            if span:
                prompt_top_k = max(prompt_top_k, seq.params.prompt_logprobs)
        offset += n
        if chunk.samples:
            sample_rows.append(offset - 1)
            # Only a sequence's last token can still be on the device.
            if seq.pending_row is not None:
                pending_dst.append(offset - 1)
                pending_src.append(seq.pending_row)

    def ints(values: list[int]) -> np.ndarray:
        return np.asarray(values, dtype=np.int64)

    lens = ints(query_lens)
    row = np.repeat(np.arange(len(chunks)), lens)  # the chunk of every token
    cu = np.cumsum(lens) - lens
    positions = ints(starts)[row] + (np.arange(len(row)) - cu[row])
    slots = tables[row, positions // block_size] * block_size + positions % block_size
    return PassInputs(
        ints(token_ids),
        positions,
        slots,
        lens,
        ints(starts) + lens,
        tables,
        ints(sample_rows),
        ints(pending_dst),
        ints(pending_src),
        np.maximum(positions + 1, ints(prompt_lens)[row]),
        ints(prompt_rows),
        ints(prompt_targets),
        ints([prompt_top_k] if prompt_rows else []),
    )


def fill_pending(token_ids: torch.Tensor, inputs: PassInputs, pending: torch.Tensor | None) -> None:
    """Copy the pending input tokens from ``pending`` (the in-flight pass's sampled
    tokens) into ``token_ids``, on the device: no host sync."""
    if not len(inputs.pending_dst):
        return
    if pending is None:
        raise RuntimeError("a sequence waits for a sampled token but no pass is in flight")
    (index,) = upload(
        token_ids.device, [(np.stack([inputs.pending_dst, inputs.pending_src]), torch.int64)]
    )
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
        # Tensor parallelism: sends each pass to the other ranks before running it.
        self.broadcast = None
        # Whether the model's rope scaling needs each token's length (ForwardContext.rope_lens).
        self.needs_rope_lens = any(getattr(m, "length_dependent", False) for m in model.modules())

    def release(self) -> None:
        """Drop every reference to the model and its KV cache (the bound forward and
        the captured graphs hold them too), so that their memory can be reclaimed."""
        self.kv_caches.clear()
        self.graphs = None
        self.forward = None
        self.model = None

    def enable_compile(self) -> None:
        """torch.compile the model (attention stays an opaque custom op); shapes are
        dynamic because every pass has a different number of tokens."""
        self.forward = torch.compile(self.model.forward, dynamic=True)

    def prepare(
        self, inputs: PassInputs
    ) -> tuple[torch.Tensor, torch.Tensor, AttentionBatch, torch.Tensor]:
        """Device tensors of a pass: (token_ids [T], positions [T], attention batch,
        indices [R] of the tokens whose logits are sampled)."""

        query_lens = inputs.query_lens.tolist()
        cu_seqlens = np.concatenate([[0], np.cumsum(inputs.query_lens)])
        tile_plans = plan_tiles(query_lens)
        int64, int32 = torch.int64, torch.int32
        token_ids, positions, slots, sample_rows, tables, cu, seq_lens, *tile_arrays = upload(
            self.device,
            [
                (inputs.token_ids, int64),
                (inputs.positions, int64),
                (inputs.slots, int64),
                (inputs.sample_rows, int64),
                (inputs.block_tables, int32),
                (cu_seqlens, int32),
                (inputs.seq_lens, int32),
                *[(values, int32) for _, seqs, starts in tile_plans for values in (seqs, starts)],
            ],
        )
        tiles = [
            TileSet(size, tile_arrays[2 * i], tile_arrays[2 * i + 1])
            for i, (size, _, _) in enumerate(tile_plans)
        ]
        batch = AttentionBatch(
            slot_mapping=slots,
            block_tables=tables,
            cu_seqlens_q=cu,
            seq_lens=seq_lens,
            query_lens_host=query_lens,
            seq_lens_host=inputs.seq_lens.tolist(),
            tiles=tiles,
        )
        return token_ids, positions, batch, sample_rows

    def run(
        self, chunks: list[ScheduledChunk], pending: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, LogprobTensors | None]:
        """Forward one scheduled pass: float32 logits [R, V] for the chunks that
        sample, and the logprobs of the prompt tokens it scores (None: none asked).

        ``pending``: the sampled tokens of the pass still in flight, which the
        sequences' pending last tokens (``Sequence.pending_row``) are read from.
        """
        inputs = describe_pass(chunks, self.block_size)
        if self.broadcast is not None:
            pending = self.broadcast(inputs, pending)
        return self.execute(inputs, pending)

    @torch.inference_mode()
    def execute(
        self, inputs: PassInputs, pending: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, LogprobTensors | None]:
        """Forward a described pass (every rank runs this on the same description)."""
        if self.graphs is not None and self.graphs.can_run(inputs):
            return self.graphs.run(inputs, pending), None
        token_ids, positions, batch, sample_rows = self.prepare(inputs)
        fill_pending(token_ids, inputs, pending)
        rope_lens = None
        if self.needs_rope_lens:
            (rope_lens,) = upload(self.device, [(inputs.rope_lens, torch.int64)])
        ctx = ForwardContext(batch, self.kv_caches, rope_lens)
        hidden = self.forward(token_ids, positions, ctx)
        logits = self.model.compute_logits(hidden.index_select(0, sample_rows))
        return logits, self._score_prompt_rows(hidden, inputs)

    def _score_prompt_rows(self, hidden: torch.Tensor, inputs: PassInputs) -> LogprobTensors | None:
        """The logprobs of the prompt tokens this pass scores (prompt_logprobs)."""
        if not len(inputs.prompt_rows):
            return None
        rows, targets = upload(
            self.device, [(inputs.prompt_rows, torch.int64), (inputs.prompt_targets, torch.int64)]
        )
        k = int(inputs.prompt_top_k[0])
        return score_hidden_rows(
            self.model.compute_logits, hidden.index_select(0, rows), targets, k
        )
