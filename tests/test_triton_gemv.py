"""The skinny linear kernel (decode batches of 1-16 rows) against F.linear, on
CPU under TRITON_INTERPRET=1 (conftest) and on CUDA when present."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from helpers import TIGHT_OPTIONS, assert_matches_hf
from mii.ops.triton_gemv import MAX_ROWS, skinny_linear
from mii.ops.triton_gemv_launch import GemvConfig
from test_triton_kernels import DEVICE


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    "rows, n, k, bias",
    [
        (1, 96, 256, False),  # whole blocks
        (3, 70, 200, True),  # ragged N and K, bias
        (MAX_ROWS, 33, 64, False),  # every row of the tile in use
    ],
)
def test_skinny_linear_matches_f_linear(rows, n, k, bias, dtype):
    gen = torch.Generator().manual_seed(rows * n + k)
    x = torch.randn(rows, k, generator=gen).to(dtype)
    w = torch.randn(n, k, generator=gen).to(dtype)
    b = torch.randn(n, generator=gen).to(dtype) if bias else None
    expected = F.linear(x.float(), w.float(), b.float() if b is not None else None)
    out = skinny_linear(
        x.to(DEVICE), w.to(DEVICE), b.to(DEVICE) if b is not None else None, GemvConfig(32, 64)
    )
    assert out.shape == (rows, n) and out.dtype == dtype
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(out.float().cpu(), expected, rtol=tol, atol=tol * k**0.5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_launch_on_ragged_shapes(dtype):
    """The launch the layers use (its pipeline depth fitted to this device's shared
    memory), on N and K that are not multiples of its tiles."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(5, 200, generator=gen).to(dtype)
    w = torch.randn(70, 200, generator=gen).to(dtype)
    b = torch.randn(70, generator=gen).to(dtype)
    out = skinny_linear(x.to(DEVICE), w.to(DEVICE), b.to(DEVICE))
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    expected = F.linear(x.float(), w.float(), b.float())
    torch.testing.assert_close(out.float().cpu(), expected, rtol=tol, atol=tol * 200**0.5)


@pytest.mark.parametrize("rows, block_m", [(40, 16), (40, 32), (70, 64), (70, None)])
def test_several_row_tiles(rows, block_m):
    """Batches past one row tile: each weight band's programs cover every tile,
    the last one ragged."""
    gen = torch.Generator().manual_seed(rows + (block_m or 0))
    x = torch.randn(rows, 96, generator=gen)
    w = torch.randn(50, 96, generator=gen)
    b = torch.randn(50, generator=gen)
    config = GemvConfig(32, 32, block_m=block_m) if block_m else None  # None: config_for
    out = skinny_linear(x.to(DEVICE), w.to(DEVICE), b.to(DEVICE), config)
    torch.testing.assert_close(out.cpu(), F.linear(x, w, b), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows, split_k", [(1, 2), (3, 3), (40, 4)])
def test_split_k(rows, split_k, dtype):
    """Programs sharing an output tile's K: the last to arrive sums the partials and
    resets its count, so a second launch (a graph replay) is right too."""
    from mii.ops import triton_arrivals

    gen = torch.Generator().manual_seed(rows * split_k)
    x = torch.randn(rows, 200, generator=gen).to(dtype)
    w = torch.randn(70, 200, generator=gen).to(dtype)
    b = torch.randn(70, generator=gen).to(dtype)
    config = GemvConfig(32, 32, block_m=16, split_k=split_k)
    expected = F.linear(x.float(), w.float(), b.float())
    tol = 1e-4 if dtype == torch.float32 else 5e-2
    for _ in range(2):
        out = skinny_linear(x.to(DEVICE), w.to(DEVICE), b.to(DEVICE), config)
        torch.testing.assert_close(out.float().cpu(), expected, rtol=tol, atol=tol * 200**0.5)
    assert int(triton_arrivals._counts[out.device].count_nonzero()) == 0  # all counts reset


def test_split_k_rule_of_the_default_tile():
    """DEFAULT_CONFIG's automatic split-K (explicit launches; the engine's narrow
    weights take 32-row bands, ``bf16_config_for``): 4096 output rows make 64 bands
    of 64, too few programs for the GPU, so a long K is split (down_proj, 2 x 5504
    columns); o_proj's 4096 columns and wide weights are not."""
    from mii.ops.triton_gemv_launch import DEFAULT_CONFIG, split_k_for

    cpu = torch.device("cpu")  # plans for an H100's 132 multiprocessors
    assert split_k_for(DEFAULT_CONFIG, 4096 // 64, 4096, cpu) == 1
    assert split_k_for(DEFAULT_CONFIG, 4096 // 64, 11008, cpu) == 2
    assert split_k_for(DEFAULT_CONFIG, 4096 // 64, 65536, cpu) == 4  # two programs per SM
    assert split_k_for(DEFAULT_CONFIG, 12288 // 64, 11008, cpu) == 1  # 192 bands fill it
    assert split_k_for(DEFAULT_CONFIG, 1, 8192, cpu) == 2  # each split >= 4096 columns
    gen = torch.Generator().manual_seed(9)
    x, w = torch.randn(2, 8192, generator=gen), torch.randn(128, 8192, generator=gen)
    out = skinny_linear(x.to(DEVICE), w.to(DEVICE), config=DEFAULT_CONFIG)  # K split 2 ways
    torch.testing.assert_close(out.cpu(), F.linear(x, w), rtol=1e-4, atol=2e-3)


def test_launch_by_weight_shape(monkeypatch):
    """``bf16_config_for`` on an H200's 132 multiprocessors, Llama-2-7B's projections
    at batch 1: 32-row bands where 64-row ones are fewer than two per multiprocessor
    (the H200 sweep's best, docs/performance.md), the default elsewhere."""
    import mii.ops.triton_gemv_launch as gemv

    monkeypatch.setenv("MII_GEMV_ONE_ROW", "tensor")  # the tensor-core launches (batch 1: cores)

    monkeypatch.setattr(gemv.triton_limits, "multiprocessors", lambda device: 132)
    cpu = torch.device("cpu")
    assert gemv.bf16_config_for(1, 12288, cpu) == gemv.NARROW_MANY_BANDS_CONFIG  # qkv
    assert gemv.bf16_config_for(16, 4096, cpu) == gemv.NARROW_CONFIG  # o, down
    assert gemv.bf16_config_for(1, 22016, cpu) == gemv.DEFAULT_CONFIG  # gate_up
    assert gemv.bf16_config_for(1, 32000, cpu) == gemv.DEFAULT_CONFIG  # lm_head
    assert gemv.bf16_config_for(MAX_ROWS + 1, 4096, cpu) == gemv.WIDE_CONFIG
    assert gemv.split_k_for(gemv.NARROW_CONFIG, 4096 // 32, 11008, cpu) == 1  # never split


@pytest.mark.parametrize("n", [70, 300])
def test_narrow_launches_on_ragged_shapes(monkeypatch, n):
    """The 32-row launches (both slice widths) on N and K off their tiles."""
    import mii.ops.triton_gemv_launch as gemv

    monkeypatch.setattr(gemv.triton_limits, "multiprocessors", lambda device: 4)
    gen = torch.Generator().manual_seed(n)
    x, w = torch.randn(3, 520, generator=gen), torch.randn(n, 520, generator=gen)
    expected_config = gemv.NARROW_CONFIG if n == 70 else gemv.NARROW_MANY_BANDS_CONFIG
    assert gemv.bf16_config_for(3, n, torch.device(DEVICE)) == expected_config
    out = skinny_linear(x.to(DEVICE), w.to(DEVICE))
    torch.testing.assert_close(out.cpu(), F.linear(x, w), rtol=1e-4, atol=2e-3)


def test_rows_of_a_wider_tensor():
    """x may be a column slice of a wider activation (row stride != K)."""
    wide = torch.randn(2, 160)
    w = torch.randn(48, 128)
    out = skinny_linear(wide[:, 16:144].to(DEVICE), w.to(DEVICE), None, GemvConfig(16, 32))
    torch.testing.assert_close(out.cpu(), F.linear(wide[:, 16:144], w), rtol=1e-4, atol=1e-4)


def test_bad_shapes_name_the_problem():
    with pytest.raises(ValueError, match="weight"):
        skinny_linear(torch.zeros(2, 8), torch.zeros(8, 4).t())
    with pytest.raises(ValueError, match="contiguous bias of 4"):
        skinny_linear(torch.zeros(2, 8), torch.zeros(4, 8), torch.zeros(8)[::2])


def test_linear_keeps_f_linear_for_operands_the_kernel_cannot_read(monkeypatch):
    from mii.ops import dispatch
    from mii.ops.dispatch import skinny_linear_enabled

    monkeypatch.setenv("MII_GEMV", "triton")
    # CPU operands: as if interpreted (a GPU machine does not set TRITON_INTERPRET, and
    # forcing the kernel on the CPU without it raises: test_kernel_choice)
    monkeypatch.setattr(dispatch, "INTERPRETED", True)
    x, w = torch.zeros(2, 8), torch.zeros(4, 8)
    assert skinny_linear_enabled(x, w, torch.zeros(4))
    assert not skinny_linear_enabled(x, w, torch.zeros(8)[::2])  # strided bias
    assert not skinny_linear_enabled(x, w, torch.zeros(4, dtype=torch.float64))
    assert not skinny_linear_enabled(x, w.to(torch.bfloat16))  # mixed dtypes
    assert not skinny_linear_enabled(torch.zeros(17, 8), w)  # a prompt-sized batch


def test_linear_takes_the_kernel_for_decode_sized_batches(monkeypatch):
    import mii.ops.triton_gemv as kernels
    from mii.models.layers import linear

    rows_seen = []
    original = kernels.skinny_linear
    monkeypatch.setattr(
        kernels, "skinny_linear", lambda x, *a: rows_seen.append(x.shape[0]) or original(x, *a)
    )
    monkeypatch.setenv("MII_GEMV", "triton")
    w, b = torch.randn(24, 40).to(DEVICE), torch.randn(24).to(DEVICE)
    for rows in (1, MAX_ROWS, MAX_ROWS + 1):
        x = torch.randn(rows, 40).to(DEVICE)
        torch.testing.assert_close(linear(x, w, b), F.linear(x, w, b), rtol=1e-4, atol=1e-4)
    assert rows_seen == [1, MAX_ROWS]  # a prompt-sized batch stays with F.linear
    monkeypatch.setenv("MII_GEMV", "torch")
    linear(torch.randn(1, 40).to(DEVICE), w, b)
    assert rows_seen == [1, MAX_ROWS]


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU run of the interpreted kernel")
@pytest.mark.parametrize("split", [False, True], ids=["whole-k", "split-k"])
def test_engine_with_skinny_linear_matches_hf(checkpoints, tokenizer, monkeypatch, split):
    """A whole model whose decode steps (and short chunks) go through the kernel,
    as CUDA runs by default; chunked prompts and preemption; with split-K forced
    onto the tiny model's short rows too."""
    import mii.ops.triton_gemv as gemv
    import mii.ops.triton_gemv_launch as launch

    monkeypatch.setenv("MII_GEMV", "triton")
    splits_seen = []
    if split:
        monkeypatch.setattr(launch, "MIN_K_PER_SPLIT", 16)
        for name in ("DEFAULT_CONFIG", "NARROW_CONFIG", "NARROW_MANY_BANDS_CONFIG"):
            monkeypatch.setattr(launch, name, GemvConfig(32, 32, num_stages=2))
        original = gemv.split_k_for
        monkeypatch.setattr(
            gemv, "split_k_for", lambda *a: splits_seen.append(original(*a)) or splits_seen[-1]
        )
    path, hf_model = checkpoints("llama")
    if split:
        # Interpreted split-K launches cost the most programs: fewer, larger passes
        # (chunked prompts, decode steps of up to four rows) and fewer new tokens;
        # preemption through the kernel is the whole-K run's job.
        assert_matches_hf(path, hf_model, tokenizer, new_tokens=10, token_budget=12, max_num_seqs=4)
        assert max(splits_seen) > 1
    else:
        options = dict(TIGHT_OPTIONS, num_kv_blocks=20)  # preempts within 12 new tokens
        assert_matches_hf(
            path, hf_model, tokenizer, new_tokens=12, expect_preemption=True, **options
        )
        assert not splits_seen
