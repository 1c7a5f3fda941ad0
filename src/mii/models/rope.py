"""Rotary embedding frequencies and the cos/sin tables the attention op reads,
with every rope scaling transformers implements for mii's families: ``linear``,
``llama3``, ``yarn``, ``longrope`` and ``dynamic`` (NTK); the last three live in
``rope_scaling.py``.

Reads both the Transformers 4 config keys (``rope_theta``, ``rope_scaling``) and
the Transformers 5 key (``rope_parameters``), since published checkpoints use
either.
"""

from __future__ import annotations

import math
import weakref
from typing import Any

import torch
from torch import nn

from mii.errors import UnsupportedModelError
from mii.models import rope_scaling
from mii.ops.rotary import rotary_cos_sin

SUPPORTED = ("default", "linear", "llama3", "yarn", "longrope", "dynamic")
# Settings each scaling cannot do without (YaRN's factor may be null: DeepSeek-V3
# style, the ratio of the two context lengths).
REQUIRED = {
    "linear": ("factor",),
    "llama3": ("factor",),
    "dynamic": ("factor",),
    "longrope": ("short_factor", "long_factor"),
}
# Scalings whose rotation depends on the sequence length (see rope_scaling.py).
LENGTH_DEPENDENT = ("longrope", "dynamic")
# Every layer of a model reads the same table: build it once and share it (a
# 128k-position table is 64 MB, per layer if each built its own). Entries go with
# the last module that holds them.
_TABLES: weakref.WeakValueDictionary[tuple, torch.Tensor] = weakref.WeakValueDictionary()


def rope_parameters(hf_config: dict[str, Any], theta_key: str = "rope_theta") -> dict[str, Any]:
    """Normalised rope settings: always has ``rope_type`` and ``rope_theta``."""
    params = hf_config.get("rope_parameters")
    if params:
        params = dict(params)
    else:
        params = dict(hf_config.get("rope_scaling") or {})
        params.setdefault("rope_theta", hf_config.get(theta_key, 10000.0))
    params["rope_type"] = params.get("rope_type") or params.get("type") or "default"
    if params["rope_type"] == "su":  # longrope's name in the first Phi-3 128k configs
        params["rope_type"] = "longrope"
    params.setdefault("rope_theta", 10000.0)
    max_len = hf_config.get("max_position_embeddings", 2048)
    params.setdefault("max_position_embeddings", max_len)
    if params["rope_type"] in ("llama3", "yarn", "longrope"):
        # As transformers' standardize_rope_params (a top-level value counts only in
        # configs that declare it, like Phi-3's: see phi3.py).
        params.setdefault("original_max_position_embeddings", max_len)
    return params


# The shortest context the long-context scalings serve: their tables are cheap
# (one per model), and a small test config would otherwise refuse lengths that
# transformers runs.
MIN_SCALED_POSITIONS = 2048


def scaled_max_positions(max_positions: int, params: dict[str, Any]) -> int:
    """The longest context a scaling serves. As vLLM derives it, dynamic NTK extends
    ``max_position_embeddings`` by ``factor`` and YaRN the original length by
    ``factor``; longrope's ``max_position_embeddings`` is already the long one.
    These three serve at least ``MIN_SCALED_POSITIONS``; other types keep
    ``max_position_embeddings``."""
    kind, factor = params["rope_type"], params.get("factor") or 1.0
    if kind == "dynamic":
        scaled = int(max_positions * factor)
    elif kind == "yarn":
        scaled = int(params["original_max_position_embeddings"] * factor)
    elif kind == "longrope":
        scaled = max_positions
    else:
        return max_positions
    return max(max_positions, scaled, MIN_SCALED_POSITIONS)


def inverse_frequencies(rotary_dim: int, params: dict[str, Any]) -> torch.Tensor:
    """Per-channel-pair rotation speeds, after any rope scaling."""
    base = float(params["rope_theta"])
    # Explicitly on the CPU: models are built under a meta-device context.
    steps = torch.arange(0, rotary_dim, 2, dtype=torch.float64, device="cpu")
    inv_freq = 1.0 / (base ** (steps / rotary_dim))
    kind = params["rope_type"]
    missing = [key for key in REQUIRED.get(kind, ()) if params.get(key) is None]
    if missing:
        raise UnsupportedModelError(
            f"rope scaling {kind!r} needs {', '.join(map(repr, missing))} in the config's "
            "rope_scaling (or rope_parameters)"
        )
    if kind == "default":
        pass
    elif kind == "linear":
        inv_freq = inv_freq / float(params["factor"])
    elif kind == "llama3":
        inv_freq = _llama3_scaled(inv_freq, params)
    elif kind == "yarn":
        return rope_scaling.yarn_frequencies(rotary_dim, params)[0]
    elif kind == "longrope":
        return rope_scaling.longrope_frequencies(rotary_dim, params, long=False)
    elif kind == "dynamic":
        return rope_scaling.dynamic_ntk_initial_frequencies(rotary_dim, params)
    else:
        raise UnsupportedModelError(
            f"rope scaling type {kind!r} is not supported; supported: {', '.join(SUPPORTED)}"
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
    """Holds the cos/sin table that the attention op applies to q and k.

    ``table(positions, rope_lens)`` gives the op a table and each token's row in
    it. For most scalings that is one row per position. LongRoPE's table holds
    the short-factor rows for positions below the original context, then one
    long-factor row per position. Dynamic NTK rotates each token by a base that
    depends on its length, so its rows are computed per pass, one per token.
    """

    def __init__(self, rotary_dim: int, max_positions: int, params: dict[str, Any]) -> None:
        super().__init__()
        self.rotary_dim = rotary_dim
        self.max_positions = max_positions
        self.params = params
        self.kind = params["rope_type"]
        inverse_frequencies(rotary_dim, params)  # fail early on an unsupported scaling type
        rows = max_positions
        if self.kind == "longrope":
            # Short-factor rows serve only lengths up to the original context.
            self.short_rows = min(int(params["original_max_position_embeddings"]), max_positions)
            rope_scaling.longrope_frequencies(rotary_dim, params, long=True)  # check the lengths
            rows += self.short_rows
        elif self.kind == "dynamic":
            # Unscaled rows serve only lengths up to max_position_embeddings.
            rows = min(int(params["max_position_embeddings"]), max_positions)
        self.register_buffer("cos_sin", torch.empty(rows, rotary_dim), persistent=False)

    @property
    def length_dependent(self) -> bool:
        """Whether ``table`` needs each token's sequence length (``rope_lens``)."""
        return self.kind in LENGTH_DEPENDENT

    def reset_buffers(self) -> None:
        """Fill the table; called once the module sits on its final device."""
        key = (self.rotary_dim, self.max_positions, repr(self.params), str(self.cos_sin.device))
        table = _TABLES.get(key)
        if table is None:
            table = _TABLES[key] = self._build_table()
        self.cos_sin = table

    def _build_table(self) -> torch.Tensor:
        device = self.cos_sin.device
        inv_freq = inverse_frequencies(self.rotary_dim, self.params).to(device)
        if self.kind == "yarn":
            scale = rope_scaling.yarn_frequencies(self.rotary_dim, self.params)[1]
            return rotary_cos_sin(inv_freq, self.max_positions, scale)
        elif self.kind == "longrope":
            scale = rope_scaling.longrope_attention_factor(self.params)
            long = rope_scaling.longrope_frequencies(self.rotary_dim, self.params, long=True)
            short = rotary_cos_sin(inv_freq, self.short_rows, scale)
            return torch.cat([short, rotary_cos_sin(long.to(device), self.max_positions, scale)])
        return rotary_cos_sin(inv_freq, self.cos_sin.shape[0])

    def table(
        self, positions: torch.Tensor, rope_lens: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos/sin table, each token's row in it) for tokens at ``positions``.

        ``rope_lens``: each token's sequence length as transformers' length-dependent
        scalings see it, ``max(position + 1, prompt length)``; None means
        ``position + 1``, which is right for decode tokens (CUDA graphs pass None).
        """
        if not self.length_dependent:
            return self.cos_sin, positions
        lengths = positions + 1 if rope_lens is None else rope_lens
        if self.kind == "longrope":
            long = lengths > self.params["original_max_position_embeddings"]
            return self.cos_sin, torch.where(long, positions + self.short_rows, positions)
        # dynamic: the base grows with the length past max_position_embeddings.
        scaled = rope_scaling.dynamic_ntk_cos_sin(self.rotary_dim, self.params, positions, lengths)
        unscaled = self.cos_sin.index_select(0, positions.clamp(max=self.cos_sin.shape[0] - 1))
        grown = (lengths > self.params["max_position_embeddings"])[:, None]
        rows = torch.where(grown, scaled, unscaled)
        return rows, torch.arange(positions.shape[0], device=positions.device)
