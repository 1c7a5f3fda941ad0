"""The grammar mask of a batch (engine/grammar_mask.py), on the CPU and on CUDA
(skipped without one): only constrained rows change, exactly the tokens their
grammar forbids become -inf (ids past the tokenizer's vocabulary too), rows of
requests that ended are left alone."""

from __future__ import annotations

import pytest
import torch

from mii.config import GenerateParams
from mii.engine import grammar_mask
from mii.engine.constraints import GrammarCache
from mii.engine.sequence import Sequence, SequenceStatus

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ],
    ),
]
PAD = 37  # LM-head rows past the tokenizer's vocabulary


def seq(cache: GrammarCache, **options) -> Sequence:
    params = GenerateParams.parse(**options)
    grammar = cache.get(params.constraint) if params.constraint else None
    matcher = grammar_mask.new_matcher(grammar) if grammar is not None else None
    return Sequence("r", [1, 2], params, 8, 0, grammar=matcher)


@pytest.mark.parametrize("device", DEVICES)
def test_only_constrained_rows_are_masked(tokenizer, device):
    vocab = len(tokenizer) + PAD
    cache = GrammarCache(tokenizer, vocab, [tokenizer.eos_token_id])
    seqs = [
        seq(cache),
        seq(cache, choice=["yes", "no"]),
        seq(cache),
        seq(cache, regex="[0-9]+"),
        seq(cache, choice=["x"]),
    ]
    seqs[4].status = SequenceStatus.FINISHED  # ended meanwhile: its row is discarded
    logits = torch.randn(len(seqs), vocab, device=device)
    masked = grammar_mask.apply_masks(logits, seqs, vocab)
    assert masked.device == logits.device
    for row in (0, 2, 4):
        assert torch.equal(masked[row], logits[row])
    allowed = {1: ["y", "n"], 3: list("0123456789")}  # first characters a grammar allows
    for row, starts in allowed.items():
        ok = (masked[row] > float("-inf")).nonzero().flatten().tolist()
        assert ok and all(t < len(tokenizer) for t in ok)
        texts = tokenizer.convert_ids_to_tokens(ok)
        assert all(text[0] in starts for text in texts), texts
        assert torch.equal(masked[row, ok], logits[row, ok])
    # every row constrained: the same masks
    both = grammar_mask.apply_masks(logits[[1, 3]], [seqs[1], seqs[3]], vocab)
    assert torch.equal(both, masked[[1, 3]])
