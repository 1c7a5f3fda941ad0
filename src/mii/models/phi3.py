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
from mii.models.rope import scaled_max_positions


class Phi3ForCausalLM(LlamaForCausalLM):
    weight_map = (
        (".qkv_proj.", ".qkv_proj.", "packed"),
        (".gate_up_proj.", ".gate_up_proj.", "packed"),
    )

    @classmethod
    def spec_from_hf(cls, hf_config: dict[str, Any]) -> LlamaSpec:
        spec = LlamaSpec.from_hf(hf_config)
        rope = dict(spec.rope)
        if rope["rope_type"] == "yarn":
            rope["rope_type"] = "longrope"
        if rope["rope_type"] in ("llama3", "longrope"):
            # Phi3Config declares original_max_position_embeddings (default 4096), and
            # transformers then takes it over the one in the rope settings.
            original = hf_config.get("original_max_position_embeddings", 4096)
            rope["original_max_position_embeddings"] = original
        max_positions = scaled_max_positions(hf_config.get("max_position_embeddings", 2048), rope)
        return dataclasses.replace(spec, rope=rope, max_positions=max_positions)

    def __init__(self, hf_config: dict[str, Any]) -> None:
        super().__init__(hf_config)
        if self.spec.rope["rope_type"] == "longrope":
            self.rope_recompute_at = int(self.spec.rope["original_max_position_embeddings"])
