"""The OpenAI routes' defaults for the sampling options a request leaves out.

As ``vllm serve``'s ``--generation-config auto`` (its default): the model's
``generation_config.json`` holds its makers' recommended sampling (Llama 3
Instruct: temperature 0.6, top_p 0.9), and a request that does not set
``temperature``, ``top_p``, ``top_k``, ``min_p``, ``repetition_penalty`` or
``max_tokens`` gets the file's value (``max_new_tokens`` for ``max_tokens``; a
completion without ``max_tokens`` keeps OpenAI's 16, as in vLLM) instead of
OpenAI's default. ``generation_config="vllm"`` (or ``"none"``): OpenAI's
defaults only; a folder path: that folder's ``generation_config.json``. The gRPC
and ``/mii`` routes keep mii's own defaults (MISSION.md's table).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mii.config import EngineConfig
from mii.errors import MiiError
from mii.rpc.http.protocol import OpenAIRequest

if TYPE_CHECKING:
    from mii.rpc.deployment_config import DeploymentConfig

# generation_config.json's name -> the OpenAI request field it is the default of
DEFAULTED_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}
NO_DEFAULTS = ("vllm", "none")


def load_sampling_defaults(engine: EngineConfig, generation_config: str) -> dict[str, Any]:
    """Request field -> default, from the generation config that ``generation_config``
    names ("auto": the model's; a folder; "vllm" / "none": no defaults). A model
    without a generation_config.json (a GGUF file's) has none."""
    if generation_config in NO_DEFAULTS:
        return {}
    if generation_config == "auto":
        from mii.models.loader import resolve_model_dir

        folder = resolve_model_dir(engine.model, engine.revision, weights=False)
    else:
        folder = Path(generation_config).expanduser()
    if not (folder / "generation_config.json").is_file():
        return {}
    from transformers import GenerationConfig

    # (the values the file sets, as vLLM reads them: those unlike transformers' defaults)
    recommended = GenerationConfig.from_pretrained(folder).to_diff_dict()
    return {
        request_field: recommended[name]
        for name, request_field in DEFAULTED_FIELDS.items()
        if recommended.get(name) is not None
    }


def gateway_sampling_defaults(config: DeploymentConfig) -> dict[str, Any]:
    """A gateway's defaults (its deployment's ``generation_config``), said on standard
    error when there are any; a generation config that cannot be read gives none, with
    a warning, rather than stopping the deployment."""
    try:
        defaults = load_sampling_defaults(config.engine_config(), config.generation_config)
    except (OSError, ValueError, MiiError) as err:
        print(
            f"[mii] warning: the generation config ({config.generation_config}) cannot be "
            f"read, so the OpenAI routes keep OpenAI's defaults: {err}",
            file=sys.stderr,
            flush=True,
        )
        return {}
    if defaults:  # as vLLM says it: a user expecting OpenAI's defaults learns why not
        print(
            f"[mii] the OpenAI routes' defaults for fields a request leaves out, from the "
            f"model's generation config: {defaults} (OpenAI's: --generation-config vllm)",
            file=sys.stderr,
            flush=True,
        )
    return defaults


def with_sampling_defaults(body: OpenAIRequest, defaults: dict[str, Any]) -> OpenAIRequest:
    """``body`` with ``defaults`` in the fields it left unset (None: absent, or null).
    As in vLLM, a completion without ``max_tokens`` has 16 (OpenAI's default), which
    the generation config does not replace; ``"max_tokens": null`` takes it."""
    unset = {
        field: value
        for field, value in defaults.items()
        if field in type(body).model_fields and getattr(body, field) is None
    }
    if "max_tokens" in unset and getattr(body, "max_completion_tokens", None) is not None:
        del unset["max_tokens"]  # chat's other name for it was given
    return body.model_copy(update=unset) if unset else body
