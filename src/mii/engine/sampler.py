"""Batched sampling on the device.

Randomness is counter-based: the noise for a request's n-th generated token is a
hash of (request seed, n, vocabulary index). It depends on nothing else, so a
seeded request samples the same text alone, inside any batch, and after being
preempted and recomputed; and no per-request generator state has to be kept.
Sampling uses the exponential-race form of the Gumbel-max trick:
``argmax(p / E)`` with ``E ~ Exp(1)`` draws a token with probability ``p``.

``sample_next_tokens`` is the engine's entry: it builds a ``SamplingBatch``
from the sequences' generation options (one upload) unless the whole batch is
plainly greedy, which is one argmax.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mii.engine import grammar_mask, logits_processors
from mii.engine.logprobs import LogprobTensors, score
from mii.engine.sequence import Sequence
from mii.ops.transfer import upload

_MASK32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2**32 for x < 2**32 held in int64, without overflowing int64."""
    low, high = constant & 0xFFFF, constant >> 16
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit integer finaliser with full avalanche (lowbias32)."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def counter_uniform(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniform (0, 1) noise [S, V] from per-row seeds (int64) and step counters."""
    seed_lo = seeds & _MASK32
    seed_hi = (seeds >> 32) & _MASK32
    row = _mix32(seed_lo ^ _mix32(seed_hi ^ _mix32(steps & _MASK32)))  # [S]
    cols = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    bits = _mix32(row[:, None] ^ _mix32(cols[None, :] + 0x9E3779B9))  # [S, V]
    return (bits.double() + 0.5) / 2.0**32


@dataclass
class SamplingBatch:
    """Per-row sampling settings, as device tensors."""

    greedy: torch.Tensor  # [S] bool
    temperature: torch.Tensor  # [S] float32 (1.0 where unset or greedy)
    top_k: torch.Tensor  # [S] int64 (vocab size where unset or larger)
    top_p: torch.Tensor  # [S] float32
    seeds: torch.Tensor  # [S] int64
    steps: torch.Tensor  # [S] int64: tokens generated so far
    ban_eos: torch.Tensor  # [S] bool: min_new_tokens not reached yet
    # The same facts known on the host, so that sampling reads nothing back from
    # the device (which would wait for the pass in flight). None: read the tensors.
    greedy_host: bool | None = None  # every row greedy
    ban_eos_host: bool | None = None  # some row bans EOS
    # Penalties, logit_bias, min_p, stop-token bans (engine/logits_processors.py);
    # None when no row sets any.
    processing: logits_processors.LogitsProcessing | None = None

    @property
    def all_greedy(self) -> bool:
        return bool(self.greedy.all()) if self.greedy_host is None else self.greedy_host

    @property
    def any_ban_eos(self) -> bool:
        return bool(self.ban_eos.any()) if self.ban_eos_host is None else self.ban_eos_host


def sample(logits: torch.Tensor, batch: SamplingBatch, eos_token_ids: list[int]) -> torch.Tensor:
    """logits: [S, V] float32 -> next token ids [S] (int64, on the same device)."""
    return sample_with_logprobs(logits, batch, eos_token_ids, processed_logprobs=False)[0]


def sample_with_logprobs(
    logits: torch.Tensor,
    batch: SamplingBatch,
    eos_token_ids: list[int],
    processed_logprobs: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``sample``, and when ``processed_logprobs`` the log-probabilities [S, V] of
    the distribution each row is sampled from (greedy rows: of the logits after
    bans and penalties; sampled rows: after temperature, top-k and top-p too,
    -inf outside them)."""
    if eos_token_ids and batch.any_ban_eos:
        (eos,) = upload(logits.device, [(eos_token_ids, torch.int64)])
        banned = logits[:, eos].masked_fill(batch.ban_eos[:, None], float("-inf"))
        logits = logits.index_copy(1, eos, banned)
    if batch.processing is not None:  # before the argmax: they change greedy tokens too
        logits = logits_processors.apply(logits, batch.processing, batch.temperature)
    greedy_tokens = logits.argmax(dim=-1)
    if batch.all_greedy:
        return greedy_tokens, logits.log_softmax(dim=-1) if processed_logprobs else None

    vocab = logits.shape[-1]
    scaled = logits / batch.temperature[:, None]
    sorted_logits, sorted_ids = scaled.sort(dim=-1, descending=True)
    ranks = torch.arange(vocab, device=logits.device)[None, :]
    # top-k first, then top-p on the renormalised survivors (as transformers and vLLM do)
    sorted_logits = sorted_logits.masked_fill(ranks >= batch.top_k[:, None], float("-inf"))
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    # The top token always survives; top_p == 1 filters nothing (even if float sums pass 1).
    cut = (mass_before >= batch.top_p[:, None]) & (batch.top_p[:, None] < 1.0)
    probs = probs.masked_fill(cut, 0.0)

    noise = -torch.log(counter_uniform(batch.seeds, batch.steps, vocab)).to(probs.dtype)
    noise = noise.gather(1, sorted_ids)  # noise is keyed by token id, not by rank
    choice = (probs / noise).argmax(dim=-1, keepdim=True)
    sampled = sorted_ids.gather(1, choice).squeeze(1)
    tokens = torch.where(batch.greedy, greedy_tokens, sampled)
    if not processed_logprobs:
        return tokens, None
    # log_softmax of the surviving logits, not log(probs): exact for unlikely tokens
    sorted_logprobs = sorted_logits.masked_fill(cut, float("-inf")).log_softmax(dim=-1)
    sampled_logprobs = torch.empty_like(sorted_logprobs).scatter_(1, sorted_ids, sorted_logprobs)
    return tokens, torch.where(batch.greedy[:, None], logits.log_softmax(dim=-1), sampled_logprobs)


def sample_next_tokens(
    logits: torch.Tensor,
    seqs: list[Sequence],
    eos_token_ids: list[int],
    vocab_size: int,
    pending: torch.Tensor | None = None,
) -> tuple[torch.Tensor, LogprobTensors | None]:
    """Next token of each sequence (logits: [S, V], one row per sequence), and
    their logprobs when some sequence asks for ``logprobs`` (a row that did not
    ask is computed too and dropped: no per-row work). The common all-greedy case
    is one argmax, decided on the host so that no device value is read to choose
    the path. ``pending``: the in-flight pass's sampled tokens (async scheduling),
    which penalties count."""
    if grammar_mask.any_constrained(seqs):  # structured output: only its rows
        logits = grammar_mask.apply_masks(logits, seqs, vocab_size, eos_token_ids)
    plain_greedy = all(
        s.params.greedy
        and (s.params.ignore_eos or s.num_generated >= s.params.min_new_tokens)
        and not s.params.processes_logits
        for s in seqs
    )
    asked = [s.params.logprobs for s in seqs if s.params.logprobs is not None]
    processed = [s.params.logprobs_mode == "processed" for s in seqs] if asked else []
    if plain_greedy and not any(processed):
        tokens, processed_logprobs = logits.argmax(dim=-1), None
    else:
        batch = sampling_batch(seqs, vocab_size, logits.device, pending, eos_token_ids)
        tokens, processed_logprobs = sample_with_logprobs(
            logits, batch, eos_token_ids, any(processed)
        )
    if not asked:
        return tokens, None
    logprobs = logits.log_softmax(dim=-1)  # raw: the model's own distribution
    if processed_logprobs is not None:
        (rows,) = upload(logits.device, [(processed, torch.bool)])
        logprobs = torch.where(rows[:, None], processed_logprobs, logprobs)
    return tokens, score(logprobs, tokens, max(asked))


def sampling_batch(
    seqs: list[Sequence],
    vocab_size: int,
    device: torch.device,
    pending: torch.Tensor | None = None,
    eos_token_ids: list[int] | tuple[int, ...] = (),
) -> SamplingBatch:
    """The sequences' sampling settings (and logits processing) as device tensors,
    uploaded together."""
    # None: no row needs any
    processing = logits_processors.plan(seqs, vocab_size, eos_token_ids)
    extra = processing.arrays if processing is not None else []
    ps = [s.params for s in seqs]
    greedy = [p.greedy for p in ps]
    # A constrained row's grammar decides when it may end (banning EOS there could
    # leave it no token at all).
    ban_eos = [
        not p.ignore_eos and s.grammar is None and s.num_generated < p.min_new_tokens
        for s, p in zip(seqs, ps)
    ]
    columns = upload(
        device,
        [
            (greedy, torch.bool),
            (
                [1.0 if p.greedy or p.temperature is None else p.temperature for p in ps],
                torch.float32,
            ),
            ([min(p.top_k or vocab_size, vocab_size) for p in ps], torch.int64),
            ([p.top_p for p in ps], torch.float32),
            ([s.seed for s in seqs], torch.int64),
            ([s.num_generated for s in seqs], torch.int64),
            (ban_eos, torch.bool),
            *extra,  # the logits processors' arrays, in the same upload
        ],
    )
    own = len(columns) - len(extra)
    return SamplingBatch(
        *columns[:own],
        greedy_host=all(greedy),
        ban_eos_host=any(ban_eos),
        processing=processing.on_device(columns[own:], pending) if processing else None,
    )
