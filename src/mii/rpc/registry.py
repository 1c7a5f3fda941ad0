"""Where running deployments are recorded on this machine: one JSON file per
deployment under ``<cache>/deployments``, readable only by the user (files 0600,
folder 0700): a record holds the deployment's API key, for ``mii.client(name)``.

A deployment process also *claims* its name for as long as it lives: an exclusive
``flock`` on ``<name>.lock``, taken before its model loads and released by the
OS when the process ends, however it ends. Two deployments of one name started
at the same moment cannot both run, and a record whose claim nobody holds is
stale even when its pid now belongs to another process."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

from mii.cache import cache_dir
from mii.errors import AmbiguousDeploymentError, DeploymentError, DeploymentNotFoundError

DEFAULT_NAME_SUFFIX = "-mii-deployment"


def default_deployment_name(model: str) -> str:
    """A deployment's name when none is given: the model's last path component
    (``org/model``, ``/ckpt/llama-7b/``, ``dir/m.Q4_K_M.gguf`` -> ``model``,
    ``llama-7b``, ``m.Q4_K_M``), characters other than ``A-Za-z0-9._-`` as ``-``,
    then ``-mii-deployment``: a name that is one segment of a URL path as it is
    (``/mii/{name}``), which a model id with ``/`` is not."""
    base = model.rstrip("/\\").replace("\\", "/").rsplit("/", 1)[-1]
    base = base.removesuffix(".gguf") or "model"
    base = re.sub(r"[^A-Za-z0-9._-]", "-", base).strip(".") or "model"
    return base + DEFAULT_NAME_SUFFIX


def candidate_names(model_or_deployment_name: str) -> list[str]:
    """Names under which ``mii.client(x)`` looks for a deployment: ``x`` itself, the
    default name of model ``x``, and ``f"{x}-mii-deployment"`` (the default of
    mii before names were made URL-safe, and of names given with that suffix)."""
    given = model_or_deployment_name
    names = [given, default_deployment_name(given), given + DEFAULT_NAME_SUFFIX]
    return list(dict.fromkeys(names))


def registry_dir() -> Path:
    path = cache_dir() / "deployments"
    path.mkdir(parents=True, exist_ok=True)
    os.chmod(path, 0o700)
    return path


_MAX_STEM = 200  # a longer encoded name is cut and followed by its hash (file names <= 255 bytes)


def file_stem(name: str) -> str:
    """The file name (without suffix) of a deployment's record and log: ``name``
    percent-encoded, so that distinct names never share a file ("a/b" is
    ``a%2Fb``, "a_b" stays ``a_b``); ASCII letters, digits, ``-_.~`` stay as
    they are. A very long name is cut, and its SHA-256 appended."""
    stem = quote(name, safe="-_.~")
    if stem in ("", ".", ".."):
        stem = stem.replace(".", "%2E") or "%"  # never a directory entry or an empty name
    if len(stem) > _MAX_STEM:  # 150 + 1 + 64 characters: longer than any uncut stem
        stem = f"{stem[:150]}~{hashlib.sha256(name.encode()).hexdigest()}"
    return stem


def _file(name: str) -> Path:
    return registry_dir() / f"{file_stem(name)}.json"


def log_path(name: str) -> Path:
    return _file(name).with_suffix(".log")


def record(name: str, info: dict[str, Any]) -> None:
    """Write (atomically) the record of a deployment: one that serves, or, with
    ``"starting": True`` in ``info``, one whose replicas are still loading."""
    target = _file(name)
    tmp = target.with_suffix(f".tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # it may hold the API key: the user's only, whatever existed
    # "claimed": the writer holds the name's claim, so the record is live exactly as
    # long as the claim is (records of mii before claims, or of a cache folder that
    # cannot be locked, go by their pid only).
    with os.fdopen(fd, "w") as f:
        json.dump({"deployment_name": name, **info, "claimed": name in _claims}, f)
    os.replace(tmp, target)


def _lock_path(name: str) -> Path:
    return _file(name).with_suffix(".lock")


_claims: dict[str, int] = {}  # name -> the descriptor whose lock this process holds


def claim(name: str) -> None:
    """Hold ``name`` for this process until :func:`release` or its end;
    DeploymentError when another live process holds it."""
    fd = os.open(_lock_path(name), os.O_RDWR | os.O_CREAT, 0o600)
    for attempt in range(20):  # claimed() takes a shared lock for a moment: let it go
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _claims[name] = fd
            return
        except BlockingIOError:
            time.sleep(0.005 * (attempt + 1))
        except OSError:  # a file system without locks (some NFS, FUSE): pids only
            os.close(fd)
            return
    os.close(fd)
    raise DeploymentError(
        f"a deployment named {name!r} is already starting or running (see: mii list); "
        "stop it (mii terminate) or choose another deployment_name"
    )


def release(name: str) -> None:
    """Let go of this process's claim on ``name``."""
    fd = _claims.pop(name, None)
    if fd is not None:
        os.close(fd)


@contextmanager
def holding(name: str) -> Iterator[None]:
    """:func:`claim` ``name`` for the ``with`` block (a deployment's whole run)."""
    claim(name)
    try:
        yield
    finally:
        release(name)


def claimed(name: str) -> bool:
    """Whether a live process holds ``name`` (this one included)."""
    if name in _claims:
        return True
    try:
        fd = os.open(_lock_path(name), os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # granted only if nobody claims it
        return False
    except OSError:  # held (BlockingIOError), or a file system without locks: assume so
        return True
    finally:
        os.close(fd)


def lookup(name: str, include_starting: bool = False) -> dict[str, Any] | None:
    """The record of a live deployment, or None (stale records are removed). One
    still starting (its replicas load the model) only with ``include_starting``."""
    path = _file(name)
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not pid_alive(info.get("pid", -1)) or (info.get("claimed") and not claimed(name)):
        path.unlink(missing_ok=True)
        return None
    if info.get("starting") and not include_starting:
        return None
    return info


def find(model_or_deployment_name: str, include_starting: bool = False) -> dict[str, Any] | None:
    """The record of the live deployment that ``model_or_deployment_name`` names:
    by one of its :func:`candidate_names`, else, when exactly one deployment has
    it, by a model name it serves the model under (``served_model_name``, the
    OpenAI API's name) or by the model it was started with (a hub id, or a path
    to the same checkpoint) whatever its deployment name (AmbiguousDeploymentError
    naming them when several do). A deployment still starting, by its names, only
    with ``include_starting``."""
    given = model_or_deployment_name
    local_model = os.path.exists(os.path.expanduser(given))
    for name in candidate_names(given):
        info = lookup(name, include_starting)
        if info is None:
            continue
        if name != given and local_model and not _serves_model(info, given):
            continue  # the default name of another checkpoint in a folder of that name
        return info
    # (a deployment that is starting or stopping serves nothing)
    live = [d for d in list_deployments() if not serves_nothing(d)]
    for serves in (_serves_name, _serves_model):
        serving = [d for d in live if serves(d, given)]
        if len(serving) > 1:
            names = ", ".join(repr(d["deployment_name"]) for d in serving)
            raise AmbiguousDeploymentError(
                f"{len(serving)} deployments serve {given!r} ({names}): name the deployment instead"
            )
        if serving:
            return serving[0]
    return None


def serves_nothing(info: dict[str, Any]) -> bool:
    """Whether a deployment's record says it is starting (loading its model) or stopping."""
    return bool(info.get("starting") or info.get("stopping"))


def _serves_name(info: dict[str, Any], name: str) -> bool:
    return name in (info.get("served_model_name") or ())


def _serves_model(info: dict[str, Any], model: str) -> bool:
    """Whether the deployment was started with ``model``: a path to the same local
    checkpoint, or the same hub id. The record's model as made absolute when it was
    started (``tokenizer_source``), never a relative path read in this process's
    working directory."""
    source = info.get("tokenizer_source")
    recorded = source.get("model") if isinstance(source, dict) else None
    if not isinstance(recorded, str) or not model:
        return False
    given = os.path.expanduser(model)
    if os.path.exists(given):  # a local checkpoint: the same one
        return os.path.isabs(recorded) and os.path.realpath(given) == os.path.realpath(recorded)
    # a hub id (recorded as given, not absolute), a trailing slash aside
    return not os.path.isabs(recorded) and recorded.rstrip("/") == model.rstrip("/")


# The bind addresses of every interface.
ANY_HOST = ("0.0.0.0", "::")


def find_by_address(address: str) -> dict[str, Any] | None:
    """The record of the live deployment whose gRPC address is ``address``
    (``host:port``), when exactly one is: loopback names are one host, and a
    deployment bound to every interface (0.0.0.0, ::) answers on loopback too."""
    from mii.rpc.auth import is_loopback

    host, colon, port = address.rpartition(":")
    if not colon or not port.isdigit():
        return None
    host = host.strip("[]").lower()

    def reaches(bound: str) -> bool:
        bound = bound.strip("[]").lower()
        return bound == host or (is_loopback(host) and (is_loopback(bound) or bound in ANY_HOST))

    found = [
        d
        for d in list_deployments()
        if d.get("port") == int(port) and reaches(str(d.get("host", ""))) and not serves_nothing(d)
    ]
    return found[0] if len(found) == 1 else None


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


def require_available(name: str) -> None:
    """DeploymentError, saying what to do, when a deployment named ``name`` is
    running, stopping or starting on this machine."""
    running = lookup(name, include_starting=True)
    if running is not None and running.get("stopping"):
        raise DeploymentError(
            f"a deployment named {name!r} is stopping (it drains its requests, then its "
            "processes exit): start this one once it is gone (mii list shows it until "
            "then) or give this one another name (mii serve: --deployment-name; "
            "mii.serve: deployment_name)"
        )
    if running is not None and running.get("starting"):
        raise DeploymentError(
            f"a deployment named {name!r} is starting (loading its model): stop it "
            f"(mii terminate {name}) or give this one another name "
            "(mii serve: --deployment-name; mii.serve: deployment_name)"
        )
    if running is not None:
        raise DeploymentError(
            f"a deployment named {name!r} is already running; stop it "
            f"(mii terminate {name}) or give this one another name "
            "(mii serve: --deployment-name; mii.serve: deployment_name)"
        )
    if claimed(name):  # (before its first record, or after its last)
        raise DeploymentError(
            f"a deployment named {name!r} is starting or stopping; wait a moment for it "
            "(mii list) or choose another deployment_name"
        )


def mark_stopping(name: str, pid: int) -> None:
    """Record that this process's deployment ``name`` is stopping (draining, then its
    processes exit; the record goes when they have): a new deployment of the name is
    told to wait, not that one "is running"."""
    try:
        info = json.loads(_file(name).read_text())
    except (OSError, ValueError):
        return
    if info.get("pid") != pid or info.get("stopping"):
        return
    info.pop("deployment_name", None)
    info.pop("claimed", None)
    record(name, {**info, "stopping": True})


def list_deployments(include_starting: bool = False) -> list[dict[str, Any]]:
    """The records of the live deployments (with those still starting, if asked)."""
    found = []
    for path in sorted(registry_dir().glob("*.json")):
        try:  # the record names its deployment (a file name is an encoding of it)
            name = json.loads(path.read_text())["deployment_name"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        info = lookup(name, include_starting) if isinstance(name, str) else None
        if info is not None:
            found.append(info)
    return found


def refuse_starting(name: str) -> None:
    """DeploymentNotFoundError when ``name`` names a deployment that is still
    starting: nothing answers at its address until its replicas have loaded the model."""
    info = find(name, include_starting=True)
    if info is not None and info.get("starting"):
        raise DeploymentNotFoundError(
            f"deployment {info['deployment_name']!r} is still starting (its replicas load the "
            "model): try again once mii list shows it ok"
        )


# Hosts that reach this machine's deployments bound to loopback or to every interface.
_LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "0.0.0.0", "::", ""}


def at_address(host: str, port: int) -> dict[str, Any] | None:
    """The record of this machine's running deployment listening at ``host:port``
    (a loopback or wildcard host matches either), or None."""
    host = host.strip("[]")
    for info in list_deployments():
        if int(info["port"]) != port:
            continue
        bound = str(info["host"]).strip("[]")
        if bound == host or (bound in _LOCAL_HOSTS and host in _LOCAL_HOSTS):
            return info
    return None


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
