"""The Llama decoder, shared by Llama 1/2/3, Mistral and Qwen2.

Differences between those families are data, read from ``config.json``:
grouped-query heads, rope scaling (Llama 3), a sliding window (Mistral), and
q/k/v biases (Qwen2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mii.models.base import CausalLM, ForwardContext, KVCacheSpec
from mii.models.layers import (
    ColumnParallelLinear,
    GatedMLP,
    RMSNorm,
    RowParallelLinear,
    VocabEmbedding,
)
from mii.models.parallel import divide, tp_world_size
from mii.models.rope import RotaryEmbedding, rope_parameters
from mii.ops.attention import paged_attention_reference


@dataclass(frozen=True)
class LlamaSpec:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    hidden_act: str
    max_positions: int
    rope: dict[str, Any]
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    tie_word_embeddings: bool
    layer_windows: tuple[int | None, ...]  # sliding window of each layer (None: full)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> LlamaSpec:
        heads = cfg["num_attention_heads"]
        model_type = cfg.get("model_type")
        qkv_bias = bool(cfg.get("attention_bias", False)) or model_type == "qwen2"
        layers = cfg["num_hidden_layers"]
        window = cfg.get("sliding_window")
        if model_type == "qwen2":
            # Qwen2 configs carry a window they only use with use_sliding_window,
            # and then only from layer max_window_layers on.
            first = cfg.get("max_window_layers", 0) if cfg.get("use_sliding_window") else layers
            windows = [window if i >= first else None for i in range(layers)]
        else:
            windows = [window] * layers
        if cfg.get("layer_types"):
            windows = [window if t == "sliding_attention" else None for t in cfg["layer_types"]]
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            hidden_act=cfg.get("hidden_act", "silu"),
            max_positions=cfg.get("max_position_embeddings", 2048),
            rope=rope_parameters(cfg),
            qkv_bias=qkv_bias,
            o_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            layer_windows=tuple(windows),
        )


class LlamaAttention(nn.Module):
    def __init__(self, spec: LlamaSpec, layer_idx: int) -> None:
        super().__init__()
        world = tp_world_size()
        self.layer_idx = layer_idx
        self.head_dim = spec.head_dim
        self.num_heads = divide(spec.num_heads, world, "num_attention_heads")
        self.num_kv_heads = divide(spec.num_kv_heads, world, "num_key_value_heads")
        self.scale = spec.head_dim**-0.5
        self.sliding_window = spec.layer_windows[layer_idx]
        q_size, kv_size = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
        self.qkv_proj = ColumnParallelLinear(
            spec.hidden_size, [q_size, kv_size, kv_size], spec.qkv_bias
        )
        self.o_proj = RowParallelLinear(q_size, spec.hidden_size, spec.o_bias)
        self.rotary = RotaryEmbedding(spec.head_dim, spec.max_positions, spec.rope)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        tokens = x.shape[0]
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(tokens, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = k.view(tokens, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        k_cache, v_cache = ctx.kv_caches[self.layer_idx]
        out = paged_attention_reference(
            q, k, v, k_cache, v_cache, ctx.batch, self.scale, self.sliding_window
        )
        return self.o_proj(out.reshape(tokens, q_size))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, spec: LlamaSpec, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = LlamaAttention(spec, layer_idx)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.mlp = GatedMLP(
            spec.hidden_size, spec.intermediate_size, spec.hidden_act, spec.mlp_bias
        )

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaModel(nn.Module):
    def __init__(self, spec: LlamaSpec) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(spec, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(
        self, token_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        x = self.embed_tokens(token_ids)  # [T, D]
        for layer in self.layers:
            x = layer(x, positions, ctx)
        return self.norm(x)


class LlamaForCausalLM(CausalLM):
    """Llama / Llama-2 / Llama-3, Mistral and Qwen2 checkpoints."""

    stacked_params = (
        (".q_proj.", ".qkv_proj.", 0),
        (".k_proj.", ".qkv_proj.", 1),
        (".v_proj.", ".qkv_proj.", 2),
        (".gate_proj.", ".gate_up_proj.", 0),
        (".up_proj.", ".gate_up_proj.", 1),
    )

    def __init__(self, hf_config: dict[str, Any]) -> None:
        super().__init__()
        spec = LlamaSpec.from_hf(hf_config)
        self.spec = spec
        self.max_positions = spec.max_positions
        self.kv_spec = KVCacheSpec(
            spec.num_layers,
            divide(spec.num_kv_heads, tp_world_size(), "num_key_value_heads"),
            spec.head_dim,
        )
        self.model = LlamaModel(spec)
        self.tied_embeddings = spec.tie_word_embeddings
        if spec.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = ColumnParallelLinear(spec.hidden_size, [spec.vocab_size], bias=False)

    def forward(
        self, token_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        return self.model(token_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        return torch.nn.functional.linear(hidden, weight).float()
