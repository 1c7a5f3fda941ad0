"""Where running deployments are recorded on this machine: one JSON file per
deployment under ``<cache>/deployments``, readable only by the user."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from mii.cache import cache_dir


def registry_dir() -> Path:
    path = cache_dir() / "deployments"
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


def _file(name: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    return registry_dir() / f"{safe}.json"


def log_path(name: str) -> Path:
    return _file(name).with_suffix(".log")


def record(name: str, info: dict[str, Any]) -> None:
    """Write (atomically) the record of a deployment that is ready."""
    target = _file(name)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"deployment_name": name, **info}, f)
    os.replace(tmp, target)


def lookup(name: str) -> dict[str, Any] | None:
    """The record of a live deployment, or None (stale records are removed)."""
    path = _file(name)
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not pid_alive(info.get("pid", -1)):
        path.unlink(missing_ok=True)
        return None
    return info


def remove(name: str, pid: int | None = None) -> None:
    """Forget a deployment (only if the record is still ours, when ``pid`` is given)."""
    path = _file(name)
    if pid is not None:
        try:
            if json.loads(path.read_text()).get("pid") != pid:
                return
        except (OSError, ValueError):
            return
    path.unlink(missing_ok=True)


def list_deployments() -> list[dict[str, Any]]:
    found = []
    for path in sorted(registry_dir().glob("*.json")):
        info = lookup(path.stem)
        if info is not None:
            found.append(info)
    return found


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, exited but not yet reaped, does not count)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True  # no /proc (not Linux): trust kill()
