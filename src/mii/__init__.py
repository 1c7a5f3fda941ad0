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


def load_ipython_extension(ipython) -> None:
    """``%load_ext mii`` in IPython/Jupyter: the ``%mii`` and ``%%mii`` magics."""
    from mii.magic import load_ipython_extension as _load

    _load(ipython)


def unload_ipython_extension(ipython) -> None:
    """``%unload_ext mii``: frees a model loaded with ``%mii load``."""
    from mii.magic import unload_ipython_extension as _unload

    _unload(ipython)


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
    "load_ipython_extension",
    "pipeline",
    "serve",
]
