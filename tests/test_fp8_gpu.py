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
def test_scaled_mm_equals_its_float32_emulation_and_is_near_the_reference(m, k, n, monkeypatch):
    # 1 and 7 rows would take the float8 skinny kernel (its own tests are in
    # tests/test_fp8_kernels_gpu.py): this test is of torch._scaled_mm.
    monkeypatch.setattr(fp8_ops, "skinny_fp8_linear_enabled", lambda *a: False)
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


# How the end-to-end tests judge a fast path against the reference: per-token
# activation quantization (e4m3, 3 mantissa bits) moves a tiny random model's
# logits by a few hundredths of a nat, enough to flip its near ties, so equal
# greedy tokens is the wrong test. Instead the reference path scores the fast
# path's greedy continuation teacher-forced: at each generated position, how far
# the chosen token's reference log-prob lies below the reference's best (0 where
# they agree). Measured on CPU with the tensor-core math emulated in float32 and
# bfloat16 (activations quantized per token, float8 weights, row scales), 16
# tokens x 5 prompts: mean gap 0.03-0.04 nats, max 0.41-0.75, a fifth of the
# positions off the reference's argmax. A wrong kernel (channel scales reversed,
# the bug class a layout mistake makes): mean 2.1 nats, max 6.7-6.8, well above
# both bounds. The bounds sit between the two, and each test checks that
# its own broken control fails them.
MEAN_GAP_BOUND = 0.25
MAX_GAP_BOUND = 2.0


def _greedy(path, **options) -> list:
    with mii.pipeline(
        str(path), device="cuda", dtype="bfloat16", quantization="fp8", **options
    ) as pipe:
        return pipe(PROMPTS, do_sample=False, max_new_tokens=16, prompt_logprobs=1)


def _reference_gaps(path, answers, **options) -> torch.Tensor:
    """Per generated token: the reference's best log-prob minus that token's."""
    continuations = [a.prompt_token_ids + a.token_ids for a in answers]
    with mii.pipeline(
        str(path), device="cuda", dtype="bfloat16", quantization="fp8", **options
    ) as pipe:
        scored = pipe(continuations, do_sample=False, max_new_tokens=1, prompt_logprobs=1)
    gaps = []
    for answer, score in zip(answers, scored):
        for entry in score.prompt_logprobs[len(answer.prompt_token_ids) :]:
            gaps.append(entry.top[0][1] - entry.logprob)
    return torch.tensor(gaps)


def _within_noise(gaps: torch.Tensor) -> bool:
    return gaps.mean().item() <= MEAN_GAP_BOUND and gaps.max().item() <= MAX_GAP_BOUND


def _shuffled_channel_scales(kernel):
    """``kernel`` with each weight's output-channel scales in reverse order: a broken
    path. Device work only (a host-made permutation would be a copy from the host,
    which a CUDA graph being captured refuses)."""

    def broken(x, wq, scale, bias=None):
        return kernel(x, wq, scale.flip(0), bias)

    return broken


@needs_fp8_cores
@pytest.mark.parametrize(
    "options",
    [{}, {"kv_cache_dtype": "fp8"}, {"cuda_graphs": False, "async_scheduling": False}],
    ids=["graphs-async", "fp8-kv", "eager"],
)
def test_scaled_mm_path_stays_within_quantization_noise_of_the_reference(
    checkpoints, monkeypatch, options
):
    """The FP8 tensor-core path's greedy continuations, scored by the reference
    path (dequantized weights, activations not quantized), stay within activation
    quantization's noise; the same path with reversed channel scales does not."""
    path, _ = checkpoints("llama")
    # Decode batches would take the float8 skinny kernel (tests/test_fp8_kernels_gpu.py
    # checks it): this test is of torch._scaled_mm, in prefill and decode alike.
    monkeypatch.setattr(fp8_ops, "skinny_fp8_linear_enabled", lambda *a: False)

    def reference_gaps(answers):
        with monkeypatch.context() as patch:
            patch.setattr(fp8_ops, "scaled_mm_enabled", lambda x, w: False)
            return _reference_gaps(path, answers, **options)

    gaps = reference_gaps(_greedy(path, **options))
    assert _within_noise(gaps), (gaps.mean().item(), gaps.max().item())
    with monkeypatch.context() as patch:
        patch.setattr(
            fp8_ops, "fp8_linear_scaled_mm", _shuffled_channel_scales(fp8_ops.fp8_linear_scaled_mm)
        )
        broken = _greedy(path, **options)
    broken_gaps = reference_gaps(broken)
    assert not _within_noise(broken_gaps), (broken_gaps.mean().item(), broken_gaps.max().item())


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


def test_fp8_moe_grouped_kernel_stays_within_noise_of_the_torch_path(
    monkeypatch, tmp_path, tokenizer
):
    """Float8 experts on CUDA: the grouped Triton kernel's greedy continuations
    (experts read as float8, CUDA graphs on), scored by the per-expert torch
    path, stay within the noise bounds above (the two round differently in
    bfloat16, and per-token activation quantization amplifies that near ties)."""
    from test_family_mixtral import hf_model_from_config, mixtral_config

    model = hf_model_from_config(mixtral_config(tokenizer))
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    monkeypatch.setenv("MII_MOE", "triton")
    answers = _greedy(tmp_path)
    monkeypatch.setenv("MII_MOE", "torch")
    gaps = _reference_gaps(tmp_path, answers)
    assert _within_noise(gaps), (gaps.mean().item(), gaps.max().item())
