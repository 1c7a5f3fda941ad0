"""Connecting a Ray deployment's process to its cluster, checked first: ray.init
waits for an address where nothing listens for minutes (past any startup_timeout,
deaf to signals) with nothing but its own connection warnings."""

from __future__ import annotations

import os
import socket

from mii.errors import DeploymentError
from mii.ray_backend import require_ray
from mii.rpc.deployment_config import DeploymentConfig


def connect(config: DeploymentConfig) -> None:
    """Connect to the deployment's Ray cluster: ``ray_address``; unset, Ray's own
    search (``$RAY_ADDRESS``, the cluster ``ray start`` started on this machine), else
    a new Ray instance of this process's own, which ``ray.shutdown()`` stops again."""
    ray = require_ray()
    # No Ray call may start a Ray instance of its own: a serve.run still waiting in its
    # thread when the deployment gave up (a timeout, a stop) started a local one
    # after ray.shutdown, with its dashboard and agents left running.
    try:
        from ray._private import auto_init_hook
    except ImportError:
        pass
    else:
        auto_init_hook.enable_auto_connect = False
    if config.ray_address in (None, "auto"):
        _check_found_cluster(config.ray_address)
    else:
        _check_reachable(config.ray_address)
        # Ray turns its token authentication on by itself (RAY_AUTH_MODE unset, a token
        # in ~/.ray/auth_token) only for a cluster it finds on its own, yet `ray start`
        # on a machine with a token requires it at an explicit address too. A cluster
        # without authentication ignores the token. (Ray < 2.52 has none: nothing to do.)
        try:
            from ray._private.authentication.authentication_token_setup import (
                maybe_enable_token_auth_if_token_available,
            )
        except ImportError:
            pass
        else:
            maybe_enable_token_auth_if_token_available(warn_if_disabled=False)
    try:
        ray.init(address=config.ray_address)
    except ValueError as err:  # Ray's "Invalid address format: X", naming no option
        raise DeploymentError(
            f"ray_address={config.ray_address!r} (--ray-address) is not an address Ray "
            f"reads ({err}): give the head's HOST:PORT (`ray start --head` prints it), "
            "ray://HOST:10001 (Ray Client), 'auto' or 'local'"
        ) from None
    except ConnectionError as err:  # "auto" with no cluster: Ray's text names its own flag
        raise DeploymentError(
            f"no running Ray cluster found for ray_address={config.ray_address!r} ({err}): "
            "start one with `ray start --head`, pass its address (--ray-address / "
            "ray_address=), or leave ray_address unset for a Ray instance of the "
            "deployment's own"
        ) from None


# Seconds to wait for a TCP answer at the cluster's address before ray.init, which
# retries an address where nothing listens for minutes (past any startup_timeout)
# with nothing but its own connection warnings.
REACH_TIMEOUT_S = 10.0


def _check_found_cluster(address: str | None) -> None:
    """The cluster Ray would find on its own (``$RAY_ADDRESS``, else the one ``ray
    start`` recorded on this machine) must answer: one stopped without ``ray stop``
    left its record, and ray.init waited on it for ever, deaf to signals."""
    try:
        from ray._private.services import get_ray_address_from_environment
    except ImportError:  # (a Ray that finds it otherwise: ray.init's own search)
        return
    try:
        found = get_ray_address_from_environment(address, None)
    except Exception:  # none found for "auto": ray.init says so
        return
    if found in (None, "auto", "local"):
        return  # a new Ray instance of this process's own
    where = (
        "$RAY_ADDRESS"
        if os.environ.get("RAY_ADDRESS")
        else "the cluster `ray start` recorded on this machine (stopped without `ray stop`?)"
    )
    _check_reachable(found, f" ({where})")


def _check_reachable(address: str, where: str = "") -> None:
    """DeploymentError naming ``address`` (``host:port`` or ``ray://host:port``)
    when nothing accepts a connection there; ``where``: how it was found."""
    bare = address.removeprefix("ray://")
    host, _, port = bare.rpartition(":")
    if "://" in bare or not host or not port.isdigit() or (":" in host and "]" not in host):
        return  # a form Ray reads on its own (another scheme, an unbracketed IPv6 address)
    try:
        socket.create_connection((host.strip("[]"), int(port)), REACH_TIMEOUT_S).close()
    except OSError as err:
        raise DeploymentError(
            f"cannot reach a Ray cluster at {address!r}{where} ({err.strerror or err}): is "
            "`ray start --head` running there, on that port? (ray_address / --ray-address)"
        ) from None
