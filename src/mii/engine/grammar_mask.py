"""Per-sequence grammar matchers and the allowed-token mask of a batch.

A constrained sequence carries a ``GrammarState`` (``Sequence.grammar``): an
xgrammar ``GrammarMatcher`` for its compiled constraint (``engine/constraints.py``)
and where its output stands in UTF-8 (``engine/utf8_guard.py``).
Before sampling, each constrained row's matcher writes the row's allowed tokens
into a packed int32 bitmask [S_constrained, ceil(V/32)] on the host; the
tokenizer's ``Utf8Guard`` masks are ANDed into it (xgrammar lets some ill-formed
UTF-8 through: surrogates, and overlong forms in JSON-schema patterns); it is
uploaded once and applied on the device to those rows only, before greedy argmax
and sampling
(``engine/sampler.py``). After the pass, each sampled token is fed to its
matcher (``accept``, from ``EngineCore._resolve``), exactly once per token:
preemption recomputes a sequence's KV but samples no token it already has, so
its matcher stays valid across it.

Async scheduling: the mask of pass N+1 needs the tokens of pass N on the host.
``EngineCore._launch`` queues N+1's forward, then reads N back (which waits for
N only) and advances the matchers, and only then builds the masks and queues
N+1's sampling: the host's mask work overlaps N+1's forward on the device.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mii.engine.sequence import Sequence
from mii.engine.utf8_guard import COMPLETE, Utf8Guard
from mii.errors import InvalidRequestError
from mii.ops.transfer import upload

log = logging.getLogger(__name__)

_BATCH = None  # xgrammar's BatchGrammarMatcher: a thread pool, made on first use


def _batch_matcher() -> Any:
    global _BATCH
    if _BATCH is None:
        import xgrammar

        _BATCH = xgrammar.BatchGrammarMatcher(max_threads=min(8, os.cpu_count() or 1))
    return _BATCH


@dataclass(eq=False)
class GrammarState:
    """A constrained sequence's grammar: its matcher, its tokenizer's UTF-8 guard,
    and the guard's state of the output so far (complete, or inside a character:
    which bytes may come next)."""

    matcher: Any  # xgrammar.GrammarMatcher
    guard: Utf8Guard
    utf8_state: int = COMPLETE
    # The last mask allowed no token at all: the output so far has no continuation
    # the constraint accepts (a pattern inside a schema that no string matches), or
    # none of the request's allowed_token_ids is one (stuck_on names that option).
    stuck: bool = False
    stuck_on: str | None = None
    # The request's allowed_token_ids and the end-of-sequence tokens, packed as the
    # grammar's bitmask rows are (made at the first mask that needs it).
    allowed_words: np.ndarray | None = None


def new_matcher(compiled: Any, guard: Utf8Guard) -> GrammarState:
    """A fresh state at the start of ``compiled``'s grammar; ``guard``: the UTF-8
    guard of the tokenizer it was compiled for (``GrammarCache.utf8_guard``)."""
    import xgrammar

    return GrammarState(xgrammar.GrammarMatcher(compiled), guard)


def any_constrained(seqs: list[Sequence]) -> bool:
    return any(s.grammar is not None for s in seqs)


def apply_masks(
    logits: torch.Tensor,
    seqs: list[Sequence],
    vocab_size: int,
    eos_token_ids: list[int] | tuple[int, ...] = (),
) -> torch.Tensor:
    """The logits [S, V] with every token a constrained row's grammar does not allow
    next set to -inf (ids past the tokenizer's vocabulary included), nor its
    request's ``allowed_token_ids`` (to which the end-of-sequence tokens
    ``eos_token_ids`` always belong: the grammar decides when the answer ends).
    Rows without a constraint are unchanged. (Out of place: the forward's logits
    are inference tensors.)"""
    import xgrammar

    # (a row whose request ended meanwhile, its token to be discarded, is left alone)
    rows = [i for i, s in enumerate(seqs) if s.grammar is not None and not s.is_finished]
    if not rows:
        return logits
    bitmask = xgrammar.allocate_token_bitmask(len(rows), vocab_size)  # host, int32
    states: list[GrammarState] = [seqs[i].grammar for i in rows]
    matchers = [state.matcher for state in states]
    if len(matchers) == 1:
        matchers[0].fill_next_token_bitmask(bitmask, 0)
    else:  # the rows in parallel, on xgrammar's threads (the GIL released)
        _batch_matcher().batch_fill_next_token_bitmask(matchers, bitmask)
    _keep_utf8(bitmask, states)
    for r in np.flatnonzero(~bitmask.numpy().any(axis=1)).tolist():
        states[r].stuck = True  # its sampled token is refused in accept()
    _keep_allowed(bitmask, [seqs[i] for i in rows], eos_token_ids)
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


def _keep_utf8(bitmask: torch.Tensor, states: list[GrammarState]) -> None:
    """AND each row of the host ``bitmask`` with its tokenizer's well-formed-UTF-8
    mask for the row's state (``engine/utf8_guard.py``), in place; a row this
    would leave without any token gets its grammar's own mask back (only a
    grammar that admits nothing but ill-formed UTF-8 there can cause that)."""
    packed = bitmask.numpy()  # a view: the tensor's memory
    guard = states[0].guard
    if all(state.guard is guard for state in states):  # one engine, one tokenizer
        groups = [(guard, packed, states, 0)]
    else:  # (rows of several tokenizers: each row on its own; a slice is a view)
        groups = [(s.guard, packed[r : r + 1], [s], r) for r, s in enumerate(states)]
    for guard, rows, group, first in groups:
        utf8_states = np.fromiter((s.utf8_state for s in group), dtype=np.intp, count=len(group))
        for r in guard.restrict(rows, utf8_states).tolist():
            log.warning(
                "a grammar admits only ill-formed UTF-8 (e.g. a surrogate's bytes) next; "
                "its own mask is kept for that token"
            )
            group[r].matcher.fill_next_token_bitmask(bitmask, first + r)


def _keep_allowed(
    bitmask: torch.Tensor, seqs: list[Sequence], eos_token_ids: list[int] | tuple[int, ...]
) -> None:
    """AND each row of the host ``bitmask`` whose request limits its tokens
    (``allowed_token_ids``) with those tokens and the end-of-sequence ones, in
    place. A row this leaves without any token is stuck on that option: sampling
    from it would pick a token the grammar refuses (a 500, before)."""
    packed = bitmask.numpy()
    for r, seq in enumerate(seqs):
        allowed = seq.params.allowed_token_ids
        state: GrammarState = seq.grammar
        if allowed is None or state.stuck:
            continue
        if state.allowed_words is None:
            state.allowed_words = _packed_tokens([*allowed, *eos_token_ids], packed.shape[1])
        packed[r] &= state.allowed_words
        if not packed[r].any():
            state.stuck, state.stuck_on = True, "allowed_token_ids"


def _packed_tokens(tokens: list[int], words: int) -> np.ndarray:
    """One bitmask row (int32 words, token t at bit t % 32 of word t // 32, as
    xgrammar packs them) with ``tokens`` set."""
    row = np.zeros(words, dtype=np.uint32)
    for token in tokens:
        if 0 <= token < words * 32:
            row[token >> 5] |= np.uint32(1 << (token & 31))
    return row.view(np.int32)


def only_its_end_left(seq: Sequence) -> bool:
    """Whether ``seq``'s grammar, after its tokens so far, admits nothing but its end
    (a stop token): the answer is complete. Asked once, at a request's length
    limit, so that a complete answer cut there says "stop", not "length" (the
    openai SDK's ``.parse()`` refuses an answer that ends with "length")."""
    import xgrammar

    matcher = seq.grammar.matcher
    if matcher.is_terminated():
        return True
    bitmask = xgrammar.allocate_token_bitmask(1, seq.grammar.guard.vocab_size)
    matcher.fill_next_token_bitmask(bitmask, 0)
    bits = np.unpackbits(bitmask.numpy().view(np.uint8), bitorder="little")
    allowed = np.flatnonzero(bits).tolist()
    return bool(allowed) and set(allowed) <= set(matcher.stop_token_ids)


def accept(seq: Sequence, token: int) -> bool:
    """Advance ``seq``'s matcher by its newly sampled ``token``; True when its
    grammar is now complete (the request ends with finish_reason "stop").
    InvalidRequestError if its mask allowed no token (the constraint cannot go on
    from the output so far); RuntimeError if the grammar rejects the token (the
    mask allowed only its tokens, so that is a bug, reported on this request alone)."""
    state: GrammarState = seq.grammar
    if state.stuck and state.stuck_on == "allowed_token_ids":
        constraint = seq.params.constraint[0]
        raise InvalidRequestError(
            f"invalid generation option 'allowed_token_ids': after {seq.num_generated - 1} "
            f"generated tokens none of them continues the constraint {constraint!r} (nor may "
            "it end there); allow the tokens it needs next, or drop one of the two",
            field="allowed_token_ids",
        )
    if state.stuck:
        field = seq.params.constraint[0]
        raise InvalidRequestError(
            f"invalid generation option {field!r}: after {seq.num_generated - 1} generated tokens "
            "the constraint admits no further text and cannot end (e.g. a pattern inside it "
            "that no string matches); change it",
            field=field,
        )
    if not state.matcher.accept_token(token):
        raise RuntimeError(
            f"the grammar of request {seq.request_id} rejected token {token} that its mask allowed"
        )
    state.utf8_state = state.guard.after(token, state.utf8_state)
    return state.matcher.is_terminated()
