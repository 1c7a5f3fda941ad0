"""Deployments on a Ray cluster (``mii.serve(..., backend="ray")``): each replica is a
Ray Serve replica running the same :class:`~mii.engine.async_engine.AsyncEngine`.

Ray is an optional dependency: it is imported only when a Ray deployment starts
(:func:`require_ray`), never by ``import mii``. See docs/multi_node.md.
"""

from __future__ import annotations

import sys
from types import ModuleType

from mii.errors import DeploymentError
from mii.rpc.ray_options import INSTALL_HINT


def require_ray() -> ModuleType:
    """The ``ray`` module with Ray Serve, or a DeploymentError that says how to install it."""
    try:
        import ray
        from ray import serve  # noqa: F401  (ray without the [serve] extra lacks its deps)
    except ImportError as err:
        raise DeploymentError(
            f"backend='ray' needs Ray Serve, which is not installed ({err}): {INSTALL_HINT}"
        ) from None
    return ray


def caller_cluster() -> str | None:
    """The address of the Ray cluster this process is connected to (``ray.init()``
    was called here), or None; Ray is not imported for this."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return ray.get_runtime_context().gcs_address
