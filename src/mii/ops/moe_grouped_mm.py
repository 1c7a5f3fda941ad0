"""The expert MLP of a large MoE pass through PyTorch's grouped GEMM.

``torch._grouped_mm`` multiplies the rows of each expert's group by that expert's
weight in one launch (CUTLASS on Hopper; a loop on the CPU). It is the matmul
path transformers' own MoE layers take. For prompt-sized passes it beats the
grouped Triton kernel (``ops/triton_moe.py``): one Mixtral-8x7B layer on an H200
(``benchmarks/moe_fp8.py --grouped-mm``, 2026-12-03, bf16) took 5.24 ms at 4,096
tokens (551 TFLOP/s) against the Triton kernel's 6.48 ms (445), 1.67 vs 1.76 ms at
1,024 tokens, but 1.05 ms vs 0.72 at 128 (so not for decode batches). By default
(``MII_MOE_PROMPT_GEMM=auto``) CUDA passes of at least ``GROUPED_MM_MIN_PAIRS``
(token, expert) pairs come here where ``grouped_mm_applies``; ``triton`` keeps the
Triton kernel, ``grouped_mm`` takes this path on the CPU too (tests).

Everything stays on the device (a stable sort by expert, group ends by binary
search): no host sync, like the Triton path. 16-bit experts only: float8 ones
keep the Triton kernel where it reads them as they are (sm_89+); where it does not
(``MII_FP8_KERNELS=off``) they are dequantized for the pass first, as for that
kernel, and come here like bfloat16 ones.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# Fewest (token, expert) pairs a pass needs to take this path (1,024 Mixtral
# tokens): decode batches stay with the Triton kernel, which reads each expert's
# weights at ~90 % of the copy bandwidth.
GROUPED_MM_MIN_PAIRS = 2048


def grouped_mm_applies(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """Whether ``torch._grouped_mm`` takes these operands here: a torch that has it,
    16-bit (or, on the CPU, float32) experts, bfloat16 only on CUDA (sm_90+, its
    CUTLASS kernels; not ROCm, not measured there), every row 16-byte aligned (TMA)."""
    if not hasattr(torch, "_grouped_mm") or w13.dtype != x.dtype or w2.dtype != x.dtype:
        return False
    if x.device.type == "cuda":
        if torch.version.hip is not None:  # ROCm reports gfx versions as capabilities
            return False
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (9, 0):
            return False
    elif x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    aligned = 16 // x.element_size()
    return all(n % aligned == 0 for n in (w13.shape[1], w13.shape[2], w2.shape[1], w2.shape[2]))


def moe_mlp_grouped_mm(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    weights: torch.Tensor,
    experts: torch.Tensor,
    act: Callable[[torch.Tensor], torch.Tensor],
    fused_activation: str | None = None,
) -> torch.Tensor:
    """x [T, H], w13 [E, 2I, H], w2 [E, H, I], routing weights/experts [T, k] -> [T, H],
    the same function as ``ops.triton_moe.moe_grouped_mlp`` on 16-bit experts:
    ``sum_k weights[t, k] * down_e(act(gate_e(x_t)) * up_e(x_t))``. Each expert's
    output is rounded to x's dtype before its routing weight scales it (as
    transformers does); the k outputs are summed in the weights' dtype."""
    tokens, top_k = experts.shape
    num_experts = w13.shape[0]
    flat = experts.reshape(-1)
    # pairs grouped by expert, each group in token order
    order = torch.argsort(flat, stable=True)
    group_ends = torch.searchsorted(
        flat[order],
        torch.arange(num_experts, device=x.device, dtype=flat.dtype),
        right=True,
        out_int32=True,
    )
    rows = x.index_select(0, order // top_k)  # [P, H], by expert
    hidden = torch._grouped_mm(rows, w13.transpose(1, 2), offs=group_ends)  # [P, 2I]
    if fused_activation is not None:
        from mii.ops.fused_elementwise import act_and_mul

        inner = act_and_mul(hidden, fused_activation)
    else:
        gate, up = hidden.chunk(2, dim=-1)
        inner = (act(gate) * up).contiguous()
    down = torch._grouped_mm(inner, w2.transpose(1, 2), offs=group_ends)  # [P, H]
    per_pair = torch.empty_like(down).index_copy_(0, order, down)  # back to (token, k) order
    combined = (per_pair.view(tokens, top_k, w2.shape[1]) * weights.unsqueeze(-1)).sum(dim=1)
    return combined.to(x.dtype)
