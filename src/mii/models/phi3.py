"""Phi-3: the Llama decoder, with q/k/v and gate/up already fused in the
checkpoint (``qkv_proj``, ``gate_up_proj``). Long-context "longrope" scaling is
not implemented yet and is refused with a clear error.
"""

from __future__ import annotations

from typing import Any

from mii.errors import UnsupportedModelError
from mii.models.llama import LlamaForCausalLM, LlamaSpec


class Phi3ForCausalLM(LlamaForCausalLM):
    weight_map = (
        (".qkv_proj.", ".qkv_proj.", "packed"),
        (".gate_up_proj.", ".gate_up_proj.", "packed"),
    )

    @classmethod
    def spec_from_hf(cls, hf_config: dict[str, Any]) -> LlamaSpec:
        spec = LlamaSpec.from_hf(hf_config)
        if spec.rope["rope_type"] in ("longrope", "su", "yarn"):
            raise UnsupportedModelError(
                f"Phi-3 rope scaling {spec.rope['rope_type']!r} (the 128k-context variants) is "
                "not supported yet; the 4k/8k-context Phi-3 checkpoints are"
            )
        return spec
