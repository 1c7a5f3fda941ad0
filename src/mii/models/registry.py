"""Which implementation serves which Hugging Face ``model_type``.

Implementations are imported only when used, so one family's import cost or
breakage never touches another.
"""

from __future__ import annotations

import importlib

from mii.errors import UnsupportedModelError
from mii.models.base import CausalLM

# model_type -> "module:Class" under mii.models
MODEL_REGISTRY: dict[str, str] = {
    "llama": "llama:LlamaForCausalLM",
    "mistral": "llama:LlamaForCausalLM",
    "qwen2": "llama:LlamaForCausalLM",
    "qwen3": "llama:LlamaForCausalLM",
    "falcon": "falcon:FalconForCausalLM",
    "opt": "opt:OPTForCausalLM",
    "phi": "phi:PhiForCausalLM",
    "mixtral": "mixtral:MixtralForCausalLM",
    "qwen2_moe": "mixtral:Qwen2MoeForCausalLM",
    "qwen": "qwen:QWenLMHeadModel",
    "gemma": "gemma:GemmaForCausalLM",
    "phi3": "phi3:Phi3ForCausalLM",
}


def supported_model_types() -> list[str]:
    return sorted(MODEL_REGISTRY)


def model_class(model_type: str | None) -> type[CausalLM]:
    """The class for ``model_type``; an error listing the supported types otherwise."""
    if model_type not in MODEL_REGISTRY:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported model types: "
            f"{', '.join(supported_model_types())}"
        )
    module_name, class_name = MODEL_REGISTRY[model_type].split(":")
    module = importlib.import_module(f"mii.models.{module_name}")
    return getattr(module, class_name)
