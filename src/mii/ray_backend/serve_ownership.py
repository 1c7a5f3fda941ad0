"""Whether mii started the cluster's Ray Serve.

The deployment that started Serve may end before others that joined it (a gRPC-only
one started it, a second joined): the last mii application to end then shuts Serve
down, not only the one that started it (its controller was left running). A Serve
that mii did not start (the platform's own) is never mii's to stop. The mark is the
controller's actor id in Ray's cluster-wide key-value store, so a Serve restarted by
someone else is not taken for mii's.
"""

from __future__ import annotations

import contextlib

_NAMESPACE = b"mii"
_KEY = b"serve-controller-started-by-mii"


def _controller_id() -> bytes | None:
    """The running Serve controller's actor id, else None."""
    import ray
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    try:  # (Serve's own names for its controller: private, so any failure is "none")
        actor = ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        return actor._actor_id.hex().encode()
    except Exception:
        return None


def mark_started_by_mii() -> None:
    """Record that a mii deployment started the Serve now running."""
    from ray.experimental.internal_kv import _internal_kv_put

    controller = _controller_id()
    # (no mark when the store fails: Serve then outlives the deployments, as before)
    with contextlib.suppress(Exception):
        if controller is not None:
            _internal_kv_put(_KEY, controller, overwrite=True, namespace=_NAMESPACE)


def started_by_mii() -> bool:
    """Whether a mii deployment started the Serve now running."""
    from ray.experimental.internal_kv import _internal_kv_get

    controller = _controller_id()
    try:
        mark = _internal_kv_get(_KEY, namespace=_NAMESPACE)
    except Exception:
        return False
    return controller is not None and mark == controller
