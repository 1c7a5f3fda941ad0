"""Per-sequence grammar matchers and the allowed-token mask of a batch.

A constrained sequence carries an xgrammar ``GrammarMatcher`` (``Sequence.grammar``)
for its compiled constraint (``engine/constraints.py``). Before sampling, each
constrained row's matcher writes the row's allowed tokens into a packed int32
bitmask [S_constrained, ceil(V/32)]; that is uploaded once and applied on the
device to those rows only, before greedy argmax and sampling
(``engine/sampler.py``). After the pass, each sampled token is fed to its
matcher (``accept``, from ``EngineCore._resolve``), exactly once per token:
preemption recomputes a sequence's KV but samples no token it already has, so
its matcher stays valid across it.

The mask of pass N+1 needs the tokens of pass N on the host, so a pass that
samples a constrained row is resolved synchronously, even under async
scheduling (``EngineCore.step``).
"""

from __future__ import annotations

from typing import Any

import torch

from mii.engine.sequence import Sequence
from mii.ops.transfer import upload


def new_matcher(compiled: Any) -> Any:
    """A fresh matcher at the start of ``compiled``'s grammar."""
    import xgrammar

    return xgrammar.GrammarMatcher(compiled)


def any_constrained(seqs: list[Sequence]) -> bool:
    return any(s.grammar is not None for s in seqs)


def apply_masks(logits: torch.Tensor, seqs: list[Sequence], vocab_size: int) -> torch.Tensor:
    """The logits [S, V] with every token a constrained row's grammar does not allow
    next set to -inf (ids past the tokenizer's vocabulary included). Rows without
    a constraint are unchanged. (Out of place: the forward's logits are inference
    tensors.)"""
    import xgrammar

    rows = [i for i, s in enumerate(seqs) if s.grammar is not None]
    bitmask = xgrammar.allocate_token_bitmask(len(rows), vocab_size)  # host, int32
    for j, i in enumerate(rows):
        seqs[i].grammar.fill_next_token_bitmask(bitmask, j)
    width = logits.shape[-1]
    index = None
    if len(rows) == len(seqs):  # every row constrained
        constrained = logits.clone()
    else:  # the constrained rows (xgrammar's rows of mask and logits coincide)
        (index,) = upload(logits.device, [(rows, torch.int64)])
        constrained = logits.index_select(0, index)
    if logits.device.type != "cpu":
        (bitmask,) = upload(logits.device, [(bitmask.numpy(), torch.int32)])  # one upload
    xgrammar.apply_token_bitmask_inplace(constrained, bitmask, vocab_size=min(vocab_size, width))
    if width > vocab_size:  # a padded LM head: no grammar allows those ids
        constrained[:, vocab_size:] = float("-inf")
    return constrained if index is None else logits.index_copy(0, index, constrained)


def accept(seq: Sequence, token: int) -> bool:
    """Advance ``seq``'s matcher by its newly sampled ``token``; True when its
    grammar is now complete (the request ends with finish_reason "stop").
    RuntimeError if the grammar rejects the token (the mask allowed only its
    tokens, so that is a bug, reported on this request alone)."""
    matcher = seq.grammar
    if not matcher.accept_token(token):
        raise RuntimeError(
            f"the grammar of request {seq.request_id} rejected token {token} that its mask allowed"
        )
    return matcher.is_terminated()
