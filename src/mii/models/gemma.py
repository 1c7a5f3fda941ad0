"""Gemma (v1): the Llama decoder with three twists, all data in ``LlamaSpec``:
RMSNorm scales by (1 + w), embeddings are multiplied by sqrt(hidden_size), and
the gated MLP uses tanh-approximated GELU. The LM head is tied to the embeddings.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mii.models.llama import LlamaForCausalLM, LlamaSpec


class GemmaForCausalLM(LlamaForCausalLM):
    @classmethod
    def spec_from_hf(cls, hf_config: dict[str, Any]) -> LlamaSpec:
        spec = LlamaSpec.from_hf(hf_config)
        # Gemma's config names the MLP activation `hidden_activation`; old
        # configs say "gelu" but the reference implementation uses the tanh form.
        act = hf_config.get("hidden_activation") or "gelu_pytorch_tanh"
        return dataclasses.replace(
            spec,
            hidden_act=act,
            norm_offset=1.0,
            embed_scale=spec.hidden_size**0.5,
            tie_word_embeddings=hf_config.get("tie_word_embeddings", True),
        )
