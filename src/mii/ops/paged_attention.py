"""The paged attention op that models call: the fused Triton kernels on CUDA
(``ops/triton_attention.py``), else the torch reference's work with torch's fused
SDPA for the attention itself (``ops/attention.py``: ``paged_attention_sdpa``).

Both take the same arguments and do the same work: rotary embedding, the KV
cache write, then attention over the paged cache. ``positions`` are only used to
pick each token's row of ``cos_sin``: its position for plain rope, another row
where a rope scaling lays its table out otherwise (``models/rope.py``).
"""

from __future__ import annotations

import torch

from mii.ops.attention import AttentionBatch, rotary_paged_attention_reference
from mii.ops.dispatch import triton_attention_enabled


def rotary_paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    positions: torch.Tensor,
    cos_sin: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    batch: AttentionBatch,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """The attention op models call: the fused Triton path on CUDA, else SDPA's."""
    if triton_attention_enabled(q.device):
        # Imported here: Triton is needed only where its kernels run.
        from mii.ops.library_attention import attend_with_library, library_members
        from mii.ops.triton_attention import call_paged_attention_op

        members = library_members(batch, k_cache, sliding_window)  # MII_PROMPT_ATTENTION
        if members:
            return attend_with_library(
                q, k, v, positions, cos_sin, k_cache, v_cache, batch, scale, members,
                call_paged_attention_op,
            )  # fmt: skip
        return call_paged_attention_op(
            q, k, v, positions, cos_sin, k_cache, v_cache, batch, scale, sliding_window
        )
    return rotary_paged_attention_reference(
        q, k, v, positions, cos_sin, k_cache, v_cache, batch, scale, sliding_window, fused=True
    )
