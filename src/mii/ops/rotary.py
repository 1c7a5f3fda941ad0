"""Rotary position embedding (rotate-half / GPT-NeoX layout), pure torch reference."""

from __future__ import annotations

import torch


def rotary_cos_sin(
    inv_freq: torch.Tensor, max_positions: int, scaling: float = 1.0
) -> torch.Tensor:
    """Cache of [cos | sin] for every position: [max_positions, rotary_dim] in float32.

    ``scaling`` multiplies cos and sin (YaRN's attention factor; 1.0 otherwise).
    """
    positions = torch.arange(max_positions, dtype=torch.float32, device=inv_freq.device)
    freqs = torch.outer(positions, inv_freq.float())  # [P, rotary_dim / 2]
    return torch.cat([freqs.cos() * scaling, freqs.sin() * scaling], dim=-1)


def apply_rotary_reference(
    x: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor
) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` channels of x ([T, H, D]) by each token's position.

    Channels past ``rotary_dim`` (partial rotary) pass through unchanged.
    """
    rotary_dim = cos_sin.shape[-1]
    half = rotary_dim // 2
    cos, sin = cos_sin.index_select(0, positions).chunk(2, dim=-1)  # [T, half] each
    cos, sin = cos[:, None, :], sin[:, None, :]
    x_rot = x[..., :rotary_dim].float()
    x1, x2 = x_rot[..., :half], x_rot[..., half:]
    rotated = torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).to(x.dtype)
    if rotary_dim == x.shape[-1]:
        return rotated
    return torch.cat([rotated, x[..., rotary_dim:]], dim=-1)
