"""Log-probabilities of tokens, reduced on the device.

Two kinds are computed, both in float32 from the same logits the sampler sees:

- of each generated token: one row per sequence that samples in a pass
  (``engine/sampler.py`` picks the raw or the processed distribution per row);
- of each prompt token: the logits at position ``j - 1`` score prompt token
  ``j``, so a prefill chunk over positions ``[start, start + n)`` scores prompt
  tokens ``start + 1 .. start + n``. Those rows are extra rows of the chunk's
  hidden states, turned into logits a slice at a time (``score_hidden_rows``).

Either way [N, V] logits become N chosen logprobs and N x K most likely tokens
on the device; only those small tensors are copied to the host, with the
sampled tokens, in the pass's one read-back.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields

import torch

from mii.engine.sequence import Sequence
from mii.response import TokenLogprob

# Prompt rows turned into logits at once: [rows, vocab] float32 is what a
# long prompt would otherwise hold (a 1,024-token chunk over a 128k
# vocabulary is 512 MiB); 256 rows keep it at 128 MiB at most.
PROMPT_SLICE_ROWS = 256


@dataclass
class LogprobTensors:
    """Logprobs of N tokens: each one's own, its rank, and the K most likely at its
    position."""

    chosen: torch.Tensor  # [N] float32
    top_ids: torch.Tensor  # [N, K] int64
    top_logprobs: torch.Tensor  # [N, K] float32
    rank: torch.Tensor  # [N] int64: 1 + the tokens more likely than it

    def to_host(self) -> LogprobTensors:
        """Start copying to pinned host memory without waiting (CUDA); the caller
        records the event that says when the copies are done. On the CPU: self."""
        if self.chosen.device.type != "cuda":
            return self
        copies = []
        for f in fields(self):
            tensor = getattr(self, f.name)
            host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            copies.append(host.copy_(tensor, non_blocking=True))
        return LogprobTensors(*copies)

    def as_lists(self) -> HostLogprobs:
        """Python lists (once the copies are done): one conversion per pass."""
        return HostLogprobs(
            self.chosen.tolist(),
            self.top_ids.tolist(),
            self.top_logprobs.tolist(),
            self.rank.tolist(),
        )


@dataclass
class HostLogprobs:
    """``LogprobTensors`` as Python lists, to build each request's entries from."""

    chosen: list[float]
    top_ids: list[list[int]]
    top_logprobs: list[list[float]]
    rank: list[int]

    def entry(self, row: int, token_id: int, k: int) -> TokenLogprob:
        """Row ``row`` as the TokenLogprob of ``token_id`` with its ``k`` most likely."""
        top = list(zip(self.top_ids[row][:k], self.top_logprobs[row][:k]))
        return TokenLogprob(token_id, self.chosen[row], top, self.rank[row])


def score(logprobs: torch.Tensor, tokens: torch.Tensor, k: int) -> LogprobTensors:
    """logprobs: [N, V] log-probabilities; tokens: [N] -> their logprobs, ranks (vLLM's:
    1 + how many tokens are more likely, so ties share the best rank) and top k."""
    chosen = logprobs.gather(1, tokens[:, None]).squeeze(1)
    top_logprobs, top_ids = (
        logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], tokens[:, None][:, :0])
    )
    rank = (logprobs > chosen[:, None]).sum(dim=-1) + 1
    return LogprobTensors(chosen, top_ids, top_logprobs, rank)


def score_hidden_rows(
    compute_logits: Callable[[torch.Tensor], torch.Tensor],
    hidden: torch.Tensor,
    targets: torch.Tensor,
    k: int,
) -> LogprobTensors:
    """hidden: [Q, D] rows whose logits score ``targets`` [Q]: their raw logprobs and
    top k, computed PROMPT_SLICE_ROWS rows at a time. Every tensor-parallel rank
    runs this (``compute_logits`` gathers the vocabulary shards)."""
    parts = []
    for start in range(0, hidden.shape[0], PROMPT_SLICE_ROWS):
        rows = slice(start, start + PROMPT_SLICE_ROWS)
        logprobs = compute_logits(hidden[rows]).float().log_softmax(dim=-1)
        parts.append(score(logprobs, targets[rows], k))
    return LogprobTensors(
        *[torch.cat([getattr(p, f.name) for p in parts]) for f in fields(LogprobTensors)]
    )


def prompt_span(seq: Sequence, start: int, num_tokens: int) -> range:
    """The prompt tokens whose logprobs a chunk of ``seq`` (positions ``[start,
    start + num_tokens)``) scores: ``start + 1 .. start + num_tokens``, only prompt
    tokens, and only those not scored yet (a preempted sequence recomputes its
    prompt; each token is scored once). Empty unless ``prompt_logprobs`` is asked."""
    if seq.params.prompt_logprobs is None:
        return range(0)
    first = max(start + 1, seq.prompt_scored_upto)
    return range(first, min(start + num_tokens, seq.prompt_len - 1) + 1)
