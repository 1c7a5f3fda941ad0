"""MII_MOE_PROMPT_GEMM=grouped_mm: the experts of large MoE passes through
torch._grouped_mm, against the per-token definition, the Triton path and
transformers (on CPU; on the GPU too when there is one)."""

from __future__ import annotations

import pytest
import torch

from mii.ops import moe_grouped_mm
from mii.ops.moe_grouped_mm import grouped_mm_applies, moe_mlp_grouped_mm
from test_family_mixtral import (
    TIGHT_OPTIONS,
    assert_matches_hf,
    moe_checkpoints,  # noqa: F401 (a fixture)
    per_token_reference,
    random_moe,
)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# On CUDA the layer takes torch._grouped_mm for bfloat16 experts only (sm_90+):
# a float32 layer there keeps the Triton kernel, and nothing would be tested.
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
pytestmark = pytest.mark.skipif(
    not hasattr(torch, "_grouped_mm"), reason="this torch has no grouped GEMM"
)
needs_sm90 = pytest.mark.skipif(
    DEVICE.type == "cuda" and torch.cuda.get_device_capability() < (9, 0),
    reason="torch._grouped_mm's CUDA kernels (this layer's path) need sm_90",
)


@pytest.mark.parametrize(
    ("tokens", "top_k", "num_experts", "skew"),
    [
        (1, 2, 4, None),
        (37, 2, 6, None),
        (64, 1, 5, None),
        (40, 2, 8, 3),  # every token's first choice is expert 3: others nearly empty
        (0, 2, 4, None),  # an empty pass
    ],
)
def test_grouped_mm_mlp_matches_the_per_token_definition(tokens, top_k, num_experts, skew):
    """The whole expert MLP, empty experts included, equals one token and one
    chosen expert at a time (float32: the same sums up to rounding)."""
    moe = random_moe(True, num_experts=num_experts, top_k=top_k)
    x = torch.randn(tokens, 16, generator=torch.Generator().manual_seed(tokens))
    with torch.no_grad():
        if skew is not None:  # a feature every token has, which only expert `skew` weighs
            x[:, 0] = 1.0
            moe.gate.weight[skew, 0] = 100.0
        weights, experts = moe.route(x)
        out = moe_mlp_grouped_mm(x, moe.w13, moe.w2, weights, experts, moe.act)
        expected = per_token_reference(moe, x)
    if skew is not None:
        assert (experts[:, 0] == skew).all()
    assert out.shape == (tokens, 16)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@needs_sm90
def test_layer_takes_grouped_mm_only_for_large_passes(monkeypatch):
    """MII_MOE_PROMPT_GEMM=grouped_mm: passes of GROUPED_MM_MIN_PAIRS pairs or more
    run through it (same output as the Triton kernel), smaller ones do not;
    ``triton`` never does; the default (auto) does on CUDA only."""
    calls: list[int] = []
    original = moe_grouped_mm.moe_mlp_grouped_mm

    def spy(x, *args, **kwargs):
        calls.append(x.shape[0])
        return original(x, *args, **kwargs)

    monkeypatch.setattr(moe_grouped_mm, "moe_mlp_grouped_mm", spy)
    monkeypatch.setattr(moe_grouped_mm, "GROUPED_MM_MIN_PAIRS", 20)
    monkeypatch.setenv("MII_MOE", "triton")
    moe = random_moe(True, num_experts=6).to(DEVICE, DTYPE)
    small = torch.randn(9, 16, generator=torch.Generator().manual_seed(1)).to(DEVICE, DTYPE)  # 18
    large = torch.randn(10, 16, generator=torch.Generator().manual_seed(2)).to(DEVICE, DTYPE)  # 20
    with torch.no_grad():
        monkeypatch.setenv("MII_MOE_PROMPT_GEMM", "triton")
        triton_out = moe(large)
        assert calls == []
        monkeypatch.delenv("MII_MOE_PROMPT_GEMM")  # auto: grouped_mm on CUDA only
        moe(large)
        assert calls == ([10] if DEVICE.type == "cuda" else [])
        calls.clear()
        monkeypatch.setenv("MII_MOE_PROMPT_GEMM", "grouped_mm")
        moe(small)
        assert calls == []
        grouped_out = moe(large)
        assert calls == [10]
    if DEVICE.type == "cuda":  # bf16, rounded in other places (the Triton kernel
        # scales by the routing weight before rounding): each ~3e-3 off float32
        error = (grouped_out.float() - triton_out.float()).norm() / triton_out.float().norm()
        assert error < 2e-2, error
    else:
        torch.testing.assert_close(grouped_out, triton_out, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="the CUDA grouped GEMM")
@needs_sm90
def test_cuda_grouped_mm_matches_the_cpu_loop():
    """bfloat16 experts through the CUDA kernels (CUTLASS on sm_90), empty and
    skewed experts included, equal the CPU path (a matmul per group, tested above
    against the per-token definition) on the same routing, up to bf16 rounding."""
    moe = random_moe(True, num_experts=8, top_k=2, hidden_size=64, intermediate_size=96)
    x = torch.randn(300, 64, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        x[:, 0] = 1.0
        moe.gate.weight[:, 0] = -100.0
        moe.gate.weight[2, 0] = moe.gate.weight[5, 0] = 100.0  # every token: experts 2, 5
        moe = moe.to(torch.bfloat16)
        xb = x.to(torch.bfloat16)
        weights, experts = moe.route(xb)
        assert set(experts.unique().tolist()) == {2, 5}
        w13, w2 = moe.w13.cuda(), moe.w2.cuda()
        assert grouped_mm_applies(xb.cuda(), w13, w2)
        got = moe_mlp_grouped_mm(xb.cuda(), w13, w2, weights.cuda(), experts.cuda(), moe.act)
        expected = moe_mlp_grouped_mm(
            xb.float(), moe.w13.float(), moe.w2.float(), weights, experts, moe.act
        )
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    error = (got.float().cpu() - expected).norm() / expected.norm()
    assert error < 1e-2, error  # bf16 roundings (hidden, inner, output) are ~4e-3


def test_grouped_mm_applies_to_aligned_16_bit_experts_only():
    x = torch.randn(4, 16)
    w13, w2 = torch.randn(4, 48, 16), torch.randn(4, 16, 24)
    assert grouped_mm_applies(x, w13, w2)
    assert grouped_mm_applies(x.bfloat16(), w13.bfloat16(), w2.bfloat16())
    assert not grouped_mm_applies(x, w13, torch.randn(4, 16, 26))  # a row of 104 bytes
    assert not grouped_mm_applies(x, w13.to(torch.float8_e4m3fn), w2)  # float8 experts
    assert not grouped_mm_applies(x.double(), w13.double(), w2.double())


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU run of the interpreted kernels")
@pytest.mark.parametrize("name", ["mixtral", "qwen2-moe"])
def test_engine_with_grouped_mm_matches_hf(moe_checkpoints, tokenizer, name, monkeypatch):  # noqa: F811
    """Every pass's experts through torch._grouped_mm (its threshold lowered to one
    pair), with chunked prompts and preemption: greedy tokens equal transformers'."""
    monkeypatch.setenv("MII_MOE", "triton")
    monkeypatch.setenv("MII_MOE_PROMPT_GEMM", "grouped_mm")
    monkeypatch.setattr(moe_grouped_mm, "GROUPED_MM_MIN_PAIRS", 1)
    passes: list[int] = []
    original = moe_grouped_mm.moe_mlp_grouped_mm

    def counted(x, *args, **kwargs):
        passes.append(x.shape[0])
        return original(x, *args, **kwargs)

    monkeypatch.setattr(moe_grouped_mm, "moe_mlp_grouped_mm", counted)
    path, hf_model = moe_checkpoints(name)
    assert_matches_hf(path, hf_model, tokenizer, **TIGHT_OPTIONS, expect_preemption=True)
    assert passes and max(passes) > 1  # prompt chunks and decode batches went through it
