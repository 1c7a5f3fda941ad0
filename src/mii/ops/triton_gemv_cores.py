"""The skinny linear kernel's CUDA-core product (``GemvConfig.cores``): at one row of x
(batch 1, ``MII_GEMV_ONE_ROW=cores``, the default) each program multiplies its band
of weights by x in float32 on the CUDA cores rather than on the tensor cores.

A tensor-core product at batch 1 spends 15 of its 16 rows on padding, and on float8
weights it multiplies float8 by float8, so x must first be quantized to e4m3 (a
launch of its own where no norm wrote the copy). Here each weight is converted
where it is loaded and multiplied by x's exact value. On an H100 (docs/performance.md,
twenty-fourth session) this read Llama-2-7B's float8 weights at 73-85 % of copy
bandwidth against 52-80 % and its bf16 weights at 90-99 % against 83-96 %.
"""

from __future__ import annotations

import triton
import triton.language as tl

from mii.ops.triton_fp8 import dequantize_e4m3


@triton.jit
def cores_partial_sums(
    X, W, offs_m, offs_n, offs_k, m_mask, n_mask, k_begin, k_stop, K,
    stride_xm, stride_wn,
    W_SCALED: tl.constexpr, DEQUANT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
    LOOP_STAGES: tl.constexpr,
):  # fmt: skip
    """The sums of BLOCK_M rows of x times this program's BLOCK_N rows of W over
    [k_begin, k_stop), [BLOCK_N, BLOCK_M] float32, on the CUDA cores (exact float32
    products: float8 and 16-bit weights convert exactly). Each lane of the
    [BLOCK_N, (BLOCK_M,) BLOCK_K] tile keeps its own sum, added across K once at
    the end: the loop never reduces across threads. LOOP_STAGES: its software
    pipeline (its loads feed no tensor-core product, so Triton pipelines them only
    when asked)."""
    if BLOCK_M == 1:
        wide = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    else:
        wide3 = tl.zeros([BLOCK_N, BLOCK_M, BLOCK_K], tl.float32)
    for k0 in tl.range(k_begin, k_stop, BLOCK_K, num_stages=LOOP_STAGES):
        k_mask = (k0 + offs_k) < K
        w = tl.load(
            W + offs_n[:, None] * stride_wn + (k0 + offs_k)[None, :],
            mask=n_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        x = tl.load(
            X + offs_m[:, None] * stride_xm + (k0 + offs_k)[None, :],
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        if W_SCALED:  # noqa: SIM108 (a constexpr branch: only one side is compiled)
            w32 = dequantize_e4m3(w, tl.float32, DEQUANT)
        else:
            w32 = w.to(tl.float32)
        if BLOCK_M == 1:
            wide += w32 * x.to(tl.float32)
        else:  # each weight converted once, multiplied by every row
            wide3 += w32[:, None, :] * x.to(tl.float32)[None, :, :]
    if BLOCK_M == 1:
        return tl.sum(wide, axis=1)[:, None]
    else:
        return tl.sum(wide3, axis=2)
