"""The one-launch per-token float8 quantization (``ops.triton_quant``) against the
torch version ``fp8_linear.quantize_per_token``: the same float8 values and
scales (CPU under TRITON_INTERPRET=1, conftest; CUDA when present). Compared as
numbers: the interpreter's float8 cast writes -0 as +0."""

from __future__ import annotations

import pytest
import torch

from mii.ops.fp8_linear import quantize_per_token
from mii.ops.triton_quant import quantize_groups_fp8, quantize_per_token_fp8
from test_triton_kernels import DEVICE


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("rows, k", [(1, 64), (5, 2500), (3, 1024)])
def test_equals_the_torch_quantization(rows, k, dtype):
    gen = torch.Generator().manual_seed(rows * k)
    # Rows of very different magnitudes, one all-zero row, one outlier.
    x = torch.randn(rows, k, generator=gen) * 10 ** torch.randint(-3, 3, (rows, 1), generator=gen)
    x[0, k // 2] = 1e3
    if rows > 1:
        x[-1] = 0.0
    x = x.to(dtype)
    xq, scale = quantize_per_token_fp8(x.to(DEVICE))
    want_q, want_scale = quantize_per_token(x)
    assert xq.dtype == torch.float8_e4m3fn and scale.shape == (rows, 1)
    assert torch.equal(scale.cpu(), want_scale)
    assert torch.equal(xq.cpu().float(), want_q.float())


def test_strided_rows_and_bad_input():
    x = torch.randn(4, 96)
    wide = torch.zeros(4, 128)
    wide[:, :96] = x  # rows 128 apart: a view whose stride is not its width
    xq, scale = quantize_per_token_fp8(wide[:, :96].to(DEVICE))
    want_q, want_scale = quantize_per_token(x)
    assert torch.equal(xq.cpu().float(), want_q.float())
    assert torch.equal(scale.cpu(), want_scale)
    with pytest.raises(ValueError, match="contiguous rows"):
        quantize_per_token_fp8(x.t())
    empty_q, empty_scale = quantize_per_token_fp8(torch.zeros(0, 32, device=DEVICE))
    assert empty_q.shape == (0, 32) and empty_scale.shape == (0, 1)


@pytest.mark.parametrize("rows, k, group", [(1, 256, 64), (3, 200, 64), (2, 1100, 256)])
def test_groups_equal_the_torch_quantization_of_each_slice(rows, k, group):
    """Each ``group`` columns of a row quantized as torch quantizes a token (the last
    group ragged); one group all zeros keeps scale 1."""
    gen = torch.Generator().manual_seed(rows + k)
    x = (torch.randn(rows, k, generator=gen) * 3).to(torch.bfloat16)
    x[0, :group] = 0.0
    xq, scales = quantize_groups_fp8(x.to(DEVICE), group)
    assert xq.shape == (rows, k) and scales.shape == (rows, -(-k // group))
    for g, k0 in enumerate(range(0, k, group)):
        want_q, want_scale = quantize_per_token(x[:, k0 : k0 + group])
        assert torch.equal(scales[:, g : g + 1].cpu(), want_scale)
        assert torch.equal(xq[:, k0 : k0 + group].cpu().float(), want_q.float())
    assert torch.equal(scales[0, 0].cpu(), torch.tensor(1.0))
    with pytest.raises(ValueError, match="power-of-two group"):
        quantize_groups_fp8(x, 48)


def test_tiny_rows_stay_finite():
    """A row whose largest value is tiny (448 / amax would overflow float32) is
    quantized as if its amax were 1e-30: finite values and scales, no 0 * inf."""
    x = torch.zeros(2, 64)
    x[0, 3] = 1e-37
    x[1] = 1e-38
    xq, scale = quantize_per_token_fp8(x.to(DEVICE))
    want_q, want_scale = quantize_per_token(x)
    assert torch.isfinite(want_q.float()).all() and torch.isfinite(want_scale).all()
    assert torch.equal(scale.cpu(), want_scale)
    assert torch.equal(xq.cpu().float(), want_q.float())
