"""MII_PROMPT_ATTENTION=library: long prompt chunks through torch's SDPA, the rest of
the pass through the Triton operator (on CPU: the interpreter, and SDPA's float32
math; on a GPU: cuDNN's attention), against the torch reference."""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch

from mii.engine import bring_up
from mii.ops import library_attention
from mii.ops.attention import FP8_KV_DTYPE, rotary_paged_attention_reference
from mii.ops.library_attention import chunk_attention, library_members
from mii.ops.paged_attention import rotary_paged_attention
from mii.ops.triton_attention import call_paged_attention_op
from test_triton_kernels import DEVICE, make_case, to_device


def _masked_reference(q, k, v, scale):
    """Each of the Lq queries attends to the keys up to its own position (the last
    Lq keys are the chunk's), in float32 with an explicit mask."""
    queries, keys = q.shape[0], k.shape[0]
    group = q.shape[1] // k.shape[1]
    k, v = (x.repeat_interleave(group, dim=1).float() for x in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    visible = torch.arange(keys)[None, :] <= torch.arange(queries)[:, None] + keys - queries
    scores = scores.masked_fill(~visible.to(scores.device), float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, dim=-1), v)


@pytest.mark.parametrize(
    ("queries", "keys", "q_heads", "kv_heads"),
    [(5, 5, 4, 4), (7, 30, 4, 2), (16, 17, 8, 1), (33, 200, 4, 4)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_chunk_in_two_calls_merged_is_its_causal_attention(
    queries, keys, q_heads, kv_heads, dtype
):
    gen = torch.Generator().manual_seed(queries * keys)
    q = torch.randn(queries, q_heads, 32, generator=gen).to(dtype).to(DEVICE)
    k = torch.randn(keys, kv_heads, 32, generator=gen).to(dtype).to(DEVICE)
    v = torch.randn(keys, kv_heads, 32, generator=gen).to(dtype).to(DEVICE)
    out = chunk_attention(q, k, v, 32**-0.5)
    want = _masked_reference(q, k, v, 32**-0.5)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), want, rtol=tol, atol=tol)


# (shapes: (tokens cached, new tokens) per sequence, hq, hkv, dim, block, rotary dim)
PASSES = [
    ([(0, 40), (9, 1), (3, 20), (30, 45), (12, 1)], 4, 2, 16, 4, 16),  # long chunks, decodes
    ([(100, 50)], 8, 2, 16, 16, 16),  # one long chunk alone: nothing left for Triton
    ([(0, 33), (5, 1)], 4, 4, 32, 16, 0),  # no rotary
]


@pytest.mark.parametrize("index", range(len(PASSES)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_pass_with_library_chunks_matches_the_reference(index, dtype, monkeypatch):
    """Chunks of >= LIBRARY_MIN_QUERIES queries through the library, the rest through
    the Triton operator: the same output and caches as the reference."""
    monkeypatch.setenv("MII_PROMPT_ATTENTION", "library")
    monkeypatch.setattr(library_attention, "LIBRARY_MIN_QUERIES", 30)
    shapes, hq, hkv, dim, block, rot = PASSES[index]
    ref_q, ref_k, ref_v, pos, cs, ref_kc, ref_vc, ref_batch = make_case(
        shapes, hq, hkv, dim, block, dtype, rot, seed=index
    )
    expected = rotary_paged_attention_reference(
        ref_q.clone(), ref_k, ref_v, pos, cs, ref_kc, ref_vc, ref_batch, dim**-0.5, None
    )
    q, k, v, pos_d, cs_d, kc, vc, batch = to_device(
        make_case(shapes, hq, hkv, dim, block, dtype, rot, seed=index)
    )
    members = library_members(batch, kc, None)
    assert members == [b for b, (_, new) in enumerate(shapes) if new >= 30]
    out = library_attention.attend_with_library(
        q, k, v, pos_d, cs_d, kc, vc, batch, dim**-0.5, members, call_paged_attention_op
    )
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float().cpu(), expected.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(kc.float().cpu(), ref_kc.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(vc.float().cpu(), ref_vc.float(), rtol=0, atol=0)


def test_only_long_chunks_of_a_bf16_cache_without_a_window_go_to_the_library(monkeypatch):
    _, _, _, _, _, kc, _, batch = make_case(
        [(0, 40), (9, 1), (3, 20)], 4, 2, 16, 4, torch.float32, 16, 0
    )
    monkeypatch.setattr(library_attention, "LIBRARY_MIN_QUERIES", 20)
    monkeypatch.delenv("MII_PROMPT_ATTENTION", raising=False)
    assert library_members(batch, kc, None) == []  # the default: the Triton kernel
    monkeypatch.setenv("MII_PROMPT_ATTENTION", "library")
    assert library_members(batch, kc, None) == [0, 2]
    assert library_members(batch, kc, 16) == []  # a sliding window
    assert library_members(batch, kc.to(FP8_KV_DTYPE), None) == []  # an fp8 cache


def test_the_library_gets_sequence_major_operands_and_bounded_plans(monkeypatch):
    """torch's cuDNN attention keeps one execution plan per power-of-two length bucket
    (not one per exact shape) only for operands packed [batch, sequence, heads, dim]
    and with TORCH_CUDNN_SDPA_AVOID_RECOMPILE=1: engine bring-up sets it when the
    switch is on (a value the user set wins; off, nothing is set), and a chunk's q, a
    view into the qkv projection's output as models pass it, reaches the library
    packed so, as do the keys."""
    name = library_attention.BOUNDED_PLANS_ENV
    with mock.patch.dict(os.environ):  # what bring-up sets goes with the test
        os.environ.pop(name, None)
        os.environ.pop("MII_PROMPT_ATTENTION", None)
        assert not library_attention.bound_cudnn_plans() and name not in os.environ
        os.environ["MII_PROMPT_ATTENTION"] = "library"
        assert library_attention.bound_cudnn_plans() and os.environ[name] == "1"
        os.environ[name] = "0"
        assert not library_attention.bound_cudnn_plans() and os.environ[name] == "0"
        del os.environ[name]  # engine bring-up's own step

        bring_up.bound_prompt_attention_plans()
        assert os.environ[name] == "1"

    layouts = []
    real = library_attention.sdpa_with_lse

    def recording(q, k, v, scale, causal):
        layouts.append([x.transpose(1, 2).is_contiguous() for x in (q, k, v)])
        return real(q, k, v, scale, causal)

    monkeypatch.setattr(library_attention, "sdpa_with_lse", recording)
    tokens, hq, hkv, dim = 12, 4, 2, 8
    qkv = torch.randn(tokens, (hq + 2 * hkv) * dim)
    q = qkv[:, : hq * dim].view(tokens, hq, dim)  # rows (hq + 2 hkv) dim apart
    keys = torch.randn(30, hkv, dim), torch.randn(30, hkv, dim)
    out = chunk_attention(q, *keys, dim**-0.5)
    torch.testing.assert_close(out, _masked_reference(q, *keys, dim**-0.5), rtol=1e-5, atol=1e-5)
    assert layouts == [[True, True, True], [True, True, True]]  # the causal call, the cached one


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the op takes the Triton path on CUDA")
def test_the_attention_op_routes_long_chunks_on_cuda(monkeypatch):
    """On CUDA the models' op sends long chunks to cuDNN's attention: the same output
    as the Triton kernel alone, to bf16 rounding."""
    monkeypatch.setattr(library_attention, "LIBRARY_MIN_QUERIES", 64)
    shapes = [(0, 300), (200, 1), (100, 350), (40, 9)]  # positions within the rope table
    outs = {}
    for choice in ("triton", "library"):
        monkeypatch.setenv("MII_PROMPT_ATTENTION", choice)
        case = to_device(make_case(shapes, 32, 8, 128, 16, torch.bfloat16, 128, seed=3))
        outs[choice] = rotary_paged_attention(*case, 128**-0.5).float()
    torch.testing.assert_close(outs["library"], outs["triton"], rtol=2e-2, atol=2e-2)
