"""The float8 Triton kernels on a CUDA device with FP8 support (sm_89+; skipped
elsewhere): the skinny decode kernel (``skinny_linear_fp8``) and the grouped
expert kernel on float8 experts, against their float32 emulation and the
reference path (dequantize, then a 16-bit matmul), on Llama-2-7B and
Mixtral-8x7B shapes, in CUDA graphs, and end to end.

What the CPU tests (interpreted, ``test_triton_gemv_fp8.py`` and
``test_triton_moe_fp8.py``) cannot check and these do: the compiled e4m3
conversion, the tensor-core dot on converted tiles, split-K's atomics and
programmatic dependent launch on real hardware, graph replays."""

from __future__ import annotations

import pytest
import torch

import mii.ops.fp8_linear as fp8_ops
from mii.ops.fp8_linear import (
    dequantize_rows,
    fp8_linear_reference,
    quantize_per_token,
    quantize_rows,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(
        torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9),
        reason="Triton reads float8 e4m3 on sm_89+ only",
    ),
]


@pytest.fixture(autouse=True)
def _fp8_kernels_on(monkeypatch):
    """On by default on sm_89+; set here so that a user's MII_FP8_KERNELS=off does not
    turn the tested kernels off."""
    monkeypatch.setenv("MII_FP8_KERNELS", "triton")


# Llama-2-7B's projections (N, K) and a Mixtral-8x7B expert's gate (or up) rows.
SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (14336, 4096)]


def _quantized(n: int, k: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, device="cuda", generator=gen) * 0.02
    w *= torch.rand(n, 1, device="cuda", generator=gen) + 0.5  # channels of different scales
    return quantize_rows(w)


def _relative(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).norm() / want.double().norm()).item()


def _slice_quantized(x, wq, scale, block_k: int) -> torch.Tensor:
    """The float8-product launch emulated in float64: each ``block_k`` slice of each
    row of x quantized to e4m3 with its own scale, times the float8 weight, scaled
    back per slice, then the channel scale (``GemvConfig.fp8_dot``)."""
    out = torch.zeros(x.shape[0], wq.shape[0], device=x.device, dtype=torch.float64)
    for k0 in range(0, x.shape[1], block_k):
        part = x[:, k0 : k0 + block_k].float()
        xq, x_scale = quantize_per_token(part)  # the reference quantization
        xq = xq.double()
        out += (xq @ wq[:, k0 : k0 + block_k].double().T) * x_scale.double()
    return out * scale.double()


# The float8-product launch against its float64 emulation (see the first test below);
# a launch that lost the per-slice scales or a channel's scale is off by O(1).
FP8_DOT_BOUND = 1.5e-2
MODES = {"fp8-dot": dict(fp8_dot=True), "cvt": dict(fp8_dot=False, dequant=0)}
MODES["integer-ops"] = dict(fp8_dot=False, dequant=1)


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("rows", [1, 4, 16])
@pytest.mark.parametrize("n, k", SHAPES, ids=[f"{n}x{k}" for n, k in SHAPES])
def test_skinny_fp8_matches_its_float32_emulation_and_the_reference(n, k, rows, mode, monkeypatch):
    from mii.ops.triton_gemv import skinny_linear_fp8
    from mii.ops.triton_gemv_launch import fp8_config_for

    # The modes are the tensor-core launch's ways of multiplying; one row takes the
    # CUDA cores by default (unquantized x: tests/test_triton_gemv_cores.py), where
    # fp8_dot does not apply, so the tensor-core launch is asked for here.
    monkeypatch.setenv("MII_GEMV_ONE_ROW", "tensor")
    wq, scale = _quantized(n, k, seed=n + k)
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
    # The launch the layers get for this shape, in each way of multiplying.
    config = fp8_config_for(rows, n, k, x.device)._replace(**MODES[mode])
    assert not config.cores
    out = skinny_linear_fp8(x, wq, scale, None, config)
    torch.cuda.synchronize()
    assert out.dtype == torch.bfloat16 and out.shape == (rows, n)
    exact = x.double() @ (wq.double() * scale.double()[:, None]).T
    if mode == "fp8-dot":
        # The emulation differs by the bfloat16 output rounding, the tensor cores'
        # float8 accumulation within a slice (Hopper keeps fewer bits than float32:
        # measured 0.0065-0.0069 on an H200 with IEEE scales) and the GPU's
        # approximate reciprocal (a value may round to the next float8 one); x's
        # quantization separates it from the exact product.
        assert _relative(out, _slice_quantized(x, wq, scale, config.block_k)) < FP8_DOT_BOUND
        assert 1e-3 < _relative(out, exact) < 5e-2
        return
    emulated = exact.float()
    # Only the float32 summation order and the bfloat16 output rounding differ.
    torch.testing.assert_close(
        out.float(), emulated, rtol=2**-7, atol=1e-2 * emulated.abs().mean().item()
    )
    # The reference rounds every dequantized weight to bfloat16 first.
    assert _relative(out, fp8_linear_reference(x, wq, scale)) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_skinny_fp8_bias_and_other_activation_dtypes(dtype):
    from mii.ops.triton_gemv import skinny_linear_fp8
    from mii.ops.triton_gemv_launch import fp8_config_for

    wq, scale = _quantized(4096, 4096, seed=1)
    x = torch.randn(3, 4096, device="cuda", dtype=dtype)
    bias = torch.randn(4096, device="cuda", dtype=dtype)
    out = skinny_linear_fp8(x, wq, scale, bias)
    assert out.dtype == dtype
    if dtype == torch.float16:  # the default launch: float8 products
        emulated = _slice_quantized(x, wq, scale, fp8_config_for(3, 4096, 4096, x.device).block_k)
        assert _relative(out, emulated + bias.double()) < FP8_DOT_BOUND
    else:  # float32 activations keep exact products; no tf32 (IEEE dot): summation order
        emulated = x.double() @ (wq.double() * scale.double()[:, None]).T + bias.double()
        assert _relative(out, emulated) < 1e-4


def test_skinny_fp8_split_k_in_a_cuda_graph():
    """Forced and automatic split-K replayed from a graph with new inputs: the
    arrival counts reset by every launch, the scale applied once."""
    from mii.ops.triton_gemv import skinny_linear_fp8
    from mii.ops.triton_gemv_launch import FP8_DEFAULT_CONFIG

    wq, scale = _quantized(4096, 11008, seed=2)
    x = torch.randn(2, 11008, device="cuda", dtype=torch.bfloat16)
    configs = [None, FP8_DEFAULT_CONFIG._replace(split_k=4), FP8_DEFAULT_CONFIG._replace(split_k=1)]
    outs = [skinny_linear_fp8(x, wq, scale, None, c) for c in configs]  # eager warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [skinny_linear_fp8(x, wq, scale, None, c) for c in configs]
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        emulated = _slice_quantized(x, wq, scale, FP8_DEFAULT_CONFIG.block_k)
        for out in outs:
            assert _relative(out, emulated) < FP8_DOT_BOUND


def test_fp8_linear_routes_decode_rows_to_the_skinny_kernel(monkeypatch):
    import mii.ops.triton_gemv as gemv

    calls = []
    original = gemv.skinny_linear_fp8
    monkeypatch.setattr(
        gemv, "skinny_linear_fp8", lambda x, *a: calls.append(len(x)) or original(x, *a)
    )
    wq, scale = _quantized(4096, 4096, seed=3)
    for rows in (1, 16, 17, 64):
        x = torch.randn(rows, 4096, device="cuda", dtype=torch.bfloat16)
        assert (
            _relative(fp8_ops.fp8_linear(x, wq, scale), fp8_linear_reference(x, wq, scale)) < 0.05
        )
    assert calls == [1, 16]  # more rows: torch._scaled_mm


def _moe_reference(x, w13, s13, w2, s2, weights, experts, act) -> torch.Tensor:
    """The expert MLP in float32 on the dequantized weights, one expert at a time."""
    out = torch.zeros(x.shape[0], w2.shape[1], device="cuda")
    for e in experts.unique().tolist():
        tokens, slot = (experts == e).nonzero(as_tuple=True)
        up13 = x[tokens].float() @ dequantize_rows(w13[e], s13[e], torch.float32).T
        gate, up = up13.chunk(2, dim=-1)
        y = (act(gate) * up) @ dequantize_rows(w2[e], s2[e], torch.float32).T
        out.index_add_(0, tokens, y * weights[tokens, slot, None].float())
    return out


MIXTRAL = (8, 4096, 14336)  # experts, hidden, intermediate


@pytest.fixture(scope="module")
def mixtral_experts():
    """Float8 experts of Mixtral-8x7B's shape: w13 [8, 28672, 4096], w2 [8, 4096, 14336]
    and their per (expert, output channel) scales."""
    experts_n, hidden, inter = MIXTRAL
    w13 = torch.empty(experts_n, 2 * inter, hidden, device="cuda", dtype=torch.float8_e4m3fn)
    s13 = torch.empty(experts_n, 2 * inter, device="cuda")
    w2 = torch.empty(experts_n, hidden, inter, device="cuda", dtype=torch.float8_e4m3fn)
    s2 = torch.empty(experts_n, hidden, device="cuda")
    for e in range(experts_n):  # one expert at a time: bounded float32 temporaries
        w13[e], s13[e] = _quantized(2 * inter, hidden, seed=e)
        w2[e], s2[e] = _quantized(hidden, inter, seed=100 + e)
    return w13, s13, w2, s2


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("tokens", [1, 16, 128, 1024])
def test_grouped_fp8_experts_on_the_mixtral_shape(mixtral_experts, tokens, mode):
    """8 experts, hidden 4096, intermediate 14336, top-2: float8 experts in the
    kernel, with float8 or 16-bit products, against float32 on their dequantized
    weights and against the bf16 kernel on them (the previous path)."""
    import torch.nn.functional as F

    from mii.ops.triton_moe import default_tiles, moe_grouped_mlp

    w13, s13, w2, s2 = mixtral_experts
    experts_n, hidden, _ = MIXTRAL
    gen = torch.Generator(device="cuda").manual_seed(tokens)
    x = torch.randn(tokens, hidden, device="cuda", generator=gen).to(torch.bfloat16)
    logits = torch.randn(tokens, experts_n, device="cuda", generator=gen)
    weights, experts = torch.softmax(logits, -1).topk(2, dim=-1)
    weights = weights / weights.sum(-1, keepdim=True)
    tiles = default_tiles(tokens * 2, fp8=True)._replace(**MODES[mode])
    got = moe_grouped_mlp(x, w13, w2, weights, experts, F.silu, tiles, s13, s2)
    torch.cuda.synchronize()
    assert got.dtype == torch.bfloat16 and got.shape == (tokens, hidden)
    reference = _moe_reference(x, w13, s13, w2, s2, weights, experts, F.silu)
    # bfloat16 rounding of the activations between the two GEMMs (the reference has
    # none); with float8 products also both GEMMs' activation quantization (e4m3:
    # up to 6 % per value, ~2-4 % on a product of random vectors).
    bound = 8e-2 if mode == "fp8-dot" else 2e-2
    assert _relative(got, reference) < bound
    bf16 = moe_grouped_mlp(
        x,
        dequantize_rows(w13, s13, torch.bfloat16),
        dequantize_rows(w2, s2, torch.bfloat16),
        weights,
        experts,
        F.silu,
    )
    assert _relative(got, bf16) < bound


@pytest.mark.parametrize("fp8", [True, False], ids=["float8", "bf16"])
@pytest.mark.parametrize("tokens", [1, 16, 32])
def test_swapped_decode_tiles_on_the_mixtral_shape(mixtral_experts, tokens, fp8):
    """``TileConfig.swap_ab`` (the product computed transposed) against the plain
    decode tile, one gate/up GEMM on Mixtral's experts: the same float8 values and
    scales, only the tensor cores' summation differs (float8 wgmma's accumulator
    keeps fewer bits than mma.sync's float32: within 2e-3). (Through the whole
    expert MLP the intermediate's float8 rounding turns that into ~1 %.)"""
    from mii.ops.triton_moe import default_tiles, grouped_gemm
    from mii.ops.triton_moe_layout import align_by_expert

    w13, s13, _, _ = mixtral_experts
    if not fp8:
        w13, s13 = dequantize_rows(w13, s13, torch.bfloat16), None
    experts_n, hidden, _ = MIXTRAL
    gen = torch.Generator(device="cuda").manual_seed(tokens + 1)
    x = torch.randn(tokens, hidden, device="cuda", generator=gen).to(torch.bfloat16)
    experts = torch.randn(tokens, experts_n, device="cuda", generator=gen).topk(2, dim=-1)[1]
    tiles = default_tiles(tokens * 2, fp8=fp8)._replace(swap_ab=False)
    pairs, blocks = align_by_expert(experts, experts_n, tiles.block_m)
    args = (x, w13, pairs, blocks, tokens * 2, 2)
    plain = grouped_gemm(*args, tiles, None, s13)
    swapped = grouped_gemm(*args, tiles._replace(swap_ab=True), None, s13)
    assert _relative(swapped, plain) < 2e-3


def test_fp8_model_with_and_without_the_skinny_kernel(checkpoints, monkeypatch):
    """bf16 activations, CUDA graphs and async scheduling: decode steps through the
    float8 skinny kernel (prompts through torch._scaled_mm). Its greedy
    continuations, scored by the reference path (dequantized weights, activations
    not quantized), stay within activation quantization's noise (the bounds of
    tests/test_fp8_gpu.py: equal tokens is the wrong test, near ties flip); the
    kernel with reversed channel scales does not."""
    import mii.ops.triton_gemv as gemv
    from test_fp8_gpu import _greedy, _reference_gaps, _shuffled_channel_scales, _within_noise

    path, _ = checkpoints("llama")
    calls = []
    original = gemv.skinny_linear_fp8
    monkeypatch.setattr(gemv, "skinny_linear_fp8", lambda *a: calls.append(1) or original(*a))
    answers = _greedy(path)
    assert calls  # the decode steps went through the kernel

    def reference_gaps(answers):
        with monkeypatch.context() as patch:
            patch.setenv("MII_GEMV", "torch")
            patch.setattr(fp8_ops, "scaled_mm_enabled", lambda x, w: False)
            return _reference_gaps(path, answers)

    gaps = reference_gaps(answers)
    assert _within_noise(gaps), (gaps.mean().item(), gaps.max().item())
    with monkeypatch.context() as patch:
        patch.setattr(gemv, "skinny_linear_fp8", _shuffled_channel_scales(original))
        broken = _greedy(path)
    broken_gaps = reference_gaps(broken)
    assert not _within_noise(broken_gaps), (broken_gaps.mean().item(), broken_gaps.max().item())
