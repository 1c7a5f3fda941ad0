"""`mii serve` in a terminal that closes (an SSH session dropped, a terminal window
closed): SIGHUP drains it like Ctrl-C, and nothing is left running.

It ended every process at once, cutting the streams; then, with a SIGHUP handler
that first printed to the hung-up terminal (EIO, swallowed by asyncio), it never
stopped at all, leaving the deployment and its replicas running.
"""

from __future__ import annotations

import contextlib
import os
import pty
import select
import signal
import sys
import threading
import time

import pytest

from helpers import PROMPTS, wait_until
from mii.rpc import registry
from mii.rpc.client import MiiClient
from mii.rpc.deployment import free_port

NAME = "hangup-test"
TOKENS = 40  # at 0.1 s per pass: >= 4 s of streaming, within the grace period


def _read_until(master: int, deadline: float, done) -> str:
    """What the terminal shows, read until ``done()`` or ``deadline``."""
    seen = b""
    while time.monotonic() < deadline and not done():
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                seen += os.read(master, 65536)
            except OSError:  # the child closed its side
                break
    return seen.decode(errors="replace")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MII_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("MII_PASS_DELAY_S", "0.1")  # inherited by the deployment's processes


def test_a_closed_terminal_drains_mii_serve_and_leaves_nothing_running(llama, cache):
    port = free_port()
    command = [sys.executable, "-m", "mii", "serve", llama, "--deployment-name", NAME]
    command += ["--grpc-port", str(port), "--port", str(free_port()), "--max-length", "128"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    pid, master = pty.fork()  # the child's controlling terminal is this pty
    if pid == 0:  # pragma: no cover (the child)
        os.execve(sys.executable, command, env)
    client = None
    try:
        seen = _read_until(master, time.monotonic() + 120, lambda: registry.lookup(NAME))
        info = registry.lookup(NAME)
        assert info is not None, seen
        pids = [info["pid"], *info["replica_pids"]]
        client = MiiClient(f"127.0.0.1:{port}", NAME)
        assert wait_until(lambda: client.is_healthy(timeout=1.0), timeout=60), seen
        pieces, errors = [], []

        def stream() -> None:
            try:
                pieces.extend(client.stream(PROMPTS[0], max_new_tokens=TOKENS, ignore_eos=True))
            except Exception as err:  # handed to the test
                errors.append(err)

        reader = threading.Thread(target=stream, daemon=True)
        reader.start()
        assert wait_until(lambda: len(pieces) > 0, timeout=60)
        os.close(master)  # the terminal hangs up: SIGHUP to the session
        master = None
        reader.join(60)
        assert errors == [] and pieces[-1].finish_reason == "length", errors
        assert pieces[-1].generated_length == TOKENS
        assert wait_until(lambda: not any(registry.pid_alive(p) for p in pids), timeout=60)
        assert registry.lookup(NAME) is None
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        if client is not None:
            client.close()
        if master is not None:
            os.close(master)
        with contextlib.suppress(ProcessLookupError, ChildProcessError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
