"""mii: fast, embeddable, asynchronous LLM inference.

Public API: :func:`pipeline`, :class:`AsyncEngine`, :class:`Response`.
"""

from mii.config import EngineConfig, GenerateParams
from mii.engine.async_engine import AsyncEngine
from mii.errors import (
    EngineClosedError,
    InvalidRequestError,
    MiiError,
    ModelLoadError,
    RequestTooLargeError,
    UnsupportedModelError,
)
from mii.pipeline import Pipeline, pipeline
from mii.response import Response


def serve(model_name_or_path: str, **options):
    """Start a persistent deployment; see :func:`mii.rpc.launcher.serve`."""
    from mii.rpc.launcher import serve as _serve

    return _serve(model_name_or_path, **options)


def client(model_or_deployment_name: str):
    """Connect to a running deployment; see :func:`mii.rpc.client.client`."""
    from mii.rpc.client import client as _client

    return _client(model_or_deployment_name)


__version__ = "0.1.0"

__all__ = [
    "AsyncEngine",
    "EngineClosedError",
    "EngineConfig",
    "GenerateParams",
    "InvalidRequestError",
    "MiiError",
    "ModelLoadError",
    "Pipeline",
    "RequestTooLargeError",
    "Response",
    "UnsupportedModelError",
    "client",
    "pipeline",
    "serve",
]
