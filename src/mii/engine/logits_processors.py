"""Logits processors, batched over the rows of a pass on the device.

Each request may set (``mii.sampling_options.LogitsOptions``):

- ``allowed_token_ids`` (vLLM's): every other token's logit is -inf (a constrained
  request's end-of-sequence tokens stay allowed: its grammar decides when it ends);
- ``logit_bias``: a bias added to chosen tokens' logits (OpenAI); the stop token
  ids of a request below ``min_new_tokens`` are banned the same way (bias -inf),
  as end-of-sequence is;
- ``repetition_penalty`` (transformers' ``RepetitionPenaltyLogitsProcessor``):
  the logit of every token of the prompt or the answer so far is divided by the
  penalty when positive, multiplied by it when negative;
- ``frequency_penalty`` and ``presence_penalty`` (OpenAI): over the generated
  tokens only, ``logit -= frequency * count + presence * (count > 0)``;
- ``min_p`` (transformers' ``MinPLogitsWarper``): after temperature, tokens whose
  probability is below ``min_p`` times the top token's are dropped (-inf).

They apply in that order (the allowed tokens and the bias first, as vLLM does), before the
greedy argmax: penalties and biases change greedy answers too. ``min_p`` runs
before top-k / top-p, as in vLLM (transformers applies it after them; the
result is the same when top_p is 1).

The host describes a pass's processing as flat arrays (``plan``), uploaded
together with the sampling batch's own columns; everything per row then happens
on the device. Token counts come from one ``scatter_add`` over a padded [P, L]
tensor of the token ids of only the P rows with a penalty (the padding, and a
token still on the device, point at a spare column V). With async scheduling a
sequence's last token may still be on the device (``Sequence.pending_row``):
it is copied from the in-flight pass's sampled tokens on the device, without
waiting for them. A batch in which no request sets any of these options gets no
plan at all (decided on the host from its options), so it is sampled exactly as
before.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from mii.engine.sequence import Sequence


@dataclass
class LogitsPlan:
    """A pass's logits processing on the host: what to upload, and which parts apply."""

    arrays: list[tuple[np.ndarray, torch.dtype]]  # uploaded with the sampling batch's
    has_penalties: bool
    has_bias: bool
    has_min_p: bool
    has_pending: bool
    has_allowed: bool = False

    def on_device(
        self, tensors: list[torch.Tensor], pending: torch.Tensor | None
    ) -> LogitsProcessing:
        """The device side, from ``arrays`` uploaded (in order) as ``tensors``;
        ``pending``: the in-flight pass's sampled tokens (async scheduling)."""
        it = iter(tensors)
        out = LogitsProcessing()
        if self.has_penalties:
            rows, ids, prompt_lens, penalties = next(it), next(it), next(it), next(it)
            if self.has_pending:
                index = next(it)  # [2, Q]: flat position in ids <- row of pending
                if pending is None:
                    raise RuntimeError(
                        "a penalised sequence waits for a token but none is in flight"
                    )
                ids.view(-1).index_copy_(0, index[0], pending.index_select(0, index[1]))
            out.penalty_rows, out.token_ids, out.prompt_lens = rows, ids, prompt_lens
            out.presence, out.frequency, out.repetition = penalties.unbind(0)
        if self.has_bias:
            out.bias_index, out.bias_values = next(it), next(it)
        if self.has_min_p:
            out.min_p = next(it)
        if self.has_allowed:
            out.allowed_rows, out.allowed_index = next(it), next(it)
        return out


@dataclass
class LogitsProcessing:
    """A pass's logits processors as device tensors; a part left None does not apply."""

    penalty_rows: torch.Tensor | None = None  # [P] int64: rows with a penalty
    token_ids: torch.Tensor | None = None  # [P, L] int64: prompt + generated, padded with V
    prompt_lens: torch.Tensor | None = None  # [P] int64: where the generated tokens start
    presence: torch.Tensor | None = None  # [P] float32
    frequency: torch.Tensor | None = None  # [P] float32
    repetition: torch.Tensor | None = None  # [P] float32
    bias_index: torch.Tensor | None = None  # [2, B] int64: (row, token) of each bias
    bias_values: torch.Tensor | None = None  # [B] float32 (-inf: a banned stop token)
    min_p: torch.Tensor | None = None  # [S] float32 (0: off)
    allowed_rows: torch.Tensor | None = None  # [R] int64: rows limited to some tokens
    allowed_index: torch.Tensor | None = None  # [2, A] int64: (row, token) allowed


def plan(
    seqs: list[Sequence],
    vocab_size: int,
    eos_token_ids: list[int] | tuple[int, ...] = (),
) -> LogitsPlan | None:
    """The host side of a pass's logits processing; None when no row needs any.
    ``eos_token_ids``: allowed beside a constrained row's ``allowed_token_ids``
    (its grammar decides when it ends, as engine/grammar_mask.py masks it)."""
    if not any(s.params.processes_logits for s in seqs):
        return None
    penalised: list[int] = []
    bias_rows: list[int] = []
    bias_tokens: list[int] = []
    bias_values: list[float] = []
    min_p = [0.0] * len(seqs)
    allowed_rows: list[int] = []
    allowed_pairs: list[tuple[int, int]] = []
    for row, seq in enumerate(seqs):
        p = seq.params
        if not p.processes_logits:
            continue
        if p.allowed_token_ids is not None:
            allowed_rows.append(row)
            allowed_pairs += [(row, token) for token in p.allowed_token_ids]
            if seq.grammar is not None:
                allowed_pairs += [(row, token) for token in eos_token_ids]
        if p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0:
            penalised.append(row)
        if p.logit_bias:
            bias_rows += [row] * len(p.logit_bias)
            bias_tokens += p.logit_bias.keys()
            bias_values += p.logit_bias.values()
        # (Not under a constraint, which ignores stop tokens: a ban of a token its
        # grammar needed left no token, and the request failed.)
        if p.stop_token_ids and seq.num_generated < p.min_new_tokens and p.constraint is None:
            bias_rows += [row] * len(p.stop_token_ids)
            bias_tokens += p.stop_token_ids
            bias_values += [float("-inf")] * len(p.stop_token_ids)
        min_p[row] = p.min_p
    arrays: list[tuple[np.ndarray, torch.dtype]] = []
    has_pending = False
    if penalised:
        penalty_arrays, has_pending = _penalty_arrays([seqs[r] for r in penalised], vocab_size)
        arrays += [(np.asarray(penalised), torch.int64), *penalty_arrays]
    if bias_rows:
        index = np.asarray([bias_rows, bias_tokens], dtype=np.int64)
        arrays += [(index, torch.int64), (np.asarray(bias_values), torch.float32)]
    has_min_p = any(min_p)
    if has_min_p:
        arrays.append((np.asarray(min_p), torch.float32))
    if allowed_rows:
        arrays.append((np.asarray(allowed_rows), torch.int64))
        arrays.append((np.asarray(allowed_pairs, dtype=np.int64).T.copy(), torch.int64))
    if not arrays:  # e.g. stop token ids past min_new_tokens: nothing to do
        return None
    return LogitsPlan(
        arrays, bool(penalised), bool(bias_rows), has_min_p, has_pending, bool(allowed_rows)
    )


def _penalty_arrays(
    seqs: list[Sequence], vocab_size: int
) -> tuple[list[tuple[np.ndarray, torch.dtype]], bool]:
    """Padded token ids [P, L], prompt lengths [P], penalties [3, P] and, when some
    last token is still on the device, where to copy it from ([2, Q])."""
    width = max(len(s.token_ids) for s in seqs)
    ids = np.full((len(seqs), width), vocab_size, dtype=np.int64)
    dst: list[int] = []
    src: list[int] = []
    for i, seq in enumerate(seqs):
        ids[i, : len(seq.token_ids)] = seq.token_ids
        if seq.pending_row is not None:  # only the last token can be pending
            dst.append(i * width + len(seq.token_ids) - 1)
            src.append(seq.pending_row)
    ids[ids < 0] = vocab_size  # PENDING_TOKEN counts nowhere until it is filled in
    penalties = np.asarray(
        [
            [s.params.presence_penalty for s in seqs],
            [s.params.frequency_penalty for s in seqs],
            [s.params.repetition_penalty for s in seqs],
        ],
        dtype=np.float32,
    )
    arrays = [
        (ids, torch.int64),
        (np.asarray([s.prompt_len for s in seqs]), torch.int64),
        (penalties, torch.float32),
    ]
    if dst:
        arrays.append((np.asarray([dst, src], dtype=np.int64), torch.int64))
    return arrays, bool(dst)


def apply(
    logits: torch.Tensor, processing: LogitsProcessing, temperature: torch.Tensor
) -> torch.Tensor:
    """logits [S, V] float32 -> processed logits [S, V] (a new tensor: the caller's
    logits are left as they are). ``temperature`` [S]: each row's (1 where unset)."""
    logits = logits.clone()
    if processing.allowed_index is not None:
        # True for the rows' allowed tokens and for every token of the other rows.
        keep = torch.ones_like(logits, dtype=torch.bool)
        keep.index_fill_(0, processing.allowed_rows, False)
        rows, tokens = processing.allowed_index
        keep[rows, tokens] = True
        logits.masked_fill_(~keep, float("-inf"))
    if processing.bias_index is not None:
        rows, tokens = processing.bias_index
        logits.index_put_((rows, tokens), processing.bias_values, accumulate=True)
    if processing.penalty_rows is not None:
        rows = processing.penalty_rows
        logits.index_copy_(0, rows, _penalised(logits.index_select(0, rows), processing))
    if processing.min_p is not None:
        logits = min_p_filter(logits, processing.min_p, temperature)
    return logits


def _penalised(logits: torch.Tensor, proc: LogitsProcessing) -> torch.Tensor:
    """The penalties of the P penalised rows ``logits`` [P, V]."""
    rows, vocab = logits.shape
    ids = proc.token_ids  # [P, L]; V marks padding
    positions = torch.arange(ids.shape[1], device=ids.device)
    generated = (positions[None, :] >= proc.prompt_lens[:, None]).to(logits.dtype)
    counts = torch.zeros(rows, vocab + 1, dtype=logits.dtype, device=logits.device)
    counts.scatter_add_(1, ids, generated)  # [P, V+1]: times each token was generated
    seen = torch.zeros(rows, vocab + 1, dtype=torch.bool, device=logits.device)
    seen.scatter_(1, ids, True)  # [P, V+1]: in the prompt or the answer
    counts, seen = counts[:, :vocab], seen[:, :vocab]
    # transformers: positive logits divided by the penalty, negative ones multiplied.
    penalty = proc.repetition[:, None]
    repeated = torch.where(logits < 0, logits * penalty, logits / penalty)
    logits = torch.where(seen, repeated, logits)
    # OpenAI: frequency times the count, plus presence once, over generated tokens.
    return logits - proc.frequency[:, None] * counts - proc.presence[:, None] * (counts > 0)


def min_p_filter(logits: torch.Tensor, min_p: torch.Tensor, temperature: torch.Tensor):
    """-inf where a token's probability after temperature is below ``min_p`` [S]
    times the most likely token's (rows with min_p 0 are unchanged)."""
    probs = (logits / temperature[:, None]).softmax(dim=-1)
    threshold = min_p[:, None] * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))
