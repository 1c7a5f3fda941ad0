"""Mixture-of-experts Llama variants: Mixtral and Qwen2-MoE (Qwen1.5-MoE).

Both are the Llama decoder with the feed-forward replaced by ``SparseMoE``:

* Mixtral: every layer sparse (``block_sparse_moe.*`` in checkpoints), top-k
  weights always renormalised, Mistral's sliding window when the config sets one.
* Qwen2-MoE: q/k/v biases (``qkv_bias``); sparse layers add a shared expert
  scaled by ``sigmoid(shared_expert_gate(x))``; ``decoder_sparse_step`` and
  ``mlp_only_layers`` leave some layers with a dense MLP of ``intermediate_size``.

Expert tensors, per expert (``experts.{e}.w1``...) or fused
(``experts.gate_up_proj``), load into the stacked parameters of ``SparseMoE``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from mii.models.layers import GatedMLP
from mii.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaSpec
from mii.models.moe import SparseMoE, grouped_kernel_enabled, map_expert_weight_name


class _MoEWeightsMixin:
    """Expert tensors are named by regex (their expert index varies), ahead of
    the fragment renames of ``weight_map``."""

    @property
    def supports_cuda_graphs(self) -> bool:  # type: ignore[override]
        # The torch expert loop reads group sizes on the host, which a CUDA graph
        # cannot capture; the grouped Triton kernel does not.
        return grouped_kernel_enabled(next(self.parameters()).device)

    def map_weight_name(self, hf_name: str) -> tuple[str, Any]:
        renamed = hf_name.replace(".block_sparse_moe.", ".mlp.")
        expert = map_expert_weight_name(renamed)
        if expert is not None:
            return expert
        return super().map_weight_name(hf_name)


class MixtralForCausalLM(_MoEWeightsMixin, LlamaForCausalLM):
    """Mixtral 8x7B / 8x22B and other ``model_type: mixtral`` checkpoints."""

    weight_map = ((".block_sparse_moe.", ".mlp.", None), *LlamaForCausalLM.weight_map)

    def make_layers(self, spec: LlamaSpec, hf_config: dict[str, Any]) -> list[nn.Module]:
        # LlamaSpec reads sliding_window for every layer, as Mistral and Mixtral use it.
        return [
            LlamaDecoderLayer(spec, i, mlp=mixtral_moe(spec, hf_config))
            for i in range(spec.num_layers)
        ]


def mixtral_moe(spec: LlamaSpec, cfg: dict[str, Any]) -> SparseMoE:
    return SparseMoE(
        spec.hidden_size,
        spec.intermediate_size,
        num_experts=cfg.get("num_local_experts", 8),
        top_k=cfg.get("num_experts_per_tok", 2),
        act=spec.hidden_act,
        renormalize=True,
        float32_combine=True,
    )


class Qwen2MoeSparseBlock(SparseMoE):
    """Routed experts plus one always-on shared expert, gated per token."""

    def __init__(self, spec: LlamaSpec, cfg: dict[str, Any]) -> None:
        super().__init__(
            spec.hidden_size,
            cfg["moe_intermediate_size"],
            num_experts=cfg["num_experts"],
            top_k=cfg.get("num_experts_per_tok", 4),
            act=spec.hidden_act,
            renormalize=bool(cfg.get("norm_topk_prob", False)),
            float32_combine=False,
        )
        self.shared_expert = GatedMLP(
            spec.hidden_size, cfg["shared_expert_intermediate_size"], spec.hidden_act, bias=False
        )
        self.shared_expert_gate = nn.Linear(spec.hidden_size, 1, bias=False)  # replicated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return super().forward(x) + shared


def qwen2_moe_spec(spec: LlamaSpec, cfg: dict[str, Any]) -> LlamaSpec:
    """Fix what ``LlamaSpec.from_hf`` keys on ``model_type == "qwen2"``: q/k/v
    biases come from ``qkv_bias`` (default on), and the sliding window follows
    transformers' Qwen2-MoE rule, which is not Qwen2's."""
    layers = cfg["num_hidden_layers"]
    use_window = bool(cfg.get("use_sliding_window", False))
    window = cfg.get("sliding_window") if use_window else None
    types = cfg.get("layer_types") or [
        # Qwen2MoeConfig.__post_init__: even layers below max_window_layers slide.
        "sliding_attention"
        if use_window and (i + 1) % 2 and i < cfg.get("max_window_layers", layers)
        else "full_attention"
        for i in range(layers)
    ]
    windows = tuple(window if t == "sliding_attention" and window else None for t in types)
    return dataclasses.replace(
        spec,
        qkv_bias=bool(cfg.get("qkv_bias", True)),
        o_bias=False,
        layer_windows=windows,
    )


def qwen2_moe_layer_is_sparse(cfg: dict[str, Any], layer: int) -> bool:
    step = cfg.get("decoder_sparse_step", 1) or 1
    return (
        layer not in (cfg.get("mlp_only_layers") or [])
        and cfg.get("num_experts", 0) > 0
        and (layer + 1) % step == 0
    )


class Qwen2MoeForCausalLM(_MoEWeightsMixin, LlamaForCausalLM):
    """Qwen1.5-MoE / Qwen2-MoE (``model_type: qwen2_moe``) checkpoints."""

    @classmethod
    def spec_from_hf(cls, hf_config: dict[str, Any]) -> LlamaSpec:
        return qwen2_moe_spec(LlamaSpec.from_hf(hf_config), hf_config)

    def make_layers(self, spec: LlamaSpec, hf_config: dict[str, Any]) -> list[nn.Module]:
        # mlp=None: the dense Llama MLP of intermediate_size.
        return [
            LlamaDecoderLayer(
                spec,
                i,
                mlp=Qwen2MoeSparseBlock(spec, hf_config)
                if qwen2_moe_layer_is_sparse(hf_config, i)
                else None,
            )
            for i in range(spec.num_layers)
        ]
