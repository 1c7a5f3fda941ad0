"""``mii terminate`` of a deployment that does not answer: signals to its processes.

A deployment on this machine has a record (``mii.rpc.registry``) naming its
process and its replicas'. The deployment's own pid is checked by the record's
claim (a lock only that process holds); a replica's pid is trusted only while
that process is a child of the deployment's, since a replica the supervisor gave
up on keeps its old pid in the record, free for the system to reuse.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from mii.cli.errors import CliError


def deployment_pids(info: dict[str, Any]) -> list[int]:
    """The deployment's pid and those of its replicas that are still its children."""
    pid = info["pid"]
    return [pid, *(p for p in info.get("replica_pids", []) if _parent(p) == pid)]


def _parent(pid: int) -> int | None:
    """The parent of ``pid`` (Linux /proc), or None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        return None


def _local_pids(name: str, info: dict[str, Any] | None, what: str) -> list[int]:
    """The processes to signal; CliError when there are none this command may signal."""
    if info is None:
        raise CliError(
            f"{what} needs the record of {name} on this machine (its process ids): run "
            "mii terminate where the deployment runs, by its name"
        )
    if info.get("backend") == "ray":  # its replicas are Ray's, on the cluster
        raise CliError(
            f"{name} runs on a Ray cluster: its replicas are not processes of this machine "
            f"to signal; remove its Serve application with `serve delete {name}` (Ray's "
            f"command line) and stop its driver, process {info['pid']}"
        )
    return deployment_pids(info)


def signal_unresponsive(
    name: str, info: dict[str, Any] | None, err: Exception, timeout: float
) -> int:
    """A deployment that did not answer Terminate: SIGTERM (then SIGCONT, for a
    stopped one) to its processes, as Ctrl-C on ``mii serve`` would (it drains),
    and wait ``timeout`` s for them. One already stopping is only waited for (a
    second stop request would cut its drain short)."""

    pids = _local_pids(name, info, "a deployment that does not answer")
    if info and info.get("stopping"):
        print(f"{err}; it is stopping already: waiting for it", file=sys.stderr)
    else:
        print(f"{err}; sending SIGTERM to its processes {pids}", file=sys.stderr)
        send(pids, signal.SIGTERM)
        send(pids, signal.SIGCONT)  # a stopped process acts on SIGTERM once continued
    _wait_gone(name, pids, timeout)
    print(f"terminated {name} (with SIGTERM: it did not answer)")
    return 0


def stop_starting(info: dict[str, Any], timeout: float) -> int:
    """A deployment still loading its model: SIGTERM to its processes (it stops its
    replicas, which exit at once while they load; a Ray deployment's driver deletes
    its Serve application) and wait ``timeout`` s for them."""

    name = info["deployment_name"]
    if info.get("backend") != "ray":
        pids = _local_pids(name, info, "stopping a deployment that is starting")
        send(pids, signal.SIGTERM)
        send(pids, signal.SIGCONT)  # a stopped process acts on SIGTERM once continued
        _wait_gone(name, pids, timeout)
    else:  # its driver: it removes what it started on the cluster (Serve's waits: minutes)
        send([info["pid"]], signal.SIGTERM)
        way_out = (
            "it is still removing what it started on its Ray cluster; wait, or run "
            f"mii terminate {name} --timeout SECONDS"
        )
        _wait_gone(name, [info["pid"]], timeout, way_out)
    print(f"terminated {name} (it was still starting)")
    return 0


def _wait_gone(name: str, pids: list[int], timeout: float, way_out: str | None = None) -> None:
    """Wait ``timeout`` s for ``pids`` to exit; CliError saying ``way_out`` (by default:
    --force kills them) if they do not."""
    from mii.rpc.client import wait_gone

    try:
        wait_gone(pids, timeout)
    except TimeoutError as still:
        raise CliError(
            f"{still}; {way_out or f'mii terminate {name} --force kills them'}"
        ) from None


def kill(name: str, info: dict[str, Any] | None) -> int:
    """--force: SIGKILL to every process of the deployment, without asking it."""
    from mii.rpc.client import wait_gone

    pids = _local_pids(name, info, "--force")
    send(pids, signal.SIGKILL)
    try:
        wait_gone(pids, 10.0)
    except TimeoutError as err:
        raise CliError(str(err)) from None
    print(f"killed {name} (processes {pids})")
    return 0


def send(pids: list[int], signum: int) -> None:
    """``signum`` to each of ``pids`` that still runs; one this user may not signal
    is reported and skipped."""
    for pid in pids:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
        except PermissionError:
            print(f"not allowed to signal process {pid}: skipped", file=sys.stderr)
