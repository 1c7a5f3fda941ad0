"""The token budget a CUDA engine takes when none is given, from the device and the model.

4,096 tokens per pass is where the H200 runs a 7B model's prompt GEMMs at full rate
(W1: 2.12x the compute floor, against 3.01x at 1,024; docs/performance.md). But a
pass also holds back every sequence decoding beside the prompt it carries: past
~0.2 s per pass those sequences stream under 5 tokens/s, and FastGen's effective
throughput stops counting a request under 4. So the default budget is 4,096
tokens, halved (down to 512) while a pass of that many tokens would take longer
than ``MAX_PASS_SECONDS`` at this device's matmul rate for this model (this
rank's shard under tensor parallelism). On an H200 that keeps 4,096 for
Llama-2-7B (~71 ms), Llama-3-8B (~84 ms) and Mixtral-8x7B (~136 ms, active
experts) and gives a Llama-3-70B shape 2,048 in FP8 (~185 ms; ~370 ms at 4,096).
"""

from __future__ import annotations

import torch
from torch import nn

from mii.scheduling_options import SCHEDULING_DEFAULTS

LARGEST_BUDGET = SCHEDULING_DEFAULTS["cuda"][0]
SMALLEST_BUDGET = 512
MAX_PASS_SECONDS = 0.2

# Dense bf16 tensor-core TFLOP/s per SM that large GEMMs sustain, by compute
# capability. Hopper's is measured (H200: 780 TFLOP/s on 132 SMs, benchmarks'
# roofline); the others are datasheet dense rates x the same 0.79 (leads, not
# measured here). Unknown devices take the lowest, which errs toward shorter passes.
SUSTAINED_TFLOPS_PER_SM = {
    (10, 0): 12.0,  # B200: 2,250 / 148 SMs
    (9, 0): 5.9,  # H100, H200
    (8, 9): 1.6,  # L4 (121 / 58), L40S (362 / 142)
    (8, 6): 1.3,  # A10 (125 / 72)
    (8, 0): 2.3,  # A100 (312 / 108)
}
FALLBACK_TFLOPS_PER_SM = 1.0


def matmul_flops_per_token(model: nn.Module) -> float:
    """About 2 x the weights one token is multiplied by: every matrix parameter once
    (embedding tables included: a few percent over), a mixture of experts' experts
    at ``top_k / num_experts`` of their size."""
    from mii.models.moe import SparseMoE

    matrices = {id(p): p.numel() for p in model.parameters() if p.dim() >= 2}
    weights = float(sum(matrices.values()))
    for module in model.modules():
        if isinstance(module, SparseMoE):
            experts = module.w13.numel() + module.w2.numel()
            weights -= experts * (1 - module.top_k / module.num_experts)
    return 2.0 * weights


def sustained_tflops(device: torch.device, fp8_weights: bool = False) -> float:
    """This GPU's estimated sustained bf16 matmul rate (``SUSTAINED_TFLOPS_PER_SM``),
    doubled for float8 weights on GPUs with float8 tensor cores (sm_89+)."""
    props = torch.cuda.get_device_properties(device)
    capability = (props.major, props.minor)
    rate = SUSTAINED_TFLOPS_PER_SM.get(capability, FALLBACK_TFLOPS_PER_SM)
    rate *= props.multi_processor_count
    return 2 * rate if fp8_weights and capability >= (8, 9) else rate


def token_budget_for(flops_per_token: float, tflops: float) -> int:
    """The largest power-of-two budget from LARGEST_BUDGET down to SMALLEST_BUDGET
    whose pass takes at most MAX_PASS_SECONDS at ``tflops``."""
    budget = LARGEST_BUDGET
    while budget > SMALLEST_BUDGET and budget * flops_per_token > MAX_PASS_SECONDS * tflops * 1e12:
        budget //= 2
    return budget


def default_token_budget(model: nn.Module, device: torch.device) -> int:
    """The CUDA engine's token budget for ``model`` (this rank's shard) on ``device``."""
    fp8 = any(p.dtype == torch.float8_e4m3fn for p in model.parameters())
    return token_budget_for(matmul_flops_per_token(model), sustained_tflops(device, fp8))
