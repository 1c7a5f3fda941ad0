"""mii: fast, embeddable, asynchronous LLM inference.

Public API: :func:`pipeline`, :class:`AsyncEngine`, :class:`Response`.
"""

from typing import TYPE_CHECKING

from mii.config import EngineConfig, GenerateParams
from mii.errors import (
    AmbiguousDeploymentError,
    AuthenticationError,
    DeploymentError,
    DeploymentNotFoundError,
    DeploymentUnresponsiveError,
    EngineClosedError,
    ForkedEngineError,
    InvalidRequestError,
    MiiError,
    ModelLoadError,
    NoReplicaError,
    RequestTimeoutError,
    RequestTooLargeError,
    ServerOverloadedError,
    UnavailableError,
    UnsupportedModelError,
)
from mii.response import Response

if TYPE_CHECKING:
    from mii.async_chat import AsyncEngine
    from mii.pipeline import Pipeline, pipeline

# torch is imported on first use of these, so that `import mii` (and `mii --help`) is quick.
_LAZY = {
    "AsyncEngine": "mii.async_chat",
    "Pipeline": "mii.pipeline",
    "pipeline": "mii.pipeline",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'mii' has no attribute {name!r}{_LEGACY.get(name, '')}")


# DeepSpeed-MII's API before its 0.1, which ported code still calls.
_LEGACY = {
    "deploy": " (DeepSpeed-MII's legacy mii.deploy: mii.serve(model, deployment_name=...) here)",
    "mii_query_handle": (
        " (DeepSpeed-MII's legacy mii.mii_query_handle(name).query(...): "
        "mii.client(name).generate(prompts, ...) here)"
    ),
}


def __dir__() -> list[str]:
    # The lazy names too (tab completion in IPython/Jupyter lists what dir() says).
    return sorted({*globals(), *_LAZY})


def serve(model_name_or_path: str, **options):
    """Start a persistent deployment; see :func:`mii.rpc.launcher.serve`."""
    from mii.rpc.launcher import serve as _serve

    return _serve(model_name_or_path, **options)


def client(model_or_deployment_name: str, api_key: str | None = None):
    """Connect to a running deployment; see :func:`mii.rpc.client.client`."""
    from mii.rpc.client import client as _client

    return _client(model_or_deployment_name, api_key=api_key)


def load_ipython_extension(ipython) -> None:
    """``%load_ext mii`` in IPython/Jupyter: the ``%mii`` and ``%%mii`` magics."""
    from mii.magic import load_ipython_extension as _load

    _load(ipython)


def unload_ipython_extension(ipython) -> None:
    """``%unload_ext mii``: frees a model loaded with ``%mii load``."""
    from mii.magic import unload_ipython_extension as _unload

    _unload(ipython)


from mii.version import __version__ as __version__  # noqa: E402 (re-exported)

__all__ = [
    "AmbiguousDeploymentError",
    "AsyncEngine",
    "AuthenticationError",
    "DeploymentError",
    "DeploymentNotFoundError",
    "DeploymentUnresponsiveError",
    "EngineClosedError",
    "EngineConfig",
    "ForkedEngineError",
    "GenerateParams",
    "InvalidRequestError",
    "MiiError",
    "ModelLoadError",
    "NoReplicaError",
    "Pipeline",
    "RequestTimeoutError",
    "RequestTooLargeError",
    "Response",
    "ServerOverloadedError",
    "UnavailableError",
    "UnsupportedModelError",
    "client",
    "load_ipython_extension",
    "pipeline",
    "serve",
]
