"""How a server process tells the process that started it why it failed.

The deployment process and each replica process log to a file. When one fails,
its last line is ``MII_STARTUP_ERROR <message>`` (``<ErrorType>: <message>`` for an
error that is not mii's own); the starter
(``mii.serve`` for the deployment, the deployment for its replicas) reads that
line back and raises it as a ``DeploymentError`` in its own process.
"""

from __future__ import annotations

import signal
import sys
import traceback
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from mii.errors import MiiError
from mii.rpc.event_loop import run_event_loop

STARTUP_ERROR = "MII_STARTUP_ERROR"
_TAIL_LINES = 20  # of a log without the marker line (e.g. a hard crash)


class StoppedWhileStarting(MiiError):
    """The process was told to stop (a signal, mii terminate) before it served: said
    like an error (the starter raises it), but the exit is a clean one (code 0: a
    service manager's stop is no failure)."""


def run_reporting_errors(main: Coroutine[Any, Any, Any], with_traceback: bool = False) -> int:
    """Run a server process's ``main`` coroutine; its exit code (1 on an error,
    after writing the marker line to stderr; 0 after it for StoppedWhileStarting)."""
    try:
        run_event_loop(main)
    except StoppedWhileStarting as err:
        print(f"{STARTUP_ERROR} {err}", file=sys.stderr, flush=True)
        return 0
    except Exception as err:
        if with_traceback:
            traceback.print_exc()
        # mii's own errors are worded for the user (their class name, e.g.
        # "GatewayError", says nothing more); anything else keeps its type.
        said = str(err) if isinstance(err, MiiError) else f"{type(err).__name__}: {err}"
        print(f"{STARTUP_ERROR} {said}", file=sys.stderr, flush=True)
        return 1
    return 0


def read_startup_error(log_file: Path, who: str, exit_code: int, offset: int = 0) -> str:
    """The error a process that exited with ``exit_code`` reported in its log, or,
    when it reported none, the end of the log. ``who`` names it ("replica 0");
    ``offset``: where its part of the log begins (a restarted replica appends)."""
    with open(log_file, "rb") as f:
        f.seek(offset)
        lines = f.read().decode(errors="replace").splitlines()
    for line in reversed(lines):
        if line.startswith(STARTUP_ERROR):
            # The starter raises it as a DeploymentError: that type's name once is enough
            # (it read "DeploymentError: DeploymentError: cannot listen on ...").
            return line[len(STARTUP_ERROR) :].strip().removeprefix("DeploymentError: ")
    tail = "\n".join(lines[-_TAIL_LINES:]).strip()
    ended = f"exited with code {exit_code}"
    if exit_code < 0:  # (it had nothing to say: "exited with code -9:" and a blank line)
        ended = f"was killed by {signal_name(-exit_code)}"
    return f"{who} {ended}" + (f":\n{tail}" if tail else "")


def signal_name(signum: int) -> str:
    """ "SIGKILL" for 9; "signal N" for a number the platform does not name."""
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"
