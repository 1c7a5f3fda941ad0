"""The skinny decode kernel on float8 e4m3 weights (``skinny_linear_fp8``) against
the reference (dequantize, then matmul), on CPU under TRITON_INTERPRET=1 (conftest)
and on CUDA when present; its dispatch from ``ops.fp8_linear``; and a tiny fp8
model whose decode steps run it, token for token against the reference path.

The interpreter reads float8 tensors as the GPU does for every finite e4m3 value
(checked below, all 254 of them); it differs only on e4m3's NaN encodings, which
quantized weights never hold (``quantize_rows`` clamps to +-448)."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

import mii
from fp8_checkpoints import dequantized_model
from helpers import PROMPTS, TIGHT_OPTIONS, assert_greedy_margins, hf_greedy
from mii.ops.dispatch import fp8_triton_supported, skinny_fp8_linear_enabled
from mii.ops.fp8_linear import (
    FP8_DTYPE,
    fp8_linear,
    fp8_linear_reference,
    quantize_per_token,
    quantize_rows,
)
from mii.ops.triton_fp8 import round_to_e4m3
from mii.ops.triton_gemv import MAX_ROWS, skinny_linear_fp8
from mii.ops.triton_gemv_launch import GemvConfig
from test_triton_kernels import DEVICE


@pytest.fixture(autouse=True)
def _fp8_kernels_on(monkeypatch):
    """On by default where Triton reads float8; set here so that a user's
    MII_FP8_KERNELS=off does not turn them off (the CPU interpreter ignores it)."""
    monkeypatch.setenv("MII_FP8_KERNELS", "triton")


def _case(rows: int, n: int, k: int, bias: bool, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    # Rows of very different magnitudes: each output channel's scale matters.
    w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen) * 4
    wq, scale = quantize_rows(w)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    # The float8 operands multiplied in float32 (what the kernel computes).
    expected = x.float() @ (wq.float() * scale[:, None]).T
    if b is not None:
        expected += b.float()
    return x, wq, scale, b, expected


def _run(x, wq, scale, b, config=None) -> torch.Tensor:
    on = [t.to(DEVICE) if t is not None else None for t in (x, wq, scale, b)]
    return skinny_linear_fp8(*on, config).cpu()


def _assert_near(out: torch.Tensor, expected: torch.Tensor) -> None:
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
    else:  # one rounding to bfloat16 (the interpreter truncates: up to one ulp)
        torch.testing.assert_close(out.float(), expected, rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "rows, n, k, bias, dequant",
    [
        (1, 96, 256, False, 0),  # whole blocks
        (3, 70, 200, True, 0),  # ragged N and K, bias
        (MAX_ROWS, 33, 64, False, 0),  # every row of the tile in use
        (3, 70, 200, True, 1),  # converted by integer operations (ops/triton_fp8.py)
    ],
)
def test_fp8_skinny_linear_matches_the_reference(rows, n, k, bias, dequant, dtype):
    x, wq, scale, b, expected = _case(rows, n, k, bias, dtype, seed=rows * n + k)
    out = _run(x, wq, scale, b, GemvConfig(32, 64, dequant=dequant))
    assert out.shape == (rows, n) and out.dtype == dtype
    _assert_near(out, expected)
    # The reference path (dequantize to x's dtype, then F.linear): float32 agrees
    # to rounding; bfloat16 rounds each dequantized weight first, the kernel not.
    reference = fp8_linear_reference(x, wq, scale, b).float()
    tol = 1e-4 if dtype == torch.float32 else 3e-2
    assert (out.float() - reference).norm() <= tol * reference.norm()


@pytest.mark.parametrize("dequant", [0, 1], ids=["cvt", "integer-ops"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_every_finite_e4m3_value_and_each_channel_scale(dequant, dtype):
    """x = identity picks each weight: out[m, n] = float(wq[n, m]) * scale[n] exactly,
    for all 254 finite e4m3 encodings (16 x 16 weight; NaNs replaced by zero), in
    either conversion (``GemvConfig.dequant``) to each activation dtype."""
    codes = torch.arange(256, dtype=torch.uint8)
    codes[[0x7F, 0xFF]] = 0  # e4m3fn's NaNs
    wq = codes.view(FP8_DTYPE).reshape(16, 16)
    # Powers of two: the product is exact in any output dtype whose range holds it.
    scale = 2.0 ** torch.randint(-12, -4, (16,), generator=torch.Generator().manual_seed(1))
    x = torch.eye(16, dtype=dtype)
    out = _run(x, wq, scale.float(), None, GemvConfig(16, 16, dequant=dequant))
    assert torch.equal(out, (wq.float() * scale[:, None]).T.to(dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, split_k", [(1, 2), (3, 3)])
def test_fp8_split_k(rows, split_k, dtype):
    """Split-K partials are unscaled sums; the last program adds them and applies the
    channel scale and bias once; a second launch (a graph replay) is right too."""
    from mii.ops import triton_arrivals

    x, wq, scale, b, expected = _case(rows, 70, 200, True, dtype, seed=rows * split_k)
    config = GemvConfig(32, 32, block_m=16, split_k=split_k)
    for _ in range(2):
        _assert_near(_run(x, wq, scale, b, config), expected)
    device = torch.empty(0, device=DEVICE).device  # cuda:0, as the kernel's tensors
    assert int(triton_arrivals._counts[device].count_nonzero()) == 0


def _assert_near_emulation(out: torch.Tensor, emulated: torch.Tensor) -> None:
    """Interpreted, the float8 products are the emulation's (one bf16 rounding); on a
    GPU its approximate reciprocal may round a value of x to the neighbouring float8
    one, and the tensor cores' float8 sums keep fewer bits: a norm bound there
    (a lost scale is off by O(1))."""
    if DEVICE.type == "cpu":
        _assert_near(out, emulated)
    else:
        assert (out.float() - emulated).norm() <= 1.5e-2 * emulated.norm()


def _slice_quantized_product(x, wq, scale, block_k: int) -> torch.Tensor:
    """What the float8-dot launch computes, emulated: each ``block_k`` slice of every
    row of x quantized to e4m3 with its own scale (amax / 448, torch's rounding),
    float8 times float8 summed in float32, scaled back per slice, then the channel
    scale."""
    out = torch.zeros(x.shape[0], wq.shape[0])
    for k0 in range(0, x.shape[1], block_k):
        part = x[:, k0 : k0 + block_k].float()
        xq, x_scale = quantize_per_token(part)  # the reference quantization
        xq = xq.float()
        out += (xq @ wq[:, k0 : k0 + block_k].float().T) * x_scale
    return out * scale


def test_round_to_e4m3_is_torchs_float8_cast():
    """The interpreter's float8 cast drops the carry when rounding reaches the next
    power of two (126.7 -> 64): the kernel's arithmetic rounding stands in for it
    there. It must equal torch's cast (ties to even) on normal and subnormal values,
    ties and the carry included."""

    @triton.jit
    def _round(V, Out, N: tl.constexpr):
        offs = tl.arange(0, N)
        tl.store(Out + offs, round_to_e4m3(tl.load(V + offs)))

    codes = torch.arange(256, dtype=torch.uint8)
    codes[[0x7F, 0xFF]] = 0  # e4m3fn's NaNs
    grid = codes.view(FP8_DTYPE).float().unique()
    midpoints = (grid[1:] + grid[:-1]) / 2  # ties: to the even neighbour
    gen = torch.Generator().manual_seed(0)
    values = torch.cat([grid, midpoints, torch.randn(2048, generator=gen) * 60, grid * 0.97])
    values = values[values.abs() <= 448]
    n = triton.next_power_of_2(values.numel())
    padded = torch.zeros(n)
    padded[: values.numel()] = values
    out = torch.empty(n, device=DEVICE)
    _round[(1,)](padded.to(DEVICE), out, n)
    assert torch.equal(out.cpu(), padded.to(FP8_DTYPE).float())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "rows, n, k, bias, split_k", [(1, 96, 256, False, 1), (3, 70, 200, True, 2)]
)
def test_fp8_dot_launch_quantizes_each_slice_of_x(rows, n, k, bias, split_k, dtype):
    """``GemvConfig.fp8_dot``: x's slices quantized to e4m3 in the kernel, float8 x
    float8 products: equal to its emulation, and within activation quantization's
    error of the float32 product (a launch that skipped the per-slice scale, or
    took one scale per token, would be far off the emulation). float32 activations
    keep exact products whatever the launch says."""
    x, wq, scale, b, _ = _case(rows, n, k, bias, dtype, seed=rows + n + k)
    # One row of x with a large outlier: a per-token scale would crush the others.
    x[0, 5] = 300.0
    block_k = 64
    config = GemvConfig(32, block_k, block_m=16, split_k=split_k, fp8_dot=True)
    out = _run(x, wq, scale, b, config)
    emulated = _slice_quantized_product(x, wq, scale, block_k) + (b.float() if bias else 0)
    _assert_near_emulation(out, emulated)
    exact = x.float() @ (wq.float() * scale[:, None]).T + (b.float() if bias else 0)
    assert (out.float() - exact).norm() <= 0.05 * exact.norm()
    _assert_near(_run(x.float(), wq, scale, b.float() if bias else None, config), exact)


# (rows, n, k, block_k, split_k); k_per_split = cdiv(cdiv(k, split_k), block_k) * block_k
X_GROUPS_CASES = [
    (1, 96, 256, 64, 1),
    (3, 70, 200, 64, 2),
    (16, 33, 64, 64, 1),
    (17, 33, 72, 32, 1),  # ragged, two row tiles
    (3, 70, 320, 64, 2),  # the second split's last trip lies wholly past K
    (5, 40, 1100, 256, 4),  # three splits: the last ragged, then past K
    (1, 64, 448, 64, 5),  # four splits: the last one's second trip past K
]


@pytest.mark.parametrize("rows, n, k, block_k, split_k", X_GROUPS_CASES)
def test_prequantized_x_groups_equal_the_in_loop_quantization(rows, n, k, block_k, split_k):
    """``GemvConfig.x_groups``: x quantized by a launch of its own, in slices of
    BLOCK_K, then read as float8 by the weight loop, each slice's scales loaded a
    trip ahead: the same output as quantizing each slice inside the loop (same
    scales, same float8 values, same sums), on ragged K and on splits that start
    mid-row or run past K. Each (row, slice) has an outlier of its own, so a
    scale taken from the wrong slice changes the output."""
    x, wq, scale, b, _ = _case(rows, n, k, True, torch.bfloat16, seed=rows * 7 + k)
    for row in range(rows):
        for start in range(0, k, block_k):
            x[row, min(k - 1, start + (row * 5) % block_k)] = 10.0 + 37 * ((row + start) % 7)
    config = GemvConfig(32, block_k, block_m=16, split_k=split_k, fp8_dot=True)
    in_loop = _run(x, wq, scale, b, config)
    grouped = _run(x, wq, scale, b, config._replace(x_groups=True))
    assert torch.equal(grouped, in_loop)
    emulated = _slice_quantized_product(x, wq, scale, block_k) + b.float()
    _assert_near_emulation(grouped, emulated)


@pytest.mark.parametrize(
    "name",
    [
        "FP8_DEFAULT_CONFIG",
        "FP8_FEW_BANDS_CONFIG",
        "FP8_SPLIT_CONFIG",
        "FP8_SHORT_K_CONFIG",
        "FP8_MANY_BANDS_CONFIG",
    ],
)
def test_each_production_fp8_launch_equals_its_emulation(name):
    """The launches ``fp8_config_for`` picks (x quantized in slices of their BLOCK_K
    by a launch of its own; 512-column slices unsplit for short K), on a ragged K
    that ends inside a slice: the slice-quantized emulation at that width."""
    import mii.ops.triton_gemv_launch as launches

    config = getattr(launches, name)
    x, wq, scale, b, _ = _case(3, 70, 1100, True, torch.bfloat16, seed=11)
    x[1, 600] = 300.0  # one slice with an outlier
    emulated = _slice_quantized_product(x, wq, scale, config.block_k) + b.float()
    _assert_near_emulation(_run(x, wq, scale, b, config), emulated)


def test_fp8_dot_with_tiny_and_zero_slices_stays_finite():
    """A slice of x that is all zeros or whose largest value is tiny (1e-37: 448 /
    amax would overflow) gives finite outputs equal to the emulation's."""
    x, wq, scale, _, _ = _case(2, 40, 256, False, torch.bfloat16, seed=3)
    x[0, 64:128] = 0.0
    x[0, 70] = 1e-37
    x[1, :64] = 1e-38
    out = _run(x, wq, scale, None, GemvConfig(32, 64, block_m=16, fp8_dot=True))
    assert torch.isfinite(out.float()).all()
    _assert_near_emulation(out, _slice_quantized_product(x, wq, scale, 64))


def test_slices_narrower_than_32_keep_16_bit_products():
    """A float8 dot needs K slices of at least 32: a launch with 16 falls back to
    converting the weights (what it computes is the exact product, not x quantized)."""
    x, wq, scale, _, expected = _case(3, 40, 48, False, torch.bfloat16, seed=4)
    out = _run(x, wq, scale, None, GemvConfig(16, 16, block_m=16, fp8_dot=True))
    _assert_near(out, expected)


def test_default_fp8_launch_on_ragged_shapes():
    x, wq, scale, b, expected = _case(5, 70, 200, True, torch.float32, seed=7)
    _assert_near(_run(x, wq, scale, b), expected)


def test_bad_operands_name_the_problem():
    x, (wq, scale) = torch.zeros(2, 32), quantize_rows(torch.randn(8, 32))
    with pytest.raises(ValueError, match="float8_e4m3fn weight"):
        skinny_linear_fp8(x, wq.float(), scale)
    with pytest.raises(ValueError, match="float32 scale of 8"):
        skinny_linear_fp8(x, wq, scale[:4])
    with pytest.raises(ValueError, match="float32 scale of 8"):
        skinny_linear_fp8(x, wq, scale.half())
    with pytest.raises(ValueError, match="contiguous bias of 8"):
        skinny_linear_fp8(x, wq, scale, torch.zeros(16)[::2])


def test_dispatch_conditions(monkeypatch):
    monkeypatch.setenv("MII_GEMV", "triton")
    x, (wq, scale) = torch.zeros(2, 32, device=DEVICE), quantize_rows(torch.randn(8, 32))
    wq, scale, zeros = wq.to(DEVICE), scale.to(DEVICE), torch.zeros(16, device=DEVICE)
    assert skinny_fp8_linear_enabled(x, wq, scale, zeros[:8])
    assert not skinny_fp8_linear_enabled(zeros.new_zeros(MAX_ROWS + 1, 32), wq, scale)  # a prompt
    assert not skinny_fp8_linear_enabled(x, wq.float(), scale)  # not float8
    assert not skinny_fp8_linear_enabled(x, wq, scale.half())
    assert not skinny_fp8_linear_enabled(x, wq, zeros[::2])  # strided scale
    assert not skinny_fp8_linear_enabled(x, wq, scale, zeros[:8].double())
    assert not skinny_fp8_linear_enabled(x.cpu(), wq, scale) or DEVICE.type == "cpu"
    monkeypatch.setenv("MII_GEMV", "torch")
    assert not skinny_fp8_linear_enabled(x, wq, scale)


def test_fp8_linear_takes_the_kernel_for_decode_sized_batches(monkeypatch):
    import mii.ops.triton_gemv as kernels

    rows_seen = []
    original = kernels.skinny_linear_fp8
    monkeypatch.setattr(
        kernels, "skinny_linear_fp8", lambda x, *a: rows_seen.append(x.shape[0]) or original(x, *a)
    )
    monkeypatch.setenv("MII_GEMV", "triton")
    wq, scale = quantize_rows(torch.randn(24, 40))
    wq, scale, b = wq.to(DEVICE), scale.to(DEVICE), torch.randn(24).to(DEVICE)
    for rows in (1, MAX_ROWS, MAX_ROWS + 1):
        x = torch.randn(rows, 40).to(DEVICE)
        expected = fp8_linear_reference(x, wq, scale, b)
        torch.testing.assert_close(fp8_linear(x, wq, scale, b), expected, rtol=1e-4, atol=1e-4)
    assert rows_seen == [1, MAX_ROWS]  # a prompt-sized batch: _scaled_mm or the reference
    monkeypatch.setenv("MII_GEMV", "torch")
    fp8_linear(torch.randn(1, 40).to(DEVICE), wq, scale, b)
    assert rows_seen == [1, MAX_ROWS]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU run of the interpreted kernel")
def test_fp8_model_decodes_through_the_kernel_token_for_token(checkpoints, tokenizer, monkeypatch):
    """A tiny fp8 model (float32 activations) whose decode steps and short chunks run
    the interpreted float8 kernel, with chunked prompts and preemption: the greedy
    tokens of the reference path and of transformers on the dequantized weights."""
    import mii.ops.triton_gemv as kernels

    path, hf_model = checkpoints("llama")
    oracle = dequantized_model(hf_model)
    prompts, new_tokens = PROMPTS, 12
    assert_greedy_margins(oracle, tokenizer, prompts, new_tokens)
    calls = []
    original = kernels.skinny_linear_fp8
    monkeypatch.setattr(kernels, "skinny_linear_fp8", lambda *a: calls.append(1) or original(*a))
    outputs = {}
    for gemv in ("triton", "torch"):
        monkeypatch.setenv("MII_GEMV", gemv)
        with mii.pipeline(str(path), quantization="fp8", **TIGHT_OPTIONS) as pipe:
            responses = pipe(prompts, do_sample=False, max_new_tokens=new_tokens)
            outputs[gemv] = [r.token_ids for r in responses]
            assert pipe.engine.stats()["preemptions"] > 0
        assert bool(calls) == (gemv == "triton")
        calls.clear()
    assert outputs["triton"] == outputs["torch"]
    assert outputs["triton"] == [hf_greedy(oracle, tokenizer, p, new_tokens) for p in prompts]


def test_row_parallel_shards_sum_to_the_whole(monkeypatch):
    """Tensor parallelism: a row-parallel rank holds a slice of every row's columns
    with the whole row's scale; the kernel's per-rank outputs (scaled partial sums)
    add up to the one-rank output, as the all-reduce adds them."""
    import mii.ops.triton_gemv as kernels
    from mii.models.layers import RowParallelLinear, layer_linear
    from mii.models.parallel import parallel_state
    from mii.models.weight_quant import fp8_weights

    calls = []
    original = kernels.skinny_linear_fp8
    monkeypatch.setattr(kernels, "skinny_linear_fp8", lambda *a: calls.append(1) or original(*a))
    monkeypatch.setenv("MII_GEMV", "triton")
    gen = torch.Generator().manual_seed(11)
    w, x = torch.randn(40, 64, generator=gen), torch.randn(3, 64, generator=gen)
    with fp8_weights("online"):
        whole = RowParallelLinear(64, 40, bias=False)
        whole.weight_loader("weight", whole.weight, w)
        shards = []
        for rank in range(2):
            with parallel_state(rank, 2):
                shard = RowParallelLinear(64, 40, bias=False)
                shard.weight_loader("weight", shard.weight, w)
                shards.append(shard.to(DEVICE))
    whole = whole.to(DEVICE)
    one = layer_linear(whole, x.to(DEVICE), None).cpu()
    parts = [
        layer_linear(s, x[:, 32 * r : 32 * (r + 1)].to(DEVICE), None) for r, s in enumerate(shards)
    ]
    torch.testing.assert_close(sum(p.cpu() for p in parts), one, rtol=1e-5, atol=1e-5)
    reference = fp8_linear_reference(x, whole.weight.cpu(), whole.weight_scale.cpu())
    torch.testing.assert_close(one, reference, rtol=1e-5, atol=1e-5)
    assert len(calls) == 3  # the whole layer and each rank's shard


def test_float8_kernels_switch(monkeypatch):
    """On by default where Triton reads float8 (the H200 sweep made them faster than
    bf16 and torch._scaled_mm at batch 1); MII_FP8_KERNELS=off turns them off."""
    import mii.ops.dispatch as dispatch

    monkeypatch.setattr(dispatch, "_capability", lambda index: (9, 0))
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.delenv("MII_FP8_KERNELS")
    assert fp8_triton_supported(torch.device("cuda", 0))
    monkeypatch.setenv("MII_FP8_KERNELS", "off")
    assert not fp8_triton_supported(torch.device("cuda", 0))
    monkeypatch.delenv("MII_FP8_KERNELS")
    monkeypatch.setattr(dispatch, "_capability", lambda index: (8, 0))  # an A100: no e4m3
    assert not fp8_triton_supported(torch.device("cuda", 0))


def test_fp8_launch_by_weight_shape(monkeypatch):
    """``fp8_config_for`` on an H200's 132 multiprocessors, Llama-2-7B's projections
    at batch 1 (and Llama-3-8B's gate_up): the launches its sweeps found fastest
    (docs/performance.md)."""
    import mii.ops.triton_gemv_launch as gemv

    monkeypatch.setenv("MII_GEMV_ONE_ROW", "tensor")  # the tensor-core launches (batch 1: cores)

    monkeypatch.setattr(gemv.triton_limits, "multiprocessors", lambda device: 132)
    device = torch.device("cpu")
    assert gemv.fp8_config_for(1, 12288, 4096, device) == gemv.FP8_FEW_BANDS_CONFIG  # qkv
    assert gemv.fp8_config_for(1, 22016, 4096, device) == gemv.FP8_DEFAULT_CONFIG  # gate_up
    # Llama-3-8B's gate_up: 448 bands, more than the default launch runs at once
    assert gemv.fp8_config_for(1, 28672, 4096, device) == gemv.FP8_MANY_BANDS_CONFIG
    assert gemv.fp8_config_for(1, 3 * 132 * 64, 4096, device) == gemv.FP8_DEFAULT_CONFIG
    # Llama-3-70B's gate_up: 896 bands, several waves either way: the default
    assert gemv.fp8_config_for(1, 57344, 8192, device) == gemv.FP8_DEFAULT_CONFIG
    # o: K unsplit, 512-column slices
    o = gemv.fp8_config_for(16, 4096, 4096, device)
    assert o == gemv.FP8_SHORT_K_CONFIG and (o.block_k, o.split_k) == (512, 1)
    down = gemv.fp8_config_for(1, 4096, 11008, device)  # down: K split 4 ways
    assert down == gemv.FP8_SPLIT_CONFIG
    assert gemv.split_k_for(down, triton.cdiv(4096, down.block_n), 11008, device) == 4
    assert gemv.fp8_config_for(MAX_ROWS + 1, 4096, 4096, device).fp8_dot
