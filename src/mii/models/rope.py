"""Rotary embedding frequencies, including the rope-scaling variants of Llama 3.

Reads both the Transformers 4 config keys (``rope_theta``, ``rope_scaling``) and
the Transformers 5 key (``rope_parameters``), since published checkpoints use
either.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from mii.errors import UnsupportedModelError
from mii.ops.rotary import rotary_cos_sin


def rope_parameters(hf_config: dict[str, Any], theta_key: str = "rope_theta") -> dict[str, Any]:
    """Normalised rope settings: always has ``rope_type`` and ``rope_theta``."""
    params = hf_config.get("rope_parameters")
    if params:
        params = dict(params)
    else:
        params = dict(hf_config.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf_config.get(theta_key, 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    params.setdefault("rope_theta", 10000.0)
    return params


def inverse_frequencies(rotary_dim: int, params: dict[str, Any]) -> torch.Tensor:
    """Per-channel-pair rotation speeds, after any rope scaling."""
    base = float(params["rope_theta"])
    # Explicitly on the CPU: models are built under a meta-device context.
    steps = torch.arange(0, rotary_dim, 2, dtype=torch.float64, device="cpu")
    inv_freq = 1.0 / (base ** (steps / rotary_dim))
    kind = params["rope_type"]
    if kind == "default":
        pass
    elif kind == "linear":
        inv_freq = inv_freq / float(params["factor"])
    elif kind == "llama3":
        inv_freq = _llama3_scaled(inv_freq, params)
    else:
        raise UnsupportedModelError(
            f"rope scaling type {kind!r} is not supported; supported: default, linear, llama3"
        )
    return inv_freq.float()


def _llama3_scaled(inv_freq: torch.Tensor, params: dict[str, Any]) -> torch.Tensor:
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones are kept, and
    # the band in between is interpolated smoothly between the two.
    factor = float(params["factor"])
    low = float(params.get("low_freq_factor", 1.0))
    high = float(params.get("high_freq_factor", 4.0))
    original = float(params["original_max_position_embeddings"])
    wavelength = 2 * math.pi / inv_freq
    slowed = inv_freq / factor
    smooth = ((original / wavelength) - low) / (high - low)
    blended = (1 - smooth) * slowed + smooth * inv_freq
    out = torch.where(wavelength > original / low, slowed, inv_freq)
    in_band = (wavelength >= original / high) & (wavelength <= original / low)
    return torch.where(in_band, blended, out)


class RotaryEmbedding(nn.Module):
    """Holds the cos/sin table that the attention op applies to q and k."""

    def __init__(self, rotary_dim: int, max_positions: int, params: dict[str, Any]) -> None:
        super().__init__()
        self.rotary_dim = rotary_dim
        self.max_positions = max_positions
        self.params = params
        inverse_frequencies(rotary_dim, params)  # fail early on an unsupported scaling type
        self.register_buffer("cos_sin", torch.empty(max_positions, rotary_dim), persistent=False)

    def reset_buffers(self) -> None:
        """Fill the table; called once the module sits on its final device."""
        inv_freq = inverse_frequencies(self.rotary_dim, self.params).to(self.cos_sin.device)
        self.cos_sin = rotary_cos_sin(inv_freq, self.max_positions)
