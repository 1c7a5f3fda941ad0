"""The CUDA-graph decode path stages its inputs on the host; they must describe
exactly the batch that the eager path builds (checked here without a GPU)."""

from __future__ import annotations

import types

import numpy as np
import torch

from mii.config import GenerateParams
from mii.engine.cuda_graphs import graph_batch_sizes, stage_decode_inputs
from mii.engine.model_runner import ModelRunner, PassInputs, describe_pass
from mii.engine.scheduler import ScheduledChunk
from mii.engine.sequence import Sequence


def decoding_sequences(lengths, block_size):
    seqs, next_block = [], 0
    for i, n in enumerate(lengths):
        seq = Sequence(str(i), list(range(10 + i, 10 + i + n)), GenerateParams(), 8, 0)
        blocks = (n + block_size - 1) // block_size
        seq.block_table = list(range(next_block + 7, next_block + 7 + blocks))[::-1]
        next_block += blocks
        seq.num_computed = n - 1  # the newest token is the one to decode
        seqs.append(seq)
    return seqs


def test_staged_inputs_match_the_eager_batch():
    block_size, scratch = 4, 999 * 4
    seqs = decoding_sequences([5, 1, 9, 12, 4], block_size)
    chunks = [ScheduledChunk(s, 1) for s in seqs]
    size = next(s for s in graph_batch_sizes(16) if s >= len(chunks))
    host = np.full((4, 16), -1, dtype=np.int64)
    tables = np.full((16, 6), -1, dtype=np.int32)
    inputs = describe_pass(chunks, block_size)
    assert inputs.is_decode
    stage_decode_inputs(inputs, scratch, host, tables, size)

    model = types.SimpleNamespace(forward=None, modules=lambda: [])
    runner = ModelRunner(model, [], block_size, torch.device("cpu"))
    token_ids, positions, batch, sample_rows = runner.prepare(inputs)
    n = len(chunks)
    assert host[0, :n].tolist() == token_ids.tolist()
    assert host[1, :n].tolist() == positions.tolist()
    assert host[2, :n].tolist() == batch.slot_mapping.tolist()
    assert host[3, :n].tolist() == batch.seq_lens.tolist()
    width = batch.block_tables.shape[1]
    assert tables[:n, :width].tolist() == batch.block_tables.tolist()
    assert sample_rows.tolist() == list(range(n))
    # padding rows: no keys, writes go to the scratch slot, nothing left from before
    assert size > n
    assert host[3, n:size].tolist() == [0] * (size - n)
    assert host[2, n:size].tolist() == [scratch] * (size - n)
    assert (tables[n:size] == 0).all()


def test_graph_batch_sizes_cover_every_batch():
    sizes = graph_batch_sizes(100)
    assert sizes[0] == 1 and sizes[-1] == 100
    assert all(any(s >= b for s in sizes) for b in range(1, 101))
    assert sizes == sorted(set(sizes))


def test_pass_description_survives_packing():
    block_size = 4
    seqs = decoding_sequences([5, 1, 9], block_size)
    seqs[0].num_computed = 0  # a prompt chunk among decodes
    seqs[1].pending_row = 3  # a token still on the device
    chunks = [ScheduledChunk(seqs[0], 3), ScheduledChunk(seqs[1], 1), ScheduledChunk(seqs[2], 1)]
    inputs = describe_pass(chunks, block_size)
    assert not inputs.is_decode
    assert inputs.sample_rows.tolist() == [3, 4]  # the prompt chunk stops short of its end
    assert inputs.pending_dst.tolist() == [3] and inputs.pending_src.tolist() == [3]
    back = PassInputs.unpack(inputs.pack())
    for name in vars(inputs):
        assert np.array_equal(getattr(back, name), getattr(inputs, name)), name
    assert back.block_tables.shape == inputs.block_tables.shape
