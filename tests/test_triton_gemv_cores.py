"""The skinny decode kernel's CUDA-core launch (``GemvConfig.cores``, chosen at batch 1
by ``MII_GEMV_ONE_ROW``): one row of x per program, float32 products of each weight
converted where it is loaded, x unquantized. Against float32 matmuls of the same
operands, on CPU under TRITON_INTERPRET=1 (conftest) and on a GPU."""

from __future__ import annotations

import pytest
import torch

from mii.ops.fp8_linear import quantize_rows
from mii.ops.fused_elementwise import act_and_mul
from mii.ops.triton_gemv import skinny_gated_linear, skinny_linear, skinny_linear_fp8
from mii.ops.triton_gemv_launch import (
    CORES_CONFIG,
    GemvConfig,
    bf16_config_for,
    fp8_config_for,
    prequantized_slices,
)
from test_triton_kernels import DEVICE

CORES = GemvConfig(16, 64, num_stages=2, block_m=1, split_k=1, cores=True)


def _operands(rows: int, n: int, k: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    # Rows of very different magnitudes: each float8 channel's scale matters.
    w = torch.randn(n, k, generator=gen) * torch.rand(n, 1, generator=gen) * 4
    b = torch.randn(n, generator=gen).to(dtype)
    return x, w, b


def _close(out: torch.Tensor, expected: torch.Tensor) -> None:
    if out.dtype == torch.float32:
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)
    else:  # one rounding to 16 bits (the interpreter truncates: up to one ulp)
        torch.testing.assert_close(out.float(), expected, rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "rows, n, k, bias, config",
    [
        (1, 48, 128, False, CORES),  # whole bands and slices
        (1, 37, 200, True, CORES),  # ragged N and K, bias
        (3, 37, 200, True, CORES),  # one program per row
        (1, 40, 320, False, CORES._replace(split_k=3)),  # split-K partials
        (2, 40, 320, True, CORES._replace(split_k=2, dequant=1)),  # integer conversion
        (2, 37, 200, True, CORES._replace(block_m=2)),  # two rows a program
        (3, 40, 320, False, CORES._replace(block_m=4, split_k=2)),  # a row of the tile masked
        (5, 37, 200, True, CORES._replace(block_m=2)),  # several row tiles
    ],
)
def test_float8_weights_times_unquantized_x(rows, n, k, bias, config, dtype):
    """x is not quantized: the result is x times the float8 weights' exact values,
    to float32 rounding, unlike the tensor-core launch's float8 products."""
    x, w, b = _operands(rows, n, k, dtype, seed=rows * n + k)
    wq, scale = quantize_rows(w)
    b = b if bias else None
    expected = x.float() @ (wq.float() * scale[:, None]).T
    if b is not None:
        expected += b.float()
    on = [t.to(DEVICE) if t is not None else None for t in (x, wq, scale, b)]
    out = skinny_linear_fp8(*on, config)
    assert out.shape == (rows, n) and out.dtype == dtype
    _close(out.cpu(), expected)
    # A second launch (a graph replay: split-K's arrival counts were reset) agrees.
    assert torch.equal(skinny_linear_fp8(*on, config), out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows, block_m", [(1, 1), (2, 2)])
def test_16_bit_weights(dtype, rows, block_m):
    x, w, b = _operands(rows, 37, 200, dtype, seed=5)
    w = w.to(dtype)
    config = CORES._replace(block_m=block_m)
    out = skinny_linear(x.to(DEVICE), w.to(DEVICE), b.to(DEVICE), config)
    _close(out.cpu(), x.float() @ w.float().T + b.float())


@pytest.mark.parametrize("rows, block_m", [(1, 1), (3, 4)])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_gated_epilogue(fp8, rows, block_m):
    """act(gate) * up of the CUDA-core sums: the same numbers as the projection by the
    same launch, then the act-and-mul kernel."""
    config = CORES._replace(block_m=block_m)
    x, w, _ = _operands(rows, 2 * 40, 96, torch.bfloat16, seed=7)
    x = x.to(DEVICE)
    if fp8:
        wq, scale = (t.to(DEVICE) for t in quantize_rows(w))
        got = skinny_gated_linear(x, wq, "silu", scale, None, config)
        want = act_and_mul(skinny_linear_fp8(x, wq, scale, None, config), "silu")
    else:
        wb = w.to(torch.bfloat16).to(DEVICE)
        got = skinny_gated_linear(x, wb, "silu", None, None, config)
        want = act_and_mul(skinny_linear(x, wb, None, config), "silu")
    assert got.shape == (rows, 40)
    assert torch.equal(got, want)


def test_at_most_four_rows_per_program():
    x, w, _ = _operands(1, 16, 64, torch.float32, seed=1)
    with pytest.raises(ValueError, match="1, 2 or 4 rows per program"):
        skinny_linear(x.to(DEVICE), w.to(DEVICE), None, CORES._replace(block_m=16))


def test_gemv_one_row_switch(monkeypatch):
    """MII_GEMV_ONE_ROW picks the CUDA-core launch for one row only, by default
    ('cores-fp8': for float8 weights only; 'tensor': never); the norms then write no
    float8 copy of x for it. On 132 multiprocessors: where 8-row bands are at most 4
    per multiprocessor (Llama-2-7B's o and down), 8-row bands of 1,024 columns for
    float8 weights and 4-row bands of 2,048 for 16-bit ones; else 4-row bands (qkv,
    gate_up, the LM head), on 2 warps for float8 weights (the H100 sweeps' best)."""
    import mii.ops.triton_gemv_launch as gemv

    monkeypatch.setattr(gemv.triton_limits, "multiprocessors", lambda device: 132)
    device = torch.device(DEVICE)
    monkeypatch.delenv("MII_GEMV_ONE_ROW", raising=False)
    assert fp8_config_for(1, 4096, 4096, device) == CORES_CONFIG  # o: 512 bands
    few = bf16_config_for(1, 4096, device)
    assert few == gemv.BF16_CORES_FEW_BANDS_CONFIG and (few.block_n, few.block_k) == (4, 2048)
    assert bf16_config_for(1, 4 * 132 * 8 + 1, device) == gemv.CORES_MANY_BANDS_CONFIG
    qkv = fp8_config_for(1, 12288, 4096, device)
    assert qkv == gemv.FP8_CORES_MANY_BANDS_CONFIG and (qkv.block_n, qkv.num_warps) == (4, 2)
    assert bf16_config_for(1, 32000, device).block_n == 4  # lm_head
    assert not fp8_config_for(2, 4096, 4096, device).cores
    assert not bf16_config_for(2, 4096, device).cores
    # an empty batch (no row to sample): a launch that makes no kernel call
    empty = skinny_linear(torch.zeros(0, 64, device=device), torch.ones(8, 64, device=device))
    assert empty.shape == (0, 8) and bf16_config_for(0, 4096, device).cores
    assert prequantized_slices(fp8_config_for(1, 4096, 4096, device), torch.bfloat16) == 0
    monkeypatch.setenv("MII_GEMV_ONE_ROW", "cores-fp8")
    assert fp8_config_for(1, 4096, 4096, device).cores
    assert not bf16_config_for(1, 4096, device).cores
    monkeypatch.setenv("MII_GEMV_ONE_ROW", "tensor")
    assert not fp8_config_for(1, 4096, 4096, device).cores
    assert not bf16_config_for(1, 4096, device).cores
    monkeypatch.setenv("MII_GEMV_ONE_ROW", "fast")
    with pytest.raises(ValueError, match="MII_GEMV_ONE_ROW"):
        fp8_config_for(1, 4096, 4096, device)


def test_rows_past_one_under_a_raised_limit(monkeypatch):
    """With CORES_MAX_ROWS raised (what gemv_cores_sweep --rows 2 4 decides), a batch
    of up to 4 rows takes them all in each program, the slices narrowed in proportion;
    the result equals the float32 product."""
    import mii.ops.triton_gemv_launch as gemv

    monkeypatch.setattr(gemv, "CORES_MAX_ROWS", 4)
    device = torch.device(DEVICE)
    three = fp8_config_for(3, 4096, 4096, device)
    assert three.cores and (three.block_m, three.block_k) == (4, CORES_CONFIG.block_k // 4)
    assert not fp8_config_for(5, 4096, 4096, device).cores
    x, w, b = _operands(3, 37, 200, torch.float32, seed=9)
    out = skinny_linear(x.to(DEVICE), w.to(DEVICE), b.to(DEVICE), three)
    _close(out.cpu(), x @ w.T + b)


@pytest.mark.parametrize(
    "name",
    [
        "CORES_CONFIG",
        "BF16_CORES_FEW_BANDS_CONFIG",
        "CORES_MANY_BANDS_CONFIG",
        "FP8_CORES_MANY_BANDS_CONFIG",
    ],
)
@pytest.mark.parametrize("gated", [False, True])
def test_production_launches_on_a_ragged_k(name, gated):
    """The engine's one-row launches themselves (1,024- and 2,048-column slices, 4- and
    8-row bands) on a K that ends inside a slice (and spans two of 1,024), float8
    weights: the float32 product, and the gated epilogue's act(gate) * up of it."""
    import mii.ops.triton_gemv_launch as gemv

    config = getattr(gemv, name)
    x, w, _ = _operands(1, 2 * 24, 1030, torch.bfloat16, seed=11)
    wq, scale = quantize_rows(w)
    on = [t.to(DEVICE) for t in (x, wq, scale)]
    plain = skinny_linear_fp8(*on, None, config)
    _close(plain.cpu(), x.float() @ (wq.float() * scale[:, None]).T)
    if gated:
        got = skinny_gated_linear(on[0], on[1], "silu", on[2], None, config)
        assert torch.equal(got, act_and_mul(plain, "silu"))


def test_the_16_bit_few_bands_launch_over_several_slices():
    """BF16_CORES_FEW_BANDS_CONFIG (the o and down projections of 16-bit models: 4-row
    bands of 2,048-column slices) with bfloat16 weights, as production runs it, on a K
    of two whole slices and a ragged third: the float32 product, to one rounding."""
    import mii.ops.triton_gemv_launch as gemv

    config = gemv.BF16_CORES_FEW_BANDS_CONFIG
    x, w, b = _operands(1, 12, 2 * config.block_k + 6, torch.bfloat16, seed=5)
    w = w.to(torch.bfloat16)
    out = skinny_linear(x.to(DEVICE), w.to(DEVICE), b.to(DEVICE), config)
    _close(out.cpu(), x.float() @ w.float().T + b.float())


def test_the_loop_pipelines_only_as_deep_as_shared_memory_holds(monkeypatch):
    """The one-row loop's pipeline depth (its own ``tl.range`` stages, which Triton
    takes over the launch's) is the depth that fits the device's shared memory, as
    the launch's is: float32 weights at CORES_CONFIG's 4 stages need 110 KB, more
    than an L4 or a 4090 gives a program."""
    from mii.ops import triton_gemv, triton_limits

    launched = {}

    class Kernel:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.update(kwargs)

    monkeypatch.setattr(triton_gemv, "_skinny_linear_kernel", Kernel())
    monkeypatch.setattr(triton_limits, "stages_that_fit", lambda stages, nbytes, device: 2)
    x, w, _ = _operands(1, 16, 64, torch.float32, seed=2)
    skinny_linear(x.to(DEVICE), w.to(DEVICE), None, CORES_CONFIG)
    assert launched["CORES"] and launched["LOOP_STAGES"] == launched["num_stages"] == 2
