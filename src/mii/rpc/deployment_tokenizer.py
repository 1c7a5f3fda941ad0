"""A running deployment's tokenizer and chat template, loaded in another process
from the deployment's record (``mii generate NAME --chat``): the same ones its
OpenAI chat route applies, so a chat turn sent as token ids over gRPC is the
prompt that route would build."""

from __future__ import annotations

from typing import Any

from mii.rpc.deployment_config import DeploymentConfig

# The engine options that choose the tokenizer (the others load nothing of it).
TOKENIZER_OPTIONS = ("revision", "tokenizer", "trust_remote_code")


def tokenizer_source(config: DeploymentConfig) -> dict[str, Any]:
    """What the deployment's record keeps to load its tokenizer: JSON values only."""
    options = {k: config.engine_options[k] for k in TOKENIZER_OPTIONS if k in config.engine_options}
    return {"model": config.model, "chat_template": config.chat_template, "options": options}


def load_recorded_tokenizer(source: dict[str, Any]):
    """The tokenizer (with the deployment's chat template) that ``source`` describes."""
    from mii.rpc.http.server import load_gateway_tokenizer

    template = source.get("chat_template")
    extra = {"chat_template": template} if template is not None else {}
    config = DeploymentConfig.parse(source["model"], **source.get("options", {}), **extra)
    return load_gateway_tokenizer(config)
