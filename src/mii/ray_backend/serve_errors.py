"""Ray Serve's failures to start a deployment's application, said in words: why its
deployments did not come up, and why the controller refused it."""

from __future__ import annotations

import re


def start_failure(app: str) -> str | None:
    """Why the application's deployments failed to start: the last line of the error
    each one reports (a replica's constructor raised it: a bad model, ...)."""
    from ray import serve

    try:
        status = serve.status().applications[app]
    except Exception:
        return None
    reasons = []
    for deployment, info in status.deployments.items():
        lines = [line.strip() for line in (info.message or "").splitlines() if line.strip()]
        if lines and info.status != "HEALTHY":
            reasons.append(f"{deployment}: {lines[-1]}")
    return "; ".join(reasons) or None


# Serve's words when an application already holds the HTTP route prefix asked for.
_PREFIX_TAKEN = re.compile(r'Prefix (\S+) is being used by application "([^"]*)"')
_TERMINAL_COLOURS = re.compile(r"\x1b\[[0-9;]*m")


def prefix_taken(app: str, prefix: str) -> str:
    """The refusal of an HTTP API where the application ``app`` holds ``prefix``."""
    return (
        f"Ray Serve's HTTP proxy on this cluster already serves the deployment {app!r} at "
        f"{prefix}, where mii's HTTP API would go (one per cluster): start this one without "
        "it (enable_restful_api=False; mii serve --no-enable-restful-api) and reach it with "
        "mii.client, or terminate that one"
    )


def root_holder() -> str | None:
    """The Serve application that holds the HTTP root "/" (None: none, or Serve's
    details could not be read: serve.run's own refusal remains)."""
    from ray.serve.context import _get_global_client

    try:  # (a private API of Serve's, the details `serve status` shows)
        client = _get_global_client(raise_if_no_controller_running=False)
        applications = client.get_serve_details()["applications"] if client else {}
    except Exception:
        return None
    for name, app in applications.items():
        if app.get("route_prefix") == "/":
            return name
    return None


def serve_refusal(err: BaseException) -> str:
    """Why Serve's controller refused the application, in words (a RayTaskError's
    str starts with the controller's call and colour codes; the cause ends it)."""
    text = _TERMINAL_COLOURS.sub("", str(err))
    taken = _PREFIX_TAKEN.search(text)
    if taken:
        return prefix_taken(app=taken.group(2), prefix=taken.group(1))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return f"Ray Serve refused the deployment: {lines[-1] if lines else type(err).__name__}"
