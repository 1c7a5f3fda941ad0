"""A child process of a deployment that ends with it, whatever it is doing.

A replica polls its parent between calls, but one still loading a model (minutes,
in a thread that may hold the GIL) cannot poll: a deployment killed meanwhile
left it running for ever, holding its GPUs and its port, invisible to mii list.
On Linux the kernel kills it instead (PR_SET_PDEATHSIG), the moment the process
that started it ends. (The kernel watches the *thread* that started it: a
deployment starts its replicas from its event loop, on its main thread, which
lives as long as the process; a process started from a short-lived thread must
not use this.)
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent_pid: int | None) -> None:
    """Have the kernel SIGKILL this process when its parent ends (Linux; elsewhere
    nothing: the caller's own polling remains). ``parent_pid``, the pid the parent
    gave: exit at once if it ended before this ran (this process then belongs to
    init already, and the kernel would never send the signal)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):  # no usable libc: the polling remains
            pass
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(0)
