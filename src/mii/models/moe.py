"""Sparse mixture-of-experts feed-forward (Mixtral, Qwen2-MoE).

A router picks ``top_k`` of ``num_experts`` gated MLPs for every token; the
token's output is the routing-weighted sum of those experts' outputs.

Expert weights are stacked: ``w13`` [E, 2·I, H] holds each expert's gate rows
then up rows, ``w2`` [E, H, I] its down projection. Stacking keeps every
expert's matrices in one tensor, which is what a grouped GEMM kernel consumes
and what tensor parallelism splits: ``w13`` along I (each rank keeps its own
slice of both gate and up, like ``ColumnParallelLinear``), ``w2`` along its
input I (like ``RowParallelLinear``), with one all-reduce of the combined
output. The loader below already narrows to this rank's slice; at world size 1
that is the whole tensor. (Expert parallelism, whole experts per rank, would
instead split dim 0.)

The compute is grouped by expert, never a Python loop over tokens. On CUDA
(or with ``MII_MOE=triton``) it is ``ops.triton_moe.moe_grouped_mlp``: pairs
sorted by expert on the device and every expert's matmul in one grouped
Triton launch, with no host sync, so MoE models run in CUDA graphs too.
Passes of up to 256 (token, expert) pairs (decode batches) route in one launch:
softmax, top-k, renormalisation and that layout (``MII_MOE_ROUTING=auto``);
larger passes route with torch operations. On CUDA (sm_90+, bfloat16 experts)
the experts of large passes go through ``torch._grouped_mm`` instead
(``ops/moe_grouped_mm.py``; ``MII_MOE_PROMPT_GEMM``).
Float8 experts go into that kernel as they are (one byte per weight, scaled in
the kernel) where Triton reads float8 (``ops.dispatch.fp8_triton_supported``:
sm_89+, or the CPU interpreter); elsewhere they are dequantized first.
Elsewhere (or with ``MII_MOE=torch``) the torch path sorts the (token, expert)
pairs, runs one matmul per expert over all of its tokens and scatters the
weighted outputs back with ``index_add_``; it reads the group sizes on the host.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import mii.envs as envs
from mii.models.checkpoint_tensor import materialize
from mii.models.layers import activation
from mii.models.parallel import all_reduce, divide, tp_rank, tp_world_size
from mii.models.weight_quant import (
    channel_scales,
    copy_weight_rows,
    fp8_mode,
    fp8_parameter,
    row_scales,
    scale_parameter,
    scale_shards,
)
from mii.ops.dispatch import (
    FUSED_ACTIVATIONS,
    fp8_triton_supported,
    fused_kernels_enabled,
    triton_chosen,
)
from mii.ops.fp8_linear import dequantize_rows


def grouped_kernel_enabled(device: torch.device) -> bool:
    """Whether MoE layers use the grouped Triton kernel, as ``MII_MOE`` chooses
    (see ``ops.dispatch``: on CUDA by default)."""
    return triton_chosen(envs.MOE, device)


class ExpertShard(NamedTuple):
    """Shard id of one expert's part of a stacked parameter: (expert, "gate" | "up" | "down").

    A tuple, so ``ExpertShard(1, "up") == (1, "up")``; printed as ``expert1.up``
    so that a missing-weight message reads ``...mlp.w13#expert1.up``.
    """

    expert: int
    part: str

    def __str__(self) -> str:
        return f"expert{self.expert}.{self.part}"


# Per-expert checkpoint tensors: Mixtral's w1/w3/w2, Qwen2-MoE's gate/up/down_proj.
# (A pre-quantized checkpoint adds each one's ``weight_scale``: ``w13_scale``, ``w2_scale``.)
_PER_EXPERT = re.compile(
    r"^(?P<prefix>.+)\.experts\.(?P<e>\d+)\.(?P<proj>\w+)\.(?P<leaf>weight|weight_scale)$"
)
_PROJ_PART = {
    "w1": "gate",
    "w3": "up",
    "w2": "down",
    "gate_proj": "gate",
    "up_proj": "up",
    "down_proj": "down",
}
# Fused transformers-5 tensors: all experts stacked, gate then up concatenated.
_FUSED = re.compile(r"^(?P<prefix>.+)\.experts\.(?P<proj>gate_up_proj|down_proj)(?:\.weight)?$")


def map_expert_weight_name(hf_name: str) -> tuple[str, Any] | None:
    """Our (parameter name, shard id) for a checkpoint tensor of an expert, else None.

    ``<prefix>.experts.{e}.w1.weight`` -> (``<prefix>.w13``, (e, "gate")), and so on;
    ``<prefix>.experts.gate_up_proj`` [E, 2I, H] -> (``<prefix>.w13``, "packed").
    """
    match = _PER_EXPERT.match(hf_name)
    if match and match["proj"] in _PROJ_PART:
        part = _PROJ_PART[match["proj"]]
        leaf = ("w2" if part == "down" else "w13") + match["leaf"].removeprefix("weight")
        return f"{match['prefix']}.{leaf}", ExpertShard(int(match["e"]), part)
    match = _FUSED.match(hf_name)
    if match:
        leaf = "w13" if match["proj"] == "gate_up_proj" else "w2"
        return f"{match['prefix']}.{leaf}", "packed"
    return None


class SparseMoE(nn.Module):
    """Top-k routed experts: ``sum_k w_k · down_k(act(gate_k(x)) * up_k(x))``.

    ``renormalize``: divide the top-k softmax weights by their sum (Mixtral
    always; Qwen2-MoE when ``norm_topk_prob``). ``float32_combine``: scale the
    expert outputs by float32 weights (Mixtral) rather than by weights cast to
    the model dtype first (Qwen2-MoE), as transformers does for each.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        act: str = "silu",
        renormalize: bool = True,
        float32_combine: bool = True,
    ) -> None:
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"num_experts_per_tok ({top_k}) must be in 1..{num_experts}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.float32_combine = float32_combine
        self.full_intermediate_size = intermediate_size
        self.intermediate_size = divide(intermediate_size, tp_world_size(), "moe intermediate size")
        self.act = activation(act)
        self.act_name = act
        # The router is small and replicated on every rank.
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)
        # Stacked expert weights, this rank's slice of I (see the module docstring).
        w13_shape = (num_experts, 2 * self.intermediate_size, hidden_size)
        w2_shape = (num_experts, hidden_size, self.intermediate_size)
        # Float8 experts (models.weight_quant): a scale per output row of each expert;
        # w13's split with its rows, w2's whole on every rank (like RowParallelLinear).
        self.fp8 = fp8_mode()
        if self.fp8:
            self.w13, self.w2 = fp8_parameter(*w13_shape), fp8_parameter(*w2_shape)
            self.w13_scale = scale_parameter(*w13_shape[:2])
            self.w2_scale = scale_parameter(*w2_shape[:2])
        else:
            self.w13 = nn.Parameter(torch.empty(w13_shape))
            self.w2 = nn.Parameter(torch.empty(w2_shape))

    # -- loading ---------------------------------------------------------------

    # Per-expert tensors are only narrowed to this rank's slice of I, so they are
    # read lazily (packed all-expert tensors are read whole, see base.load_weights).
    reads_slices = True

    def weight_shards(self, name: str) -> list:
        parts = ("gate", "up") if name.startswith("w13") else ("down",)
        shards = [ExpertShard(e, p) for e in range(self.num_experts) for p in parts]
        return scale_shards(self.fp8, shards) if name.endswith("_scale") else shards

    def weight_loader(self, name: str, param: nn.Parameter, loaded: torch.Tensor, shard_id) -> None:
        """Copy one expert's [I, H] gate/up or [H, I] down matrix into its slice,
        or (``"packed"``) a fused [E, 2I, H] / [E, H, I] tensor of all experts."""
        size, full = self.intermediate_size, self.full_intermediate_size
        start = tp_rank() * size
        if shard_id == "packed":
            if loaded.dim() != 3 or loaded.shape[0] != self.num_experts:
                raise ValueError(
                    f"fused expert weight has shape {tuple(loaded.shape)}, expected "
                    f"{self.num_experts} stacked experts"
                )
            if name == "w13":
                gate, up = loaded.split([full, full], dim=1)
                for e in range(self.num_experts):
                    self.weight_loader(name, param, gate[e], ExpertShard(e, "gate"))
                    self.weight_loader(name, param, up[e], ExpertShard(e, "up"))
            else:
                for e in range(self.num_experts):
                    self.weight_loader(name, param, loaded[e], ExpertShard(e, "down"))
            return
        if not isinstance(shard_id, tuple) or len(shard_id) != 2:
            raise ValueError(f"expert weight {name!r} needs an (expert, part) shard id")
        expert, part = shard_id
        if not 0 <= expert < self.num_experts:
            raise ValueError(f"expert {expert} is out of range (num_experts={self.num_experts})")
        if name.endswith("_scale"):
            self._load_scale(name, param, loaded, expert, part)
            return
        hidden = param.shape[-1] if name == "w13" else param.shape[1]
        if name == "w13" and part in ("gate", "up"):
            if tuple(loaded.shape) != (full, hidden):
                raise ValueError(
                    f"expert {expert} {part} weight has shape {tuple(loaded.shape)}, "
                    f"expected {(full, hidden)}"
                )
            offset = 0 if part == "gate" else size
            dest, rows = param.data[expert, offset : offset + size], loaded.narrow(0, start, size)
            if self.fp8:
                scales = self.w13_scale.data[expert, offset : offset + size]
                copy_weight_rows(dest, scales, rows, self.fp8)
            else:
                dest.copy_(rows)
        elif name == "w2" and part == "down":
            if tuple(loaded.shape) != (hidden, full):
                raise ValueError(
                    f"expert {expert} down weight has shape {tuple(loaded.shape)}, "
                    f"expected {(hidden, full)}"
                )
            if self.fp8:  # scales of whole rows, as RowParallelLinear
                whole = materialize(loaded)
                rows, scale = whole.narrow(1, start, size), row_scales(whole, param.device)
                scales = self.w2_scale.data[expert]
                copy_weight_rows(param.data[expert], scales, rows, self.fp8, scale)
            else:
                param.data[expert].copy_(loaded.narrow(1, start, size))
        else:
            raise ValueError(f"shard {shard_id!r} does not belong to {name!r}")

    def _load_scale(
        self, name: str, param: nn.Parameter, loaded: torch.Tensor, expert: int, part: str
    ) -> None:
        """One expert's ``weight_scale`` (per tensor or per output channel) of a
        pre-quantized checkpoint into its rows of ``w13_scale`` / ``w2_scale``."""
        size = self.intermediate_size
        if name == "w13_scale" and part in ("gate", "up"):
            scales = channel_scales(loaded, self.full_intermediate_size)
            offset = 0 if part == "gate" else size
            mine = scales.narrow(0, tp_rank() * size, size)
            param.data[expert, offset : offset + size].copy_(mine)
        elif name == "w2_scale" and part == "down":
            param.data[expert].copy_(channel_scales(loaded, param.shape[1]))
        else:
            raise ValueError(f"shard {(expert, part)!r} does not belong to {name!r}")

    def expert_weights(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(w13, w2) in ``dtype``: as they are, or float8 ones dequantized (for a
        grouped kernel that cannot read float8 on this device)."""
        if not self.fp8:
            return self.w13, self.w2
        return (
            dequantize_rows(self.w13, self.w13_scale, dtype),
            dequantize_rows(self.w2, self.w2_scale, dtype),
        )

    # -- compute ---------------------------------------------------------------

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, H] -> (weights [T, k], experts [T, k]).

        As transformers: router logits in the model dtype, softmax and top-k in
        float32, optional renormalisation over the chosen k.
        """
        logits = self.gate(x)  # [T, E]
        probs = torch.softmax(logits.float(), dim=-1)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.renormalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if not self.float32_combine:
            weights = weights.to(x.dtype)
        return weights, experts

    def group_by_expert(
        self, experts: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
        """experts: [T, k] -> (order, tokens, counts): the flat (token, slot) pair
        indices sorted by expert (stable, so tokens ascend within an expert), the
        token index of each, and how many pairs each expert received."""
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=True)
        tokens = order // self.top_k
        # One host sync per layer: group sizes decide the slices below.
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        return order, tokens, counts

    def expert_forward(self, expert: int, x: torch.Tensor) -> torch.Tensor:
        """One expert's gated MLP on all of its tokens at once: [N, H] -> [N, H]."""
        if self.fp8:  # dequantize this expert only
            w13 = dequantize_rows(self.w13[expert], self.w13_scale[expert], x.dtype)
            w2 = dequantize_rows(self.w2[expert], self.w2_scale[expert], x.dtype)
        else:
            w13, w2 = self.w13[expert], self.w2[expert]
        gate, up = F.linear(x, w13).chunk(2, dim=-1)
        return F.linear(self.act(gate) * up, w2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, H] -> [T, H]."""
        if not grouped_kernel_enabled(x.device):
            return all_reduce(self.forward_torch(x, *self.route(x)))
        from mii.ops import triton_moe, triton_moe_layout

        fused = self.act_name in FUSED_ACTIVATIONS and fused_kernels_enabled(x.device)
        fused_activation = self.act_name if fused else None
        kernel_fp8 = self.fp8 and fp8_triton_supported(x.device)  # float8 read in the kernel
        if kernel_fp8:
            w13, w2 = self.w13, self.w2
            scales = {"w13_scale": self.w13_scale, "w2_scale": self.w2_scale}
        else:
            (w13, w2), scales = self.expert_weights(x.dtype), {}
        num_pairs = x.shape[0] * self.top_k
        if self._grouped_mm_pass(x, w13, w2, num_pairs):
            from mii.ops.moe_grouped_mm import moe_mlp_grouped_mm

            weights, experts = self.route(x)
            out = moe_mlp_grouped_mm(x, w13, w2, weights, experts, self.act, fused_activation)
            return all_reduce(out)
        tiles = triton_moe.default_tiles(num_pairs, fp8=kernel_fp8)
        down_tiles = triton_moe.default_down_tiles(num_pairs, fp8=kernel_fp8)
        if triton_moe_layout.fused_routing(envs.MOE_ROUTING.get(), num_pairs, self.num_experts):
            weights, experts, *layout = triton_moe_layout.route_and_align(
                self.gate(x), self.top_k, self.renormalize, tiles.block_m
            )
            if not self.float32_combine:
                weights = weights.to(x.dtype)
        else:
            (weights, experts), layout = self.route(x), None
        out = triton_moe.moe_grouped_mlp(
            x,
            w13,
            w2,
            weights,
            experts,
            self.act,
            tiles,
            fused_activation=fused_activation,
            layout=layout,
            down_tiles=down_tiles,
            **scales,
        )
        return all_reduce(out)

    def _grouped_mm_pass(
        self, x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, num_pairs: int
    ) -> bool:
        """Whether this pass's experts run through ``torch._grouped_mm``: a large
        pass, operands it takes, and ``MII_MOE_PROMPT_GEMM`` ``grouped_mm``, or
        ``auto`` (the default) on CUDA."""
        from mii.ops import moe_grouped_mm

        if num_pairs < moe_grouped_mm.GROUPED_MM_MIN_PAIRS:  # decode passes read no switch
            return False
        choice = envs.MOE_PROMPT_GEMM.get()
        if choice == "triton" or (choice == "auto" and x.device.type != "cuda"):
            return False
        return moe_grouped_mm.grouped_mm_applies(x, w13, w2)

    def forward_torch(
        self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor
    ) -> torch.Tensor:
        """The expert MLP with one torch matmul per expert (one host sync)."""
        order, tokens, counts = self.group_by_expert(experts)
        pair_weights = weights.reshape(-1)[order]
        out = torch.zeros_like(x)
        start = 0
        for expert, count in enumerate(counts):
            if count == 0:
                continue
            rows = slice(start, start + count)
            idx = tokens[rows]
            y = self.expert_forward(expert, x[idx]) * pair_weights[rows, None]
            out.index_add_(0, idx, y.to(out.dtype))
            start += count
        return out
