"""Long prompt chunks through torch's SDPA (cuDNN's on NVIDIA GPUs), with
``MII_PROMPT_ATTENTION=library``: a 32k prompt's time to first token 1.29 s
instead of 1.39 on an H200 (docs/performance.md, twenty-sixth session), 1.37
instead of 1.43 on an H100 with the bounded plans below (twenty-seventh). Off by
default: serving with it is not measured yet.

Why: on an H200 cuDNN's attention takes the last 4,096-token chunk of a 32k prompt
at 570 TFLOP/s and a whole 4,096-token prompt at 506, where the Triton prompt
kernel reaches 430 and 328 (``benchmarks/attention_peers.py``; docs/performance.md,
twenty-fifth session).

How: the prompt chunks of a pass with at least ``LIBRARY_MIN_QUERIES`` queries are
attended here; the Triton operator still rotates every query and key, writes every
key and value into the cache and attends the rest of the pass (decodes, short
chunks). A chunk then reads its sequence's keys back out of the paged cache (a
32k-key gather is ~0.1 ms a layer on an H200) and attends in two library calls,
merged by their log-sum-exps: the keys cached before the chunk without a mask, and
the chunk's own keys causally (SDPA's causal mask is aligned to the first key, so
one call cannot offset the diagonal). cuDNN takes grouped-query keys as they are
(repeating them cost 0.57 ms of a 4.4 ms chunk on an H100). Not for an fp8 cache or
a sliding window (those keep the Triton kernel).

Plans: torch keys cuDNN's execution plans on the exact (queries, keys) shape unless
``TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1``, under which it takes its ragged path for
operands laid out [batch, sequence, heads, dim] in memory, with the lengths rounded
up to powers of two in the key: a bounded set of plans whatever the chunk lengths
(per-shape plans cost 42-91 ms for every new chunk length on an H100; the ragged
path itself is 10-56 % slower per call there). Engine bring-up sets it when the
switch is on (``bound_cudnn_plans``; a value the environment gives wins) and the
library gets every operand in that layout. torch reads the variable once per
process, at its first cuDNN attention call, for every caller: a process that ran
one before keeps the per-shape plans.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from itertools import accumulate

import torch

from mii import envs
from mii.ops.attention import FP8_KV_DTYPE, AttentionBatch, tile_sets

# torch's switch for cuDNN attention plans keyed on lengths rounded to powers of two.
BOUNDED_PLANS_ENV = "TORCH_CUDNN_SDPA_AVOID_RECOMPILE"

# Chunks of fewer queries stay with the Triton kernel: a library call per sequence
# and layer costs launches that only long chunks repay.
LIBRARY_MIN_QUERIES = 1024


def library_members(
    batch: AttentionBatch, k_cache: torch.Tensor, sliding_window: int | None
) -> list[int]:
    """The sequences of ``batch`` whose chunk the library attends (none unless
    ``MII_PROMPT_ATTENTION=library``)."""
    if (
        torch.compiler.is_compiling()  # (first: nothing else is read while tracing)
        or envs.PROMPT_ATTENTION.get() != "library"
        or sliding_window is not None
        or k_cache.dtype == FP8_KV_DTYPE
    ):
        return []
    return [b for b, n in enumerate(batch.query_lens_host) if n >= LIBRARY_MIN_QUERIES]


def bound_cudnn_plans() -> bool:
    """With ``MII_PROMPT_ATTENTION=library``, ask torch for bounded cuDNN attention
    plans (``BOUNDED_PLANS_ENV=1``) unless the environment already says either way;
    True when it set it. Engine bring-up calls it on the thread that builds the engine,
    before the model runs: torch reads the variable once, at the process's first cuDNN
    attention call, and for every caller in the process (the user's own attention too)."""
    # (the name spelled out: tests/test_envs.py tells torch's variables from mii's
    # switches, which only envs.py reads, by the literal names)
    if envs.PROMPT_ATTENTION.get() != "library" or "TORCH_CUDNN_SDPA_AVOID_RECOMPILE" in os.environ:
        return False
    os.environ["TORCH_CUDNN_SDPA_AVOID_RECOMPILE"] = "1"
    return True


# (q, k, v, positions, cos_sin, k_cache, v_cache, batch, scale, window) -> out
TritonOp = Callable[..., torch.Tensor]


def attend_with_library(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
    members: list[int],
    triton_op: TritonOp,
) -> torch.Tensor:
    """The pass's attention: ``triton_op`` (which rotates ``q`` in place and writes
    the cache) for every sequence but ``members``, the library for those."""
    rest, starts = _split(batch, members, q.device)
    out = triton_op(q, k, v, positions, cos_sin, k_cache, v_cache, rest, scale, None)
    for b in members:
        k_seq, v_seq = gather_keys(k_cache, v_cache, batch.block_tables[b], batch.seq_lens_host[b])
        lo, hi = starts[b], starts[b + 1]
        out[lo:hi] = chunk_attention(q[lo:hi], k_seq, v_seq, scale)
    return out


def _split(
    batch: AttentionBatch, members: list[int], device: torch.device
) -> tuple[AttentionBatch, list[int]]:
    """``batch`` with tiles for every sequence but ``members``, and each sequence's
    first query row in the pass. Built once per pass: kept on the batch, which every
    layer shares."""
    cached = batch.__dict__.get("_library_split")
    if cached is not None and cached[0] == members:
        return cached[1], cached[2]
    skip = set(members)
    query_lens = [0 if b in skip else n for b, n in enumerate(batch.query_lens_host)]
    rest = dataclasses.replace(batch, tiles=tile_sets(query_lens, device))
    starts = [0, *accumulate(batch.query_lens_host)]
    batch.__dict__["_library_split"] = (list(members), rest, starts)
    return rest, starts


def gather_keys(
    k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor, keys: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A sequence's first ``keys`` keys and values ([keys, Hkv, D] each) out of the
    paged cache ([blocks, block_size, Hkv, D]) through its block table row."""
    block_size = k_cache.shape[1]
    blocks = block_table[: -(-keys // block_size)].long()
    k_seq = k_cache[blocks].flatten(0, 1)[:keys]
    v_seq = v_cache[blocks].flatten(0, 1)[:keys]
    return k_seq, v_seq


def chunk_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """q [Lq, Hq, D], the last Lq of k / v's [Lk, Hkv, D] keys being the chunk's own:
    each query attends to every key before it and itself -> [Lq, Hq, D]."""
    queries = q.shape[0]
    cached = k.shape[0] - queries
    # [1, H, L, D] views of [L, H, D] tensors packed sequence-major, the layout whose
    # cuDNN plans do not depend on the lengths (BOUNDED_PLANS_ENV). The pass's q is a
    # view into its qkv projection (rows (Hq + 2 Hkv) D apart): packed first (32 MB
    # for 4,096 queries of 32 heads of 128); the gathered keys are packed already.
    q = q.contiguous()
    qh, kh, vh = (x.unsqueeze(0).transpose(1, 2) for x in (q, k, v))
    out, lse = sdpa_with_lse(qh, kh[:, :, cached:], vh[:, :, cached:], scale, causal=True)
    if cached > 0:
        out_cached, lse_cached = sdpa_with_lse(
            qh, kh[:, :, :cached], vh[:, :, :cached], scale, causal=False
        )
        total = torch.logaddexp(lse, lse_cached)
        weight = torch.exp(lse_cached - total).unsqueeze(-1)
        out = (out_cached.float() * weight + out.float() * (1 - weight)).to(q.dtype)
    return out[0].transpose(0, 1)


def sdpa_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention [1, Hq, Lq, D] and its float32 log-sum-exp [1, Hq, Lq] of keys and
    values [1, Hkv, Lk, D] (grouped-query: query head h reads key head h // group;
    ``causal``: aligned to the first key): cuDNN's, which takes grouped keys as they
    are, else flash's on a CUDA GPU in 16-bit; the float32 math elsewhere (the CPU,
    where tests check the merge)."""
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        try:
            result = torch.ops.aten._scaled_dot_product_cudnn_attention(
                q, k, v, None, True, 0.0, causal, False, scale=scale
            )
        except RuntimeError:  # a head size or GPU cuDNN's attention does not take
            k, v = _repeat_heads(q, k, v)
            result = torch.ops.aten._scaled_dot_product_flash_attention(
                q, k, v, 0.0, causal, False, scale=scale
            )
        out, lse = result[0], result[1]
        return out, lse.reshape(out.shape[:-1]).float()
    k, v = _repeat_heads(q, k, v)
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if causal:
        above = torch.ones(scores.shape[-2:], dtype=torch.bool, device=q.device).triu(1)
        scores = scores.masked_fill(above, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype)
    return out, lse


def _repeat_heads(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys and values with a head per query head (a copy: 0.28 ms per 32k x 32-head
    tensor on an H100, which is why cuDNN gets the grouped ones)."""
    group = q.shape[1] // k.shape[1]
    if group == 1:
        return k, v
    return k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
