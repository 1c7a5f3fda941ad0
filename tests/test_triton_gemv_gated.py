"""The skinny decode kernel with act(gate) * up in its epilogue
(``skinny_gated_linear``): the same numbers as the gate/up projection followed by
the act-and-mul kernel, on CPU under TRITON_INTERPRET=1 (conftest) and on a GPU."""

from __future__ import annotations

import pytest
import torch

from mii.ops.fp8_linear import quantize_rows
from mii.ops.fused_elementwise import act_and_mul
from mii.ops.triton_gemv import skinny_gated_linear, skinny_linear, skinny_linear_fp8
from mii.ops.triton_gemv_launch import GemvConfig
from test_triton_kernels import DEVICE


def _operands(rows: int, inter: int, k: int, dtype: torch.dtype, bias: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    # The up rows scaled apart from the gate rows: a program that took the wrong
    # half (or the wrong band of it) gives other numbers.
    w = torch.randn(2 * inter, k, generator=gen) / k**0.5
    w[inter:] *= 3
    b = torch.randn(2 * inter, generator=gen).to(dtype) if bias else None
    return x.to(DEVICE), w.to(dtype).to(DEVICE), None if b is None else b.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", ["silu", "gelu_pytorch_tanh"])
@pytest.mark.parametrize(
    ("rows", "inter", "k", "bias", "config"),
    [
        (1, 64, 64, False, GemvConfig(32, 32)),
        (5, 40, 48, True, GemvConfig(32, 32)),  # I not a multiple of the band's half
        (16, 96, 80, False, GemvConfig(64, 32, split_k=3)),  # split-K, K past the splits
        (3, 72, 64, False, None),  # the launch bf16_config_for picks
    ],
)
def test_gated_launch_equals_projection_then_act_and_mul(
    rows, inter, k, bias, config, activation, dtype
):
    x, w, b = _operands(rows, inter, k, dtype, bias)
    got = skinny_gated_linear(x, w, activation, None, b, config)
    want = act_and_mul(skinny_linear(x, w, b, config), activation)
    assert got.shape == (rows, inter) and got.dtype == dtype
    assert_same_numbers(got, want)


def assert_same_numbers(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal in 16 bits; in float32 within a few ulps: under the CPU interpreter the
    two launches' float32 arithmetic (numpy, OpenBLAS) rounds apart on some CPUs (an
    AMD EPYC with AVX-512: 22 of 64 values 1 ulp apart; bit-equal on earlier machines).
    A program that read the wrong half or band is off by whole units."""
    if got.dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    else:
        assert torch.equal(got, want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "config",
    [
        GemvConfig(32, 32, block_m=16),  # 16/32-bit products
        GemvConfig(32, 32, block_m=16, fp8_dot=True),  # x quantized in the loop
        GemvConfig(32, 32, block_m=16, fp8_dot=True, x_groups=True, split_k=2),
        None,  # the launch fp8_config_for picks
    ],
    ids=["16-bit-products", "fp8-products", "prequantized-split-k", "default"],
)
def test_gated_launch_on_float8_weights(config, dtype):
    """Float8 gate/up weights with their channel scales (each half its own)."""
    x, w, _ = _operands(4, 80, 96, torch.float32, False, seed=3)
    wq, scale = quantize_rows(w.float())
    x = x.to(dtype)
    got = skinny_gated_linear(x, wq, "silu", scale, None, config)
    want = act_and_mul(skinny_linear_fp8(x, wq, scale, None, config), "silu")
    assert_same_numbers(got, want)


def test_gated_launch_names_what_it_cannot_take():
    x, w, _ = _operands(2, 32, 32, torch.float32, False)
    with pytest.raises(ValueError, match="activation 'relu'"):
        skinny_gated_linear(x, w, "relu")
    with pytest.raises(ValueError, match="2 I rows"):
        skinny_gated_linear(x, w[:63], "silu")
    wq, scale = quantize_rows(w.float())
    with pytest.raises(ValueError, match="float8_e4m3fn weight"):
        skinny_gated_linear(x, w, "silu", scale)  # a scale with a 16/32-bit weight
    with pytest.raises(ValueError, match="float32 scale of 64 values"):
        skinny_gated_linear(x, wq, "silu", scale[:32])


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU run of the interpreted kernel")
def test_engine_with_the_gated_kernel_matches_hf(checkpoints, tokenizer, monkeypatch):
    """MII_GATED_GEMV=on: a tiny Llama's decode steps (and prompt chunks the skinny
    kernel takes) run their MLPs through the gated launch and decode transformers'
    tokens."""
    import mii.ops.triton_gemv as gemv
    from helpers import assert_matches_hf

    monkeypatch.setenv("MII_GEMV", "triton")
    monkeypatch.setenv("MII_FUSED", "triton")
    monkeypatch.setenv("MII_GATED_GEMV", "on")
    launches = []
    original = gemv.skinny_gated_linear
    monkeypatch.setattr(
        gemv, "skinny_gated_linear", lambda *a: launches.append(a[0].shape[0]) or original(*a)
    )
    path, hf_model = checkpoints("llama")
    assert_matches_hf(path, hf_model, tokenizer, new_tokens=8, token_budget=16, max_num_seqs=4)
    assert launches and min(launches) <= 4  # decode steps (and chunks of <= 16 tokens)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the production launches need a GPU")
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "float8"])
@pytest.mark.parametrize("rows", [1, 16])
@pytest.mark.parametrize("inter", [11008, 14336], ids=["llama-2-7b", "llama-3-8b"])
def test_gated_launch_on_llama_shapes(rows, fp8, inter):
    """The launches a GPU picks for Llama-2-7B's and Llama-3-8B's gate/up (I x 2 rows
    of 4096; float8: FP8_DEFAULT_CONFIG and FP8_MANY_BANDS_CONFIG): bit for bit the
    two launches' numbers."""
    x, w, _ = _operands(rows, inter, 4096, torch.bfloat16, False, seed=rows)
    if fp8:
        wq, scale = quantize_rows(w.float())
        got = skinny_gated_linear(x, wq, "silu", scale)
        want = act_and_mul(skinny_linear_fp8(x, wq, scale), "silu")
    else:
        got = skinny_gated_linear(x, w, "silu")
        want = act_and_mul(skinny_linear(x, w), "silu")
    assert torch.equal(got, want)


def test_gated_kernel_by_default_for_float8_weights_only(monkeypatch):
    """MII_GATED_GEMV=auto (the default) takes the gated launch for float8 gate/up
    weights (faster on an H200) and not for 16-bit ones (slower there); 'on' and
    'off' decide alone, and a float8 copy of act * up wanted by the down projection
    (MII_FP8_FUSED_QUANT=on, from two rows on or with MII_GEMV_ONE_ROW=tensor) keeps
    the act-and-mul kernel, which writes it."""
    from mii.models.layers import GatedMLP
    from mii.models.weight_quant import fp8_weights

    monkeypatch.setenv("MII_GEMV", "triton")
    monkeypatch.setenv("MII_FUSED", "triton")
    dense = GatedMLP(64, 96, "silu", bias=False).to(DEVICE)
    with fp8_weights("online"):
        quantized = GatedMLP(64, 96, "silu", bias=False).to(DEVICE)
    x = torch.randn(1, 64).to(DEVICE)
    assert quantized._gated_kernel_takes(x) and not dense._gated_kernel_takes(x)
    assert not quantized._gated_kernel_takes(torch.randn(17, 64).to(DEVICE))  # a prompt
    monkeypatch.setenv("MII_GATED_GEMV", "on")
    assert dense._gated_kernel_takes(x)
    monkeypatch.setenv("MII_GATED_GEMV", "off")
    assert not quantized._gated_kernel_takes(x)
    monkeypatch.setenv("MII_GATED_GEMV", "auto")
    monkeypatch.setenv("MII_FP8_FUSED_QUANT", "on")
    # (bfloat16 activations: float32 ones are never quantized, so no copy is read)
    one, two = (torch.randn(rows, 64).bfloat16().to(DEVICE) for rows in (1, 2))
    # one row: the down projection's CUDA-core launch reads act * up unquantized
    assert quantized._gated_kernel_takes(one) and quantized._gated_kernel_takes(x.bfloat16())
    assert not quantized._gated_kernel_takes(two)  # its tensor-core launch reads a copy
    monkeypatch.setenv("MII_GEMV_ONE_ROW", "tensor")
    assert not quantized._gated_kernel_takes(one)
