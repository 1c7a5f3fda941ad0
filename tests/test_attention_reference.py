"""The paged attention reference, and the SDPA version the engine runs off the GPU,
against plain dense attention."""

from __future__ import annotations

import random

import pytest
import torch

from helpers import ragged_paged_batch
from mii.ops import attention as attention_module
from mii.ops.attention import paged_attention_reference, paged_attention_sdpa


def dense_attention(q, k, v, scale, window=None):
    """q: [Lq, Hq, D] at the last Lq positions of k, v: [Lk, Hkv, D]."""
    lq, lk = q.shape[0], k.shape[0]
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    qpos = torch.arange(lk - lq, lk)[:, None]
    kpos = torch.arange(lk)[None, :]
    mask = kpos <= qpos
    if window:
        mask &= kpos > qpos - window
    return torch.einsum("hqk,khd->qhd", scores.masked_fill(~mask, -torch.inf).softmax(-1), v)


@pytest.mark.parametrize(
    "attention", [paged_attention_reference, paged_attention_sdpa, "sdpa of torch 2.4"]
)
@pytest.mark.parametrize("window", [None, 5, 20])
@pytest.mark.parametrize(("hq", "hkv"), [(4, 4), (4, 2), (4, 1)])
def test_ragged_paged_batch_matches_dense(attention, window, hq, hkv, monkeypatch):
    if attention == "sdpa of torch 2.4":  # (no enable_gqa: grouped keys are repeated)
        monkeypatch.setattr(attention_module, "_SDPA_TAKES_GROUPS", False)
        attention = paged_attention_sdpa
    rng = random.Random(0)
    torch.manual_seed(0)
    block_size, num_blocks, dim = 4, 64, 8
    k_cache = torch.zeros(num_blocks, block_size, hkv, dim)
    v_cache = torch.zeros_like(k_cache)
    free = list(range(num_blocks))
    rng.shuffle(free)  # blocks of a sequence are not contiguous
    # (cached tokens already in the cache, new tokens this step)
    # (whole prompts: causal; one query; chunks after cached keys; past the window)
    shapes = [(0, 7), (9, 1), (3, 6), (12, 1), (0, 1), (20, 5), (24, 1)]
    batch, tables = ragged_paged_batch(shapes, block_size, free)
    full_k, full_v, qs = [], [], []
    for (cached, new), table in zip(shapes, tables):
        total = cached + new
        k = torch.randn(total, hkv, dim)
        v = torch.randn(total, hkv, dim)
        for pos in range(cached):  # pretend earlier steps wrote these
            k_cache[table[pos // block_size], pos % block_size] = k[pos]
            v_cache[table[pos // block_size], pos % block_size] = v[pos]
        full_k.append(k)
        full_v.append(v)
        qs.append(torch.randn(new, hq, dim))
    new_k = torch.cat([k[c:] for k, (c, _) in zip(full_k, shapes)])
    new_v = torch.cat([v[c:] for v, (c, _) in zip(full_v, shapes)])
    out = attention(torch.cat(qs), new_k, new_v, k_cache, v_cache, batch, 0.3, window)
    expected = torch.cat(
        [dense_attention(q, k, v, 0.3, window) for q, k, v in zip(qs, full_k, full_v)]
    )
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # the new keys were written where the slot mapping says
    flat = k_cache.view(-1, hkv, dim)
    torch.testing.assert_close(flat[batch.slot_mapping], new_k)
