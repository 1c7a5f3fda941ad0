"""Phi-1, Phi-1.5 and Phi-2 (``model_type`` "phi").

What sets it apart from Llama:

- a parallel block: attention and MLP both read the same LayerNorm output and
  are added to the residual together, ``x + attn(ln(x)) + mlp(ln(x))``;
- partial rotary: only the first ``partial_rotary_factor * head_dim`` channels
  of each head are rotated (0.4 in Phi-2), the rest pass through;
- LayerNorm with bias, biases on q/k/v, the output ``dense`` projection, the
  ungated ``fc1``/``fc2`` MLP (``gelu_new``) and the LM head;
- optional per-head LayerNorm of q and k (``qk_layernorm``), before rotary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mii.models.attention import SelfAttention
from mii.models.base import CausalLM, DecoderSizes, ForwardContext
from mii.models.layers import MLP, LayerNorm, VocabEmbedding
from mii.models.rope import RotaryEmbedding, rope_parameters, scaled_max_positions


@dataclass(frozen=True)
class PhiSpec(DecoderSizes):
    rotary_dim: int
    layer_norm_eps: float
    hidden_act: str
    max_positions: int
    rope: dict[str, Any]
    qk_layernorm: bool
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> PhiSpec:
        # Defaults are PhiConfig's. Transformers 4 configs keep partial_rotary_factor
        # and rope_theta at the top level; Transformers 5 moves them into rope_parameters.
        hidden = cfg.get("hidden_size", 2048)
        heads = cfg.get("num_attention_heads", 32)
        head_dim = cfg.get("head_dim") or hidden // heads
        rope = rope_parameters(cfg)
        factor = rope.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.5))
        return cls(
            vocab_size=cfg.get("vocab_size", 51200),
            hidden_size=hidden,
            intermediate_size=cfg.get("intermediate_size", 8192),
            num_layers=cfg.get("num_hidden_layers", 24),
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rotary_dim=int(head_dim * factor),
            layer_norm_eps=cfg.get("layer_norm_eps", 1e-5),
            hidden_act=cfg.get("hidden_act", "gelu_new"),
            max_positions=scaled_max_positions(cfg.get("max_position_embeddings", 2048), rope),
            rope=rope,
            qk_layernorm=bool(cfg.get("qk_layernorm", False)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )


class PhiDecoderLayer(nn.Module):
    def __init__(self, spec: PhiSpec, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = LayerNorm(spec.hidden_size, spec.layer_norm_eps)
        # HF sizes the q/k LayerNorms by hidden_size // num_heads, i.e. head_dim.
        qk_norm = LayerNorm(spec.head_dim, spec.layer_norm_eps) if spec.qk_layernorm else None
        self.self_attn = SelfAttention(
            spec,
            layer_idx,
            qkv_bias=True,
            o_bias=True,
            rotary=RotaryEmbedding(spec.rotary_dim, spec.max_positions, spec.rope),
            qk_norm=qk_norm,
        )
        self.mlp = MLP(spec.hidden_size, spec.intermediate_size, spec.hidden_act, bias=True)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        h = self.input_layernorm(x)  # [T, D], shared by both branches
        return x + self.self_attn(h, positions, ctx) + self.mlp(h)


class PhiModel(nn.Module):
    def __init__(self, spec: PhiSpec) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(PhiDecoderLayer(spec, i) for i in range(spec.num_layers))
        self.final_layernorm = LayerNorm(spec.hidden_size, spec.layer_norm_eps)

    def forward(
        self, token_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        x = self.embed_tokens(token_ids)  # [T, D]
        for layer in self.layers:
            x = layer(x, positions, ctx)
        return self.final_layernorm(x)


class PhiForCausalLM(CausalLM):
    """Phi-1 / Phi-1.5 / Phi-2 checkpoints in the Transformers layout."""

    weight_map = (
        (".q_proj.", ".qkv_proj.", 0),
        (".k_proj.", ".qkv_proj.", 1),
        (".v_proj.", ".qkv_proj.", 2),
        (".self_attn.dense.", ".self_attn.o_proj.", None),
        (".q_layernorm.", ".q_norm.", None),
        (".k_layernorm.", ".k_norm.", None),
        (".mlp.fc1.", ".mlp.up_proj.", None),
        (".mlp.fc2.", ".mlp.down_proj.", None),
    )

    def __init__(self, hf_config: dict[str, Any]) -> None:
        super().__init__()
        spec = PhiSpec.from_hf(hf_config)
        self.set_spec(spec)
        self.model = PhiModel(spec)
        self.lm_head = self.make_lm_head(self.model.embed_tokens, bias=True)

    def forward(
        self, token_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        return self.model(token_ids, positions, ctx)
