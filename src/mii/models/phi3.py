"""Phi-3: the Llama decoder, with q/k/v and gate/up already fused in the
checkpoint (``qkv_proj``, ``gate_up_proj``). The 128k-context variants use
"longrope" scaling (``rope.py``); like transformers' Phi3Config, the older names
"su" and "yarn" in a Phi-3 config mean longrope.

transformers' Phi-3 ``generate`` (unlike Llama's) drops its KV cache when a
sequence first outgrows ``original_max_position_embeddings`` and recomputes it
with the long factors; ``rope_recompute_at`` makes mii's scheduler do the same.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mii.models.llama import LlamaForCausalLM, LlamaSpec


class Phi3ForCausalLM(LlamaForCausalLM):
    weight_map = (
        (".qkv_proj.", ".qkv_proj.", "packed"),
        (".gate_up_proj.", ".gate_up_proj.", "packed"),
    )

    @classmethod
    def spec_from_hf(cls, hf_config: dict[str, Any]) -> LlamaSpec:
        if "original_max_position_embeddings" not in hf_config:
            # Phi3Config's default, which transformers uses for longrope then.
            hf_config = {**hf_config, "original_max_position_embeddings": 4096}
        spec = LlamaSpec.from_hf(hf_config)
        if spec.rope["rope_type"] == "yarn":
            rope = {**spec.rope, "rope_type": "longrope"}
            max_positions = hf_config.get("max_position_embeddings", 2048)  # not YaRN's
            spec = dataclasses.replace(spec, rope=rope, max_positions=max_positions)
        return spec

    def __init__(self, hf_config: dict[str, Any]) -> None:
        super().__init__(hf_config)
        if self.spec.rope["rope_type"] == "longrope":
            self.rope_recompute_at = int(self.spec.rope["original_max_position_embeddings"])
