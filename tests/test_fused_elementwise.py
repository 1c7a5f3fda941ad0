"""The fused RMSNorm (+ residual) and activation-times-up kernels against the
torch code they replace, and whole models through them against transformers;
on CPU under TRITON_INTERPRET=1 (set by conftest), on the GPU when there is one."""

from __future__ import annotations

import pytest
import torch

from helpers import TIGHT_OPTIONS, assert_matches_hf
from mii.models.layers import GatedMLP, RMSNorm, activation
from mii.ops.fused_elementwise import act_and_mul, rms_norm
from test_family_llama_variants import variants  # noqa: F401 (a fixture)

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def random_norm(hidden: int, offset: float, dtype: torch.dtype, seed: int) -> RMSNorm:
    norm = RMSNorm(hidden, eps=1e-5, offset=offset)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(hidden, generator=torch.Generator().manual_seed(seed)))
    return norm.to(DEVICE, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize(("rows", "hidden"), [(1, 64), (7, 100), (33, 4096)])
def test_rms_norm_matches_torch(rows, hidden, offset, dtype):
    norm = random_norm(hidden, offset, dtype, seed=rows)
    generator = torch.Generator().manual_seed(hidden)
    x = (3 * torch.randn(rows, hidden, generator=generator)).to(DEVICE, dtype)
    residual = torch.randn(rows, hidden, generator=generator).to(DEVICE, dtype)
    with torch.no_grad():
        expected = norm._norm(x)
        fused = rms_norm(x, norm.weight, norm.eps, gemma=bool(offset))
        torch.testing.assert_close(fused, expected)
        expected_sum = x + residual
        fused_out, fused_sum = rms_norm(x, norm.weight, norm.eps, bool(offset), residual)
        # The new residual is rounded exactly as the unfused add rounds it.
        assert torch.equal(fused_sum, expected_sum)
        torch.testing.assert_close(fused_out, norm._norm(expected_sum))


def test_rms_norm_of_strided_heads():
    """Qwen3's per-head q/k norm runs on a strided view of the fused QKV output."""
    norm = random_norm(32, 0.0, torch.float32, seed=3)
    qkv = torch.randn(5, 3 * 4 * 32, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    q = qkv[:, : 4 * 32].view(5, 4, 32)
    with torch.no_grad():
        torch.testing.assert_close(rms_norm(q, norm.weight, norm.eps), norm._norm(q))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["silu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize(("rows", "inner"), [(1, 16), (9, 37), (4, 1500)])
def test_act_and_mul_matches_torch(rows, inner, name, dtype):
    gate_up = 4 * torch.randn(rows, 2 * inner, generator=torch.Generator().manual_seed(inner))
    gate_up = gate_up.to(DEVICE, dtype)
    gate, up = gate_up.chunk(2, dim=-1)
    expected = activation(name)(gate) * up
    torch.testing.assert_close(act_and_mul(gate_up, name), expected)


def test_act_and_mul_refuses_unfused_activation():
    with pytest.raises(ValueError, match="no fused kernel for activation 'relu'"):
        act_and_mul(torch.zeros(2, 8, device=DEVICE), "relu")


def test_layers_call_the_kernels_when_asked(monkeypatch):
    import mii.ops.fused_elementwise as kernels

    calls = []
    for name in ("rms_norm", "act_and_mul"):
        original = getattr(kernels, name)
        monkeypatch.setattr(
            kernels, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k)
        )
    norm = random_norm(48, 0.0, torch.float32, seed=5)
    mlp = GatedMLP(48, 40, "silu", bias=False)
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in mlp.parameters():
            param.copy_(0.2 * torch.randn(param.shape, generator=generator))
    mlp = mlp.to(DEVICE)
    x = torch.randn(6, 48, generator=torch.Generator().manual_seed(6)).to(DEVICE)
    results = {}
    with torch.no_grad():
        for choice in ("torch", "triton"):
            monkeypatch.setenv("MII_FUSED", choice)
            h, summed = norm(x, residual=x)
            results[choice] = (norm(x), h, summed, mlp(x))
            assert bool(calls) == (choice == "triton")
    for unfused, fused in zip(results["torch"], results["triton"]):
        # float32: the kernels' exp/sqrt may differ from torch's by an ulp or two
        torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)
    assert sorted(set(calls)) == ["act_and_mul", "rms_norm"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU run of the interpreted kernels")
@pytest.mark.parametrize("name", ["llama", "qwen3", "gemma"])
def test_engine_with_fused_kernels_matches_hf(checkpoints, variants, tokenizer, name, monkeypatch):  # noqa: F811
    """Whole models through the interpreted kernels (what CUDA runs by default):
    plain RMSNorm + SiLU (Llama), per-head q/k norms (Qwen3), Gemma's (1 + w)
    norm with tanh-GELU; chunked prompts and preemption."""
    monkeypatch.setenv("MII_FUSED", "triton")
    path, hf_model = checkpoints(name) if name == "llama" else variants[name]
    # 12 new tokens in a 20-block pool: still chunked prompts and preemption, at half
    # the interpreted passes of TIGHT_OPTIONS' 24 tokens.
    short = dict(TIGHT_OPTIONS, num_kv_blocks=20)
    assert_matches_hf(path, hf_model, tokenizer, new_tokens=12, expect_preemption=True, **short)
