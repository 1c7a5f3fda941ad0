"""The Llama decoder, shared by Llama 1/2/3, Mistral, Qwen2 and Qwen3.

Differences between those families are data, read from ``config.json``:
grouped-query heads, rope scaling (Llama 3), a sliding window (Mistral, Qwen2),
q/k/v biases (Qwen2), per-head q/k RMSNorm (Qwen3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mii.models.attention import SelfAttention
from mii.models.base import CausalLM, DecoderSizes, ForwardContext
from mii.models.layers import GatedMLP, RMSNorm, VocabEmbedding, norm_then_linear
from mii.models.rope import RotaryEmbedding, rope_parameters, scaled_max_positions


@dataclass(frozen=True)
class LlamaSpec(DecoderSizes):
    rms_norm_eps: float
    hidden_act: str
    max_positions: int
    rope: dict[str, Any]
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    qk_norm: bool
    tie_word_embeddings: bool
    layer_windows: tuple[int | None, ...]  # sliding window of each layer (None: full)
    rotary_dim: int  # < head_dim for partial rotary
    norm_offset: float = 0.0  # Gemma's RMSNorm scales by (1 + w)
    embed_scale: float | None = None  # Gemma multiplies embeddings by sqrt(hidden_size)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> LlamaSpec:
        heads = cfg["num_attention_heads"]
        model_type = cfg.get("model_type")
        layers = cfg["num_hidden_layers"]
        window = cfg.get("sliding_window")
        if model_type in ("qwen2", "qwen3"):
            # Qwen configs carry a window they only use with use_sliding_window,
            # and then only from layer max_window_layers on.
            first = cfg.get("max_window_layers", 0) if cfg.get("use_sliding_window") else layers
            windows = [window if i >= first else None for i in range(layers)]
        else:
            windows = [window] * layers
        if cfg.get("layer_types"):
            windows = [window if t == "sliding_attention" else None for t in cfg["layer_types"]]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
        rope = rope_parameters(cfg)
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            hidden_act=cfg.get("hidden_act", "silu"),
            max_positions=scaled_max_positions(cfg.get("max_position_embeddings", 2048), rope),
            rope=rope,
            qkv_bias=bool(cfg.get("attention_bias", False)) or model_type == "qwen2",
            o_bias=bool(cfg.get("attention_bias", False)) and model_type != "qwen2",
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            layer_windows=tuple(windows),
            rotary_dim=int(head_dim * cfg.get("partial_rotary_factor", 1.0)),
        )


class LlamaDecoderLayer(nn.Module):
    def __init__(self, spec: LlamaSpec, layer_idx: int, mlp: nn.Module | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, spec.norm_offset)
        self.self_attn = SelfAttention(
            spec,
            layer_idx,
            qkv_bias=spec.qkv_bias,
            o_bias=spec.o_bias,
            rotary=RotaryEmbedding(spec.rotary_dim, spec.max_positions, spec.rope),
            sliding_window=spec.layer_windows[layer_idx],
            qk_norm=RMSNorm(spec.head_dim, spec.rms_norm_eps) if spec.qk_norm else None,
        )
        self.post_attention_layernorm = RMSNorm(
            spec.hidden_size, spec.rms_norm_eps, spec.norm_offset
        )
        self.mlp = mlp or GatedMLP(
            spec.hidden_size, spec.intermediate_size, spec.hidden_act, spec.mlp_bias
        )

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        positions: torch.Tensor,
        ctx: ForwardContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the previous layer's MLP output (the embeddings at the first layer),
        residual: the stream it adds to (None at the first layer) -> this layer's
        MLP output and the stream before it. Each add happens inside the next norm
        (one fused kernel on CUDA), not as a separate kernel per layer."""
        qkv, residual = norm_then_linear(
            self.input_layernorm, x, residual, self.self_attn.qkv_proj
        )  # residual + x, normed, projected
        attn = self.self_attn.attend(qkv, positions, ctx)
        quantize_for = self.mlp.gate_up_proj if isinstance(self.mlp, GatedMLP) else None
        h, residual = self.post_attention_layernorm(
            attn, residual=residual, quantize_for=quantize_for
        )  # (MoE layers: no float8 copy; their kernel quantizes its own input)
        return self.mlp(h), residual


class LlamaModel(nn.Module):
    def __init__(self, spec: LlamaSpec, layers: list[nn.Module]) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, spec.norm_offset)
        self.embed_scale = spec.embed_scale

    def forward(
        self, token_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        x = self.embed_tokens(token_ids)  # [T, D]
        if self.embed_scale is not None:
            # In the activation dtype, as Hugging Face rounds it.
            x = x * torch.tensor(self.embed_scale, dtype=x.dtype)
        residual = None
        for layer in self.layers:
            x, residual = layer(x, residual, positions, ctx)
        if residual is None:  # no layers
            return self.norm(x)
        return self.norm(x, residual=residual)[0]


class LlamaForCausalLM(CausalLM):
    """Llama / Llama-2 / Llama-3, Mistral, Qwen2 and Qwen3 checkpoints."""

    weight_map = (
        (".q_proj.", ".qkv_proj.", 0),
        (".k_proj.", ".qkv_proj.", 1),
        (".v_proj.", ".qkv_proj.", 2),
        (".gate_proj.", ".gate_up_proj.", 0),
        (".up_proj.", ".gate_up_proj.", 1),
    )

    def __init__(self, hf_config: dict[str, Any]) -> None:
        super().__init__()
        spec = self.spec_from_hf(hf_config)
        self.set_spec(spec)
        self.model = LlamaModel(spec, self.make_layers(spec, hf_config))
        self.lm_head = self.make_lm_head(self.model.embed_tokens)

    @classmethod
    def spec_from_hf(cls, hf_config: dict[str, Any]) -> LlamaSpec:
        """The family's settings from config.json (subclasses adjust them)."""
        return LlamaSpec.from_hf(hf_config)

    def make_layers(self, spec: LlamaSpec, hf_config: dict[str, Any]) -> list[nn.Module]:
        return [LlamaDecoderLayer(spec, i) for i in range(spec.num_layers)]

    def forward(
        self, token_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        return self.model(token_ids, positions, ctx)
