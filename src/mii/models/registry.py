"""Which implementation serves which Hugging Face ``model_type``."""

from __future__ import annotations

from mii.errors import UnsupportedModelError
from mii.models.base import CausalLM
from mii.models.llama import LlamaForCausalLM

MODEL_REGISTRY: dict[str, type[CausalLM]] = {
    "llama": LlamaForCausalLM,
    "mistral": LlamaForCausalLM,
    "qwen2": LlamaForCausalLM,
}


def model_class(model_type: str | None) -> type[CausalLM]:
    """The class for ``model_type``; an error listing the supported types otherwise."""
    if model_type not in MODEL_REGISTRY:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported; supported model types: "
            f"{', '.join(sorted(MODEL_REGISTRY))}"
        )
    return MODEL_REGISTRY[model_type]
