"""Input stages folded into the skinny linear kernel (``ops.triton_gemv_folds``):
an RMSNorm (MII_FUSED_NORM_LINEAR=on) gives the result of the norm kernel then
the linear kernel, and the same residual stream; act(gate) * up
(MII_FUSED_ACT_LINEAR=on) the act_and_mul kernel's then the linear's, bit for
bit. Interpreted on the CPU."""

from __future__ import annotations

import pytest
import torch

from mii.ops.fused_elementwise import act_and_mul, rms_norm
from mii.ops.triton_gemv import skinny_linear
from mii.ops.triton_gemv_folds import skinny_act_linear, skinny_norm_linear
from mii.ops.triton_gemv_launch import GemvConfig
from test_triton_kernels import DEVICE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("gemma", [False, True])
@pytest.mark.parametrize("rows, split_k", [(1, 1), (3, 2), (20, 3)])  # 20: two row tiles
def test_folded_norm_equals_the_norm_then_the_linear(dtype, with_residual, gemma, rows, split_k):
    """K = 200 (the last slice ragged); a config asking for split K runs unsplit (the
    sums are divided by the whole row's rms); one program per row tile writes the
    residual sum: outputs within the rounding of the norm's output (h g cast, not
    h / rms), the residual sum bit for bit."""
    gen = torch.Generator().manual_seed(rows * 10 + split_k)
    x = (torch.randn(rows, 200, generator=gen) * 3).to(dtype).to(DEVICE)
    x[0, 3] = 40.0  # an outlier row element
    residual = torch.randn(rows, 200, generator=gen).to(dtype).to(DEVICE) if with_residual else None
    norm_w = (torch.rand(200, generator=gen) + 0.5).to(dtype).to(DEVICE)
    w = (torch.randn(70, 200, generator=gen) / 8).to(dtype).to(DEVICE)
    b = torch.randn(70, generator=gen).to(dtype).to(DEVICE)
    config = GemvConfig(32, 64, block_m=16, split_k=split_k)
    out, summed = skinny_norm_linear(x, norm_w, 1e-5, gemma, residual, w, b, config)
    if with_residual:
        normed, expected_sum = rms_norm(x, norm_w, 1e-5, gemma, residual)
        assert torch.equal(summed, expected_sum)
    else:
        normed, expected_sum = rms_norm(x, norm_w, 1e-5, gemma), x
        assert summed is x
    expected = skinny_linear(normed, w, b, config)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol * 4)
    # and the product it stands for, in float32
    exact = torch.nn.functional.linear(normed.float(), w.float(), b.float())
    torch.testing.assert_close(out.float(), exact, rtol=tol * 3, atol=tol * 12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("gemma", [False, True])
def test_folded_norm_is_the_norm_within_its_rounding(dtype, gemma):
    """Through an identity weight the kernel's output is the norm's output itself:
    h * g cast to the 16-bit dtype, then divided by the row's rms and cast again,
    so every value lies within one unit in the last place of the exact (float32)
    RMSNorm, as rms_norm's own output does (bfloat16: 1.5, the interpreter's final
    cast truncates), and on average within half a unit."""
    gen = torch.Generator().manual_seed(7)
    x = (torch.randn(4, 256, generator=gen) * 5).to(dtype).to(DEVICE)
    residual = torch.randn(4, 256, generator=gen).to(dtype).to(DEVICE)
    norm_w = (torch.rand(256, generator=gen) * 3 + 0.1).to(dtype).to(DEVICE)
    eye = torch.eye(256).to(dtype).to(DEVICE)
    config = GemvConfig(32, 64, block_m=16, split_k=1)
    out, summed = skinny_norm_linear(x, norm_w, 1e-6, gemma, residual, eye, None, config)
    h = summed.float()
    exact = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * (norm_w.float() + gemma)
    units = (out.float() - exact).abs() / (torch.finfo(dtype).eps * exact.abs())
    units = units[exact != 0]
    assert units.max() <= (1.5 if dtype == torch.bfloat16 else 1.0)
    assert units.mean() <= 0.5
    normed, _ = rms_norm(x, norm_w, 1e-6, gemma, residual)
    assert ((normed.float() - out.float()).abs() <= torch.finfo(dtype).eps * exact.abs() * 2).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["silu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize("rows, split_k", [(1, 1), (3, 2)])
def test_folded_activation_equals_act_and_mul_then_the_linear(dtype, activation, rows, split_k):
    """The down projection reading [gate | up] (K = 200: the last slice ragged):
    the same input as act_and_mul writes, so the same output bit for bit."""
    gen = torch.Generator().manual_seed(rows + split_k)
    gate_up = (torch.randn(rows, 400, generator=gen) * 3).to(dtype).to(DEVICE)
    w = (torch.randn(70, 200, generator=gen) / 8).to(dtype).to(DEVICE)
    b = torch.randn(70, generator=gen).to(dtype).to(DEVICE)
    config = GemvConfig(32, 64, block_m=16, split_k=split_k)
    out = skinny_act_linear(gate_up, activation, w, b, config)
    expected = skinny_linear(act_and_mul(gate_up, activation), w, b, config)
    assert torch.equal(out, expected)


def test_refused_operands_name_the_problem():
    x = torch.randn(2, 64).to(DEVICE)
    w = torch.randn(8, 64).to(DEVICE)
    with pytest.raises(ValueError, match="norm weight of 64"):
        skinny_norm_linear(x, torch.ones(32).to(DEVICE), 1e-5, False, None, w)
    with pytest.raises(ValueError, match="residual shaped as x"):
        skinny_norm_linear(x, torch.ones(64).to(DEVICE), 1e-5, False, x[:1], w)
    with pytest.raises(ValueError, match=r"gate_up \[M, 128\]"):
        skinny_act_linear(x, "silu", w)
    with pytest.raises(ValueError, match="no fused kernel for activation 'relu'"):
        skinny_act_linear(torch.randn(2, 128).to(DEVICE), "relu", w)


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU run of the interpreted kernels")
def test_llama_folds_its_norms_token_for_token(checkpoints, tokenizer, monkeypatch):
    """A tiny Llama (float32) with the skinny kernel and fused kernels
    interpreted, two prompts in chunks of a few tokens: with MII_FUSED_NORM_LINEAR=on and
    MII_FUSED_ACT_LINEAR=on the input and post-attention norms go into the qkv and
    gate_up launches and act*up into down's (no norm kernel runs but the final one's,
    no act_and_mul kernel) and the greedy tokens stay transformers'."""
    import mii
    import mii.ops.fused_elementwise as fused
    from helpers import PROMPTS, TIGHT_OPTIONS, assert_greedy_margins, hf_greedy

    path, hf_model = checkpoints("llama")
    # (the folds are per pass: chunking and preemption are other tests' business)
    prompts, new = PROMPTS[:2], 6
    assert_greedy_margins(hf_model, tokenizer, prompts, new)
    norms, acts = [], []
    original, original_act = fused.rms_norm, fused.act_and_mul
    monkeypatch.setattr(fused, "rms_norm", lambda *a, **k: norms.append(1) or original(*a, **k))
    monkeypatch.setattr(
        fused, "act_and_mul", lambda *a, **k: acts.append(1) or original_act(*a, **k)
    )
    monkeypatch.setenv("MII_GEMV", "triton")
    monkeypatch.setenv("MII_FUSED", "triton")
    tokens, counts = {}, {}
    for switch in ("on", "off"):
        monkeypatch.setenv("MII_FUSED_NORM_LINEAR", switch)
        monkeypatch.setenv("MII_FUSED_ACT_LINEAR", switch)
        norms.clear()
        acts.clear()
        with mii.pipeline(str(path), **TIGHT_OPTIONS) as pipe:
            responses = pipe(prompts, do_sample=False, max_new_tokens=new)
        tokens[switch] = [r.token_ids for r in responses]
        counts[switch] = len(norms), len(acts)
    layers = hf_model.config.num_hidden_layers
    assert counts["off"][0] == (2 * layers + 1) * counts["on"][0]  # only the final norm stays
    assert counts["on"][1] == 0 < counts["off"][1]
    expected = [hf_greedy(hf_model, tokenizer, p, new) for p in prompts]
    assert tokens["on"] == tokens["off"] == expected
