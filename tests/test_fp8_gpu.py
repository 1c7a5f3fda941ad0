"""FP8 weights on a CUDA device (skipped without one): the ``torch._scaled_mm``
path (per-token activation scales, per-channel weight scales) against the
reference path (dequantize, then a 16-bit matmul), op by op and end to end with
CUDA graphs, async scheduling, the fp8 KV cache and MoE experts."""

from __future__ import annotations

import pytest
import torch

import mii
import mii.ops.fp8_linear as fp8_ops
from helpers import PROMPTS
from mii.ops.fp8_linear import (
    fp8_linear,
    fp8_linear_reference,
    quantize_per_token,
    quantize_rows,
    scaled_mm_enabled,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _fp8_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


needs_fp8_cores = pytest.mark.skipif(not _fp8_gpu(), reason="needs FP8 tensor cores (sm_89+)")


@needs_fp8_cores
@pytest.mark.parametrize("m, k, n", [(1, 4096, 4096), (7, 4096, 11008), (300, 128, 96)])
def test_scaled_mm_equals_its_float32_emulation_and_is_near_the_reference(m, k, n):
    torch.manual_seed(0)
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    wq, scale = quantize_rows(torch.randn(n, k, device="cuda") * 0.02)
    assert scaled_mm_enabled(x, wq)
    out = fp8_linear(x, wq, scale)
    assert out.dtype == torch.bfloat16 and out.shape == (m, n)
    # The same float8 operands multiplied in float32: only accumulation and the
    # bfloat16 output differ.
    xq, x_scale = quantize_per_token(x)
    emulated = (xq.float() * x_scale) @ (wq.float() * scale[:, None]).T
    torch.testing.assert_close(
        out.float(), emulated, rtol=2e-2, atol=2e-2 * emulated.abs().mean().item()
    )
    # Against the reference (activations not quantized): e4m3's 3 mantissa bits.
    reference = fp8_linear_reference(x, wq, scale).float()
    rel = (out.float() - reference).norm() / reference.norm()
    assert rel < 0.05, rel


@needs_fp8_cores
def test_bias_and_non_bf16_activations():
    x = torch.randn(5, 64, device="cuda", dtype=torch.bfloat16)
    wq, scale = quantize_rows(torch.randn(32, 64, device="cuda"))
    bias = torch.randn(32, device="cuda", dtype=torch.bfloat16)
    out = fp8_linear(x, wq, scale, bias)
    ref = fp8_linear_reference(x, wq, scale, bias)
    assert ((out - ref).float().norm() / ref.float().norm()) < 0.05
    # float16 / float32 activations and sizes off the 16 grid take the reference.
    assert not scaled_mm_enabled(x.half(), wq) and not scaled_mm_enabled(x.float(), wq)
    assert not scaled_mm_enabled(x[:, :40], quantize_rows(torch.randn(32, 40, device="cuda"))[0])


def _generate(path, **options) -> list[list[int]]:
    with mii.pipeline(
        str(path), device="cuda", dtype="bfloat16", quantization="fp8", **options
    ) as pipe:
        return [r.token_ids for r in pipe(PROMPTS, do_sample=False, max_new_tokens=16)]


@needs_fp8_cores
@pytest.mark.parametrize(
    "options",
    [{}, {"kv_cache_dtype": "fp8"}, {"cuda_graphs": False, "async_scheduling": False}],
    ids=["graphs-async", "fp8-kv", "eager"],
)
def test_scaled_mm_path_and_reference_path_agree_end_to_end(checkpoints, monkeypatch, options):
    """bf16 activations: the first tokens of the two paths agree (activation
    quantization may flip a later near-tie)."""
    path, _ = checkpoints("llama")
    fast = _generate(path, **options)
    with monkeypatch.context() as patch:
        patch.setattr(fp8_ops, "scaled_mm_enabled", lambda x, w: False)
        # Decode batches would take the float8 skinny kernel: the reference has none.
        patch.setattr(fp8_ops, "skinny_fp8_linear_enabled", lambda *a: False)
        reference = _generate(path, **options)
    assert all(a[:4] == b[:4] for a, b in zip(fast, reference)), (fast, reference)


@needs_fp8_cores
def test_scaled_mm_runs_in_the_model(checkpoints, monkeypatch):
    path, _ = checkpoints("llama")
    # Without the float8 skinny kernel: its prompt's 6 rows would go there, not here.
    monkeypatch.setenv("MII_GEMV", "torch")
    calls = []
    original = fp8_ops.fp8_linear_scaled_mm
    monkeypatch.setattr(fp8_ops, "fp8_linear_scaled_mm", lambda *a: calls.append(1) or original(*a))
    with mii.pipeline(
        str(path), device="cuda", dtype="bfloat16", quantization="fp8", cuda_graphs=False
    ) as pipe:
        pipe(PROMPTS[:1], do_sample=False, max_new_tokens=2)
    assert calls  # the layers went through torch._scaled_mm


def test_fp8_moe_grouped_kernel_and_torch_path_agree(monkeypatch, tmp_path, tokenizer):
    """Float8 experts on CUDA: read as float8 by the grouped Triton kernel (CUDA
    graphs on) and the per-expert torch path give the same first tokens."""
    from test_family_mixtral import hf_model_from_config, mixtral_config

    model = hf_model_from_config(mixtral_config(tokenizer))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    outputs = {}
    for moe in ("triton", "torch"):
        monkeypatch.setenv("MII_MOE", moe)
        with mii.pipeline(
            str(tmp_path), device="cuda", dtype="bfloat16", quantization="fp8"
        ) as pipe:
            outputs[moe] = [r.token_ids for r in pipe(PROMPTS, do_sample=False, max_new_tokens=12)]
    assert all(a[:4] == b[:4] for a, b in zip(outputs["triton"], outputs["torch"]))
