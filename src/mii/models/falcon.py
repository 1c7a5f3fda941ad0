"""Falcon (7B, 40B, 180B, Falcon2-11B and the non-parallel RW layout).

What is special about the family:

* One fused ``query_key_value`` matrix whose row order depends on the layout:
  7B (multi-query) stores [all q heads, k, v]; the old multi-head layout
  interleaves [q, k, v] per head; the new decoder architecture (40B/180B)
  stores one group per KV head, [q heads of the group, k, v]. ``convert_weight``
  reorders every layout into the [q; k; v] that ``SelfAttention`` expects.
* Attention and MLP usually run in parallel on the same residual input, with
  one shared LayerNorm (7B, Falcon2) or one each (``ln_attn``/``ln_mlp``, 40B);
  ``parallel_attn=False`` is the usual sequential pre-norm block.
* LayerNorm with bias, exact GELU, no rope on ALiBi variants (unsupported here),
  and a head tied to the embedding by default.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mii.errors import UnsupportedModelError
from mii.models.attention import SelfAttention
from mii.models.base import CausalLM, ForwardContext
from mii.models.layers import MLP, LayerNorm, VocabEmbedding, activation
from mii.models.rope import RotaryEmbedding, rope_parameters, scaled_max_positions


def _get(cfg: dict[str, Any], names: tuple[str, ...], default: Any) -> Any:
    """The first of ``names`` (current key, then legacy aliases) set in ``cfg``."""
    for name in names:
        if cfg.get(name) is not None:
            return cfg[name]
    return default


@dataclass(frozen=True)
class FalconSpec:
    vocab_size: int
    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int  # KV heads stored in the cache (1 for multi-query)
    head_dim: int
    layer_norm_eps: float
    activation: str
    max_positions: int
    rope: dict[str, Any]
    bias: bool
    qkv_layout: str  # "grouped" (new arch), "interleaved" (old multi-head) or "mqa"
    parallel_attn: bool
    two_norms: bool  # ln_attn + ln_mlp instead of one input_layernorm
    tie_word_embeddings: bool

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> FalconSpec:
        if cfg.get("alibi"):
            raise UnsupportedModelError(
                "ALiBi Falcon variants are not supported: this config sets alibi=true "
                "(Falcon-RW, e.g. falcon-rw-1b/7b), and mii's paged attention applies "
                "rotary position embeddings only, not ALiBi's per-head biases. Serve a "
                "rotary Falcon checkpoint (alibi=false: Falcon-7B/40B/180B, Falcon2-11B) "
                "or run this one with transformers (see README, supported models)"
            )
        hidden = _get(cfg, ("hidden_size", "n_embed"), 4544)
        heads = _get(cfg, ("num_attention_heads", "n_head"), 71)
        kv_heads = _get(cfg, ("num_kv_heads", "n_head_kv"), heads)
        new_arch = bool(cfg.get("new_decoder_architecture", False))
        parallel = bool(cfg.get("parallel_attn", True))
        num_ln = cfg.get("num_ln_in_parallel_attn") or (2 if new_arch else 1)
        if hidden % heads:
            raise UnsupportedModelError(f"hidden_size {hidden} is not divisible by {heads} heads")
        if new_arch:
            layout = "grouped"
            if heads % kv_heads:
                raise UnsupportedModelError(
                    f"num_attention_heads {heads} is not a multiple of num_kv_heads {kv_heads}"
                )
            if not parallel:  # transformers cannot run this combination either
                raise UnsupportedModelError(
                    "Falcon with new_decoder_architecture=true and parallel_attn=false "
                    "is not supported"
                )
        elif cfg.get("multi_query", True):
            layout, kv_heads = "mqa", 1
        else:
            layout = "interleaved"
            if kv_heads != heads:
                raise UnsupportedModelError(
                    f"multi-head Falcon (multi_query=false) with num_kv_heads {kv_heads} != "
                    f"num_attention_heads {heads} is not supported"
                )
        if parallel and num_ln == 2 and not new_arch:
            raise UnsupportedModelError(
                "num_ln_in_parallel_attn=2 needs new_decoder_architecture=true"
            )
        act = cfg.get("activation") or "gelu"
        try:
            activation(act)
        except ValueError as err:
            raise UnsupportedModelError(f"Falcon activation: {err}") from None
        return cls(
            vocab_size=cfg.get("vocab_size", 65024),
            hidden_size=hidden,
            ffn_hidden_size=cfg.get("ffn_hidden_size") or 4 * hidden,
            num_layers=_get(cfg, ("num_hidden_layers", "n_layer"), 32),
            num_heads=heads,
            num_kv_heads=kv_heads,
            head_dim=hidden // heads,
            layer_norm_eps=_get(cfg, ("layer_norm_epsilon",), 1e-5),
            activation=act,
            max_positions=scaled_max_positions(
                cfg.get("max_position_embeddings", 2048), rope_parameters(cfg)
            ),
            rope=rope_parameters(cfg),
            bias=bool(cfg.get("bias", False)),
            qkv_layout=layout,
            parallel_attn=parallel,
            two_norms=parallel and num_ln == 2,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        )


class FalconDecoderLayer(nn.Module):
    def __init__(self, spec: FalconSpec, layer_idx: int) -> None:
        super().__init__()
        d, eps = spec.hidden_size, spec.layer_norm_eps
        self.parallel_attn = spec.parallel_attn
        self.two_norms = spec.two_norms
        if spec.two_norms:
            self.ln_attn = LayerNorm(d, eps)
            self.ln_mlp = LayerNorm(d, eps)
        else:
            self.input_layernorm = LayerNorm(d, eps)
        if not spec.parallel_attn:
            self.post_attention_layernorm = LayerNorm(d, eps)
        rotary = RotaryEmbedding(spec.head_dim, spec.max_positions, spec.rope)
        self.self_attention = SelfAttention(
            spec, layer_idx, qkv_bias=spec.bias, o_bias=spec.bias, rotary=rotary
        )
        self.mlp = MLP(d, spec.ffn_hidden_size, spec.activation, spec.bias)

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        """x: [T, D] -> [T, D]."""
        if not self.parallel_attn:  # sequential pre-norm block
            x = x + self.self_attention(self.input_layernorm(x), positions, ctx)
            return x + self.mlp(self.post_attention_layernorm(x))
        if self.two_norms:
            attn_in, mlp_in = self.ln_attn(x), self.ln_mlp(x)
        else:
            attn_in = mlp_in = self.input_layernorm(x)
        # Same summation order as transformers: residual + (mlp + attention).
        return x + (self.mlp(mlp_in) + self.self_attention(attn_in, positions, ctx))


class FalconModel(nn.Module):
    def __init__(self, spec: FalconSpec) -> None:
        super().__init__()
        self.word_embeddings = VocabEmbedding(spec.vocab_size, spec.hidden_size)
        self.h = nn.ModuleList(FalconDecoderLayer(spec, i) for i in range(spec.num_layers))
        self.ln_f = LayerNorm(spec.hidden_size, spec.layer_norm_eps)

    def forward(
        self, token_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        x = self.word_embeddings(token_ids)  # [T, D]
        for layer in self.h:
            x = layer(x, positions, ctx)
        return self.ln_f(x)


class FalconForCausalLM(CausalLM):
    """Rotary Falcon checkpoints (``model_type: falcon``)."""

    weight_map = (
        (".self_attention.query_key_value.", ".self_attention.qkv_proj.", "packed"),
        (".self_attention.dense.", ".self_attention.o_proj.", None),
        (".mlp.dense_h_to_4h.", ".mlp.up_proj.", None),
        (".mlp.dense_4h_to_h.", ".mlp.down_proj.", None),
    )

    def __init__(self, hf_config: dict[str, Any]) -> None:
        super().__init__()
        spec = FalconSpec.from_hf(hf_config)
        self.set_spec(spec)
        self.transformer = FalconModel(spec)
        self.lm_head = self.make_lm_head(self.transformer.word_embeddings)

    def convert_weight(
        self, hf_name: str, tensor: torch.Tensor
    ) -> Iterable[tuple[str, torch.Tensor]]:
        """Reorder the fused query_key_value rows (weight [R, D] or bias [R]) into [q; k; v]."""
        if ".query_key_value." not in hf_name or self.spec.qkv_layout == "mqa":
            yield hf_name, tensor  # 7B already stores [q heads, k, v]
            return
        spec, rest = self.spec, tensor.shape[1:]
        if spec.qkv_layout == "grouped":  # [G, q heads of the group + k + v, hd, ...]
            per_group = spec.num_heads // spec.num_kv_heads
            grouped = tensor.reshape(spec.num_kv_heads, per_group + 2, spec.head_dim, *rest)
            q, k, v = grouped[:, :per_group], grouped[:, per_group], grouped[:, per_group + 1]
        else:  # interleaved: [H, (q, k, v), hd, ...]
            heads = tensor.reshape(spec.num_heads, 3, spec.head_dim, *rest)
            q, k, v = heads[:, 0], heads[:, 1], heads[:, 2]
        yield hf_name, torch.cat([p.reshape(-1, *rest) for p in (q, k, v)], dim=0)

    def forward(
        self, token_ids: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        return self.transformer(token_ids, positions, ctx)
