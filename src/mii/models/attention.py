"""Self-attention over the paged KV cache, shared by every family.

q, k and v come from one fused column-parallel projection; rotary embedding
(full, partial or none) and optional per-head q/k normalisation are applied;
then the paged attention op writes the new keys/values into the cache and
attends; a row-parallel projection maps back to the hidden size.
"""

from __future__ import annotations

import torch
from torch import nn

from mii.models.base import AttentionSizes, ForwardContext
from mii.models.layers import ColumnParallelLinear, RowParallelLinear, qkv_layouts
from mii.models.rope import RotaryEmbedding
from mii.ops.paged_attention import rotary_paged_attention


class SelfAttention(nn.Module):
    """Attention of layer ``layer_idx`` (its index into ``ctx.kv_caches``), with the
    head counts and sizes of ``sizes`` (the family's spec)."""

    def __init__(
        self,
        sizes: AttentionSizes,
        layer_idx: int,
        *,
        qkv_bias: bool,
        o_bias: bool,
        rotary: RotaryEmbedding | None,
        sliding_window: int | None = None,
        scale: float | None = None,
        qk_norm: nn.Module | None = None,
    ) -> None:
        super().__init__()
        hidden_size, head_dim = sizes.hidden_size, sizes.head_dim
        num_heads, num_kv_heads = sizes.num_heads, sizes.num_kv_heads
        self.layer_idx = layer_idx
        self.head_dim = head_dim
        self.scale = head_dim**-0.5 if scale is None else scale
        self.sliding_window = sliding_window
        q_size, kv_size = num_heads * head_dim, num_kv_heads * head_dim
        layouts = qkv_layouts(num_heads, num_kv_heads, head_dim)
        self.num_heads = layouts[0][0] // head_dim  # this rank's query heads
        self.num_kv_heads = layouts[1][0] // head_dim  # and key/value heads
        self.qkv_proj = ColumnParallelLinear(
            hidden_size, [q_size, kv_size, kv_size], qkv_bias, layouts
        )
        self.o_proj = RowParallelLinear(q_size, hidden_size, o_bias)
        self.rotary = rotary
        if qk_norm is not None:  # Qwen3 / Gemma 3 style: normalise each head's q and k
            self.q_norm = qk_norm
            self.k_norm = type(qk_norm)(head_dim, qk_norm.eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self, x: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        return self.attend(self.qkv_proj(x), positions, ctx)

    def attend(
        self, qkv: torch.Tensor, positions: torch.Tensor, ctx: ForwardContext
    ) -> torch.Tensor:
        """The layer from its qkv projection's output on: qkv [T, (Hq + 2 Hkv) D]
        -> [T, hidden] (for callers that computed the projection themselves)."""
        tokens = qkv.shape[0]
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(tokens, self.num_heads, self.head_dim)  # [T, Hq, D]
        k = k.view(tokens, self.num_kv_heads, self.head_dim)  # [T, Hkv, D]
        v = v.view(tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos_sin, rope_rows = None, positions
        if self.rotary is not None:
            cos_sin, rope_rows = self.rotary.table(positions, ctx.rope_lens)
        k_cache, v_cache = ctx.kv_caches[self.layer_idx]
        out = rotary_paged_attention(
            q,
            k,
            v,
            rope_rows,
            cos_sin,
            k_cache,
            v_cache,
            ctx.batch,
            self.scale,
            self.sliding_window,
        )
        return self.o_proj(out.reshape(tokens, q_size))
