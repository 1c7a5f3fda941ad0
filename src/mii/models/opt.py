"""OPT (facebook/opt-*): the GPT-2 style decoder of Meta's Open Pre-trained Transformers.

What sets it apart from Llama:

- learned absolute position embeddings, indexed at ``position + 2`` (fairseq
  reserved the first two rows), added to the token embeddings; no rotary;
- LayerNorm with bias, biases on every linear (``enable_bias``), an ungated
  ReLU MLP (``fc1``/``fc2``, ``activation_function``);
- ``do_layer_norm_before`` False (opt-350m) makes every layer post-LN and drops
  the final LayerNorm, as does ``_remove_final_layer_norm``;
- ``word_embed_proj_dim`` != ``hidden_size`` (opt-350m) embeds tokens in a
  smaller space, with bias-free ``project_in`` / ``project_out`` around the stack;
- the LM head is tied to the token embedding.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mii.models.attention import SelfAttention
from mii.models.base import CausalLM, ForwardContext
from mii.models.layers import MLP, LayerNorm, VocabEmbedding

POSITION_OFFSET = 2  # OPTLearnedPositionalEmbedding.offset
LAYER_NORM_EPS = 1e-5  # nn.LayerNorm's default, which OPT never overrides


@dataclass(frozen=True)
class OPTSpec:
    vocab_size: int
    hidden_size: int
    embed_dim: int  # word_embed_proj_dim
    ffn_dim: int
    num_layers: int
    num_heads: int
    max_positions: int
    activation: str
    bias: bool
    norm_affine: bool
    pre_norm: bool
    final_norm: bool
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> OPTSpec:
        # Defaults are OPTConfig's.
        hidden = cfg.get("hidden_size", 768)
        pre_norm = bool(cfg.get("do_layer_norm_before", True))
        return cls(
            vocab_size=cfg.get("vocab_size", 50272),
            hidden_size=hidden,
            embed_dim=cfg.get("word_embed_proj_dim") or hidden,
            ffn_dim=cfg.get("ffn_dim", 3072),
            num_layers=cfg.get("num_hidden_layers", 12),
            num_heads=cfg.get("num_attention_heads", 12),
            max_positions=cfg.get("max_position_embeddings", 2048),
            activation=cfg.get("activation_function", "relu"),
            bias=bool(cfg.get("enable_bias", True)),
            norm_affine=bool(cfg.get("layer_norm_elementwise_affine", True)),
            pre_norm=pre_norm,
            final_norm=pre_norm and not cfg.get("_remove_final_layer_norm", False),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def num_kv_heads(self) -> int:
        return self.num_heads  # multi-head attention: every head has its own keys and values


def layer_norm(spec: OPTSpec) -> nn.Module:
    """OPT's LayerNorm; ``layer_norm_elementwise_affine=False`` leaves it without parameters."""
    if spec.norm_affine:
        return LayerNorm(spec.hidden_size, LAYER_NORM_EPS)
    return nn.LayerNorm(spec.hidden_size, LAYER_NORM_EPS, elementwise_affine=False)


class OPTDecoderLayer(nn.Module):
    def __init__(self, spec: OPTSpec, layer_idx: int) -> None:
        super().__init__()
        self.pre_norm = spec.pre_norm
        self.self_attn = SelfAttention(
            spec, layer_idx, qkv_bias=spec.bias, o_bias=spec.bias, rotary=None
        )
        self.self_attn_layer_norm = layer_norm(spec)
        self.mlp = MLP(spec.hidden_size, spec.ffn_dim, spec.activation, spec.bias)  # fc1, fc2
        self.final_layer_norm = layer_norm(spec)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        # x: [T, D]. Pre-LN normalises each branch's input; post-LN the residual sum.
        h = self.self_attn_layer_norm(x) if self.pre_norm else x
        x = x + self.self_attn(h, positions, ctx)
        if not self.pre_norm:
            x = self.self_attn_layer_norm(x)
        h = self.final_layer_norm(x) if self.pre_norm else x
        x = x + self.mlp(h)
        if not self.pre_norm:
            x = self.final_layer_norm(x)
        return x


class OPTDecoder(nn.Module):
    def __init__(self, spec: OPTSpec) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(spec.vocab_size, spec.embed_dim)
        self.embed_positions = VocabEmbedding(
            spec.max_positions + POSITION_OFFSET, spec.hidden_size
        )
        if spec.embed_dim != spec.hidden_size:
            self.project_in = nn.Linear(spec.embed_dim, spec.hidden_size, bias=False)
            self.project_out = nn.Linear(spec.hidden_size, spec.embed_dim, bias=False)
        else:
            self.project_in = self.project_out = None
        self.layers = nn.ModuleList(OPTDecoderLayer(spec, i) for i in range(spec.num_layers))
        self.final_layer_norm = layer_norm(spec) if spec.final_norm else None

    def forward(
        self, token_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        x = self.embed_tokens(token_ids)  # [T, E]
        if self.project_in is not None:
            x = self.project_in(x)  # [T, D]
        x = x + self.embed_positions(positions + POSITION_OFFSET)  # [T, D]
        for layer in self.layers:
            x = layer(x, positions, ctx)
        if self.final_layer_norm is not None:
            x = self.final_layer_norm(x)
        if self.project_out is not None:
            x = self.project_out(x)  # [T, E]
        return x


class OPTModel(nn.Module):
    def __init__(self, spec: OPTSpec) -> None:
        super().__init__()
        self.decoder = OPTDecoder(spec)


class OPTForCausalLM(CausalLM):
    """OPT checkpoints, pre-LN (most sizes) and post-LN with projections (opt-350m)."""

    weight_map = (
        (".q_proj.", ".qkv_proj.", 0),
        (".k_proj.", ".qkv_proj.", 1),
        (".v_proj.", ".qkv_proj.", 2),
        (".self_attn.out_proj.", ".self_attn.o_proj.", None),
        (".fc1.", ".mlp.up_proj.", None),
        (".fc2.", ".mlp.down_proj.", None),
    )

    def __init__(self, hf_config: dict[str, Any]) -> None:
        super().__init__()
        spec = OPTSpec.from_hf(hf_config)
        self.set_spec(spec)
        self.model = OPTModel(spec)
        # Over the token embedding's width (word_embed_proj_dim), after project_out.
        self.lm_head = self.make_lm_head(self.model.decoder.embed_tokens)

    def convert_weight(
        self, hf_name: str, tensor: torch.Tensor
    ) -> Iterable[tuple[str, torch.Tensor]]:
        # Checkpoints converted from metaseq (facebook/opt-125m ...) name the
        # decoder at the top level, without the "model." prefix.
        if hf_name.startswith("decoder."):
            hf_name = "model." + hf_name
        yield hf_name, tensor

    def forward(
        self, token_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        return self.model.decoder(token_ids, positions, ctx)
