"""A deployment's tokenizer with its chat template: loaded by its gateway (every
route that applies a chat template) and, from the deployment's record, by another
process (``mii generate NAME --chat``), so that a chat turn sent as token ids over
gRPC is the prompt the OpenAI chat route would build."""

from __future__ import annotations

import os
from typing import Any

from mii.config import EngineConfig

# The engine options that choose the tokenizer (the others load nothing of it).
TOKENIZER_OPTIONS = ("revision", "tokenizer", "trust_remote_code")


def load_chat_tokenizer(engine: EngineConfig, chat_template: str | None):
    """The model's tokenizer without its weights; ``chat_template`` (the template's
    text), when given, in place of the tokenizer's own."""
    from mii.models.loader import load_tokenizer, resolve_model_dir

    model_dir = resolve_model_dir(engine.model, engine.revision, weights=False)
    tokenizer = load_tokenizer(model_dir, engine.tokenizer, engine.trust_remote_code)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def tokenizer_source(model: str, engine_options: dict[str, Any], chat_template: str | None):
    """What a deployment's record keeps to load its tokenizer: JSON values only; local
    paths made absolute (the record is read from other working directories)."""
    options = {k: engine_options[k] for k in TOKENIZER_OPTIONS if k in engine_options}
    if isinstance(options.get("tokenizer"), str) and os.path.exists(options["tokenizer"]):
        options["tokenizer"] = os.path.abspath(options["tokenizer"])
    model = os.path.abspath(model) if os.path.exists(model) else model
    return {"model": model, "chat_template": chat_template, "options": options}


def load_recorded_tokenizer(source: dict[str, Any]):
    """The tokenizer (with the deployment's chat template's text, used as it is) that
    a record's ``source`` describes."""
    engine = EngineConfig.parse(source["model"], **source.get("options", {}))
    return load_chat_tokenizer(engine, source.get("chat_template"))


def recorded_chat_tokenizer(target: str, how: str = "POST /v1/chat/completions"):
    """The chat tokenizer of the deployment that ``target`` names (or whose gRPC
    ``host:port`` it is), from its record on this machine. Raises
    :class:`~mii.errors.DeploymentError` when there is no record with a tokenizer
    source (another machine's ``host:port``, a deployment started by an older mii)
    or it cannot be loaded here; the message names ``how`` to chat instead."""
    from mii.errors import DeploymentError, MiiError
    from mii.rpc import registry

    info = registry.find(target) or registry.find_by_address(target)
    source = (info or {}).get("tokenizer_source")
    if source is None:
        raise DeploymentError(
            f"chatting with a deployment loads its chat template from its record on this "
            f"machine, and {target!r} has none here (stopped? mii list shows the running "
            f"ones; another machine's host:port, or a deployment started by an older mii): "
            f"send the conversation to its OpenAI "
            f"route ({how}) instead"
        )
    try:
        return load_recorded_tokenizer(source)
    except (MiiError, OSError, ValueError) as err:
        raise DeploymentError(
            f"could not load the chat template of deployment {target!r} here (from "
            f"{source['model']!r}): {err}; its OpenAI route ({how}) applies it on the server"
        ) from None
