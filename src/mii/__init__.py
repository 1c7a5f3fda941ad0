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
    "pipeline",
]
