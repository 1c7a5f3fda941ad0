"""The rope scalings of long-context checkpoints: YaRN, LongRoPE and dynamic NTK.

Each is computed with the float32 operations, in the order, of transformers'
``modeling_rope_utils`` (the correctness oracle), so that the rotations equal
its own and greedy tokens match.

Two of them depend on the sequence length, and transformers applies them per
forward pass: the length is ``max(position) + 1`` of the pass. Under
``generate`` with a KV cache that means, for a request whose prompt has
``prompt_len`` tokens, that the token at position ``p`` is rotated for the
length ``max(p + 1, prompt_len)`` (the whole prompt in the first pass, then one
more token per decode step), and keys already in the cache keep the rotation
they were written with. mii computes that length per token (``rope_lens``), so
chunked prefill, batching and preemption (recompute) give the rotations of the
request run alone through ``generate``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from mii.errors import UnsupportedModelError


def _steps(dim: int, device: torch.device | str = "cpu") -> torch.Tensor:
    # transformers' exponent grid: arange(0, dim, 2) as int64, cast to float32, / dim
    return torch.arange(0, dim, 2, dtype=torch.int64, device=device).to(torch.float32) / dim


def yarn_frequencies(dim: int, params: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """YaRN (Qwen2.5, DeepSeek): (inverse frequencies, attention factor on cos/sin)."""
    base = params["rope_theta"]
    factor = params.get("factor")
    original = params["original_max_position_embeddings"]
    if factor is None:  # DeepSeek-V3 style: the ratio of the two context lengths
        factor = params["max_position_embeddings"] / original
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = float(_mscale(factor, mscale) / _mscale(factor, mscale_all_dim))
        else:
            attention_factor = _mscale(factor)
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    channels = torch.arange(dim // 2, dtype=torch.float32, device="cpu")
    ramp = ((channels - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, device="cpu").to(dtype=torch.float32) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    # Fast-rotating channels keep their frequency, slow ones are interpolated.
    keep = 1 - ramp
    inv_freq = interpolation * (1 - keep) + extrapolation * keep
    return inv_freq, float(attention_factor)


def _mscale(scale: float, mscale: float = 1) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def longrope_frequencies(dim: int, params: dict[str, Any], long: bool) -> torch.Tensor:
    """LongRoPE (Phi-3 128k): per-channel factors, ``long_factor`` once the sequence
    outgrows ``original_max_position_embeddings``, ``short_factor`` before."""
    factors = params["long_factor"] if long else params["short_factor"]
    if len(factors) != dim // 2:
        raise UnsupportedModelError(
            f"rope scaling longrope: {'long' if long else 'short'}_factor has {len(factors)} "
            f"entries; the rotary dimension {dim} needs {dim // 2}"
        )
    ext = torch.tensor(factors, dtype=torch.float32, device="cpu")
    return 1.0 / (ext * params["rope_theta"] ** _steps(dim))


def longrope_attention_factor(params: dict[str, Any]) -> float:
    """The factor LongRoPE multiplies cos and sin by (both frequency sets)."""
    if params.get("attention_factor") is not None:
        return float(params["attention_factor"])
    original = params["original_max_position_embeddings"]
    factor = params.get("factor")
    if factor is None:
        factor = params["max_position_embeddings"] / original
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(original))


def dynamic_ntk_initial_frequencies(dim: int, params: dict[str, Any]) -> torch.Tensor:
    """Dynamic NTK's frequencies up to ``max_position_embeddings``: the unscaled ones,
    computed as transformers does at load (length = max_position_embeddings)."""
    factor, max_len = params["factor"], params["max_position_embeddings"]
    base = params["rope_theta"] * ((factor * max_len / max_len) - (factor - 1)) ** (dim / (dim - 2))
    return 1.0 / (base ** _steps(dim))


def dynamic_ntk_cos_sin(
    dim: int, params: dict[str, Any], positions: torch.Tensor, lengths: torch.Tensor
) -> torch.Tensor:
    """[cos | sin] of each token ([T, dim]) with the base NTK-scaled for its length.

    Lengths at or below ``max_position_embeddings`` give the unscaled base.
    """
    factor, max_len = params["factor"], params["max_position_embeddings"]
    seq_len = lengths.clamp(min=max_len).to(torch.float32)
    ratio = (factor * seq_len / max_len) - (factor - 1)
    # transformers raises one length's ratio to the power; on the CPU a contiguous
    # tensor takes the vectorised pow, up to 1 ulp away from the scalar one, and
    # the rotation of distant positions with it. A strided view takes the scalar pow.
    ratio = torch.stack([ratio, ratio], dim=1)[:, 0]
    base = params["rope_theta"] * ratio ** (dim / (dim - 2))
    inv_freq = 1.0 / (base[:, None] ** _steps(dim, positions.device)[None, :])  # [T, dim / 2]
    freqs = positions.to(torch.float32)[:, None] * inv_freq
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)
