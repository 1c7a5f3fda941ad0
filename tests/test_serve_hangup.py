"""`mii serve` that loses what reads its output while it drains.

A terminal that closes (an SSH session dropped, a terminal window closed): SIGHUP
drains it like Ctrl-C, and nothing is left running. It ended every process at
once, cutting the streams; then, with a SIGHUP handler that first printed to the
hung-up terminal (EIO, swallowed by asyncio), it never stopped at all.

`mii serve | tee log` and Ctrl-C: tee dies with it, and each message of the drain
raised BrokenPipeError: the drain broke, the streams it let finish were cut, and
mii serve exited 1.
"""

from __future__ import annotations

import contextlib
import os
import pty
import select
import signal
import subprocess
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


class _Stream:
    """A gRPC stream read in a thread."""

    def __init__(self, client: MiiClient) -> None:
        self.pieces: list = []
        self.errors: list[Exception] = []
        self.thread = threading.Thread(target=self._read, args=(client,), daemon=True)
        self.thread.start()

    def _read(self, client: MiiClient) -> None:
        try:
            for piece in client.stream(PROMPTS[0], max_new_tokens=TOKENS, ignore_eos=True):
                self.pieces.append(piece)
        except Exception as err:  # handed to the test
            self.errors.append(err)

    def assert_finishes(self) -> None:
        self.thread.join(60)
        assert self.errors == [] and self.pieces[-1].finish_reason == "length", self.errors
        assert self.pieces[-1].generated_length == TOKENS


def _stream_in_background(client: MiiClient) -> _Stream:
    stream = _Stream(client)
    assert wait_until(lambda: len(stream.pieces) > 0, timeout=60)
    return stream


def _serve_command(model: str, port: int) -> list[str]:
    command = [sys.executable, "-m", "mii", "serve", model, "--deployment-name", NAME]
    return [*command, "--grpc-port", str(port), "--port", str(free_port()), "--max-length", "128"]


def test_a_closed_terminal_drains_mii_serve_and_leaves_nothing_running(llama, cache):
    port = free_port()
    command = _serve_command(llama, port)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    pid, master = pty.fork()  # the child's controlling terminal is this pty
    if pid == 0:  # pragma: no cover (the child)
        # (as from a login shell: a test run under nohup would pass its ignored SIGHUP on)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)
        os.execve(sys.executable, command, env)
    client = None
    try:
        seen = _read_until(master, time.monotonic() + 120, lambda: registry.lookup(NAME))
        info = registry.lookup(NAME)
        assert info is not None, seen
        pids = [info["pid"], *info["replica_pids"]]
        client = MiiClient(f"127.0.0.1:{port}", NAME)
        assert wait_until(lambda: client.is_healthy(timeout=1.0), timeout=60), seen
        stream = _stream_in_background(client)
        os.close(master)  # the terminal hangs up: SIGHUP to the session
        master = None
        stream.assert_finishes()
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


def test_a_pipe_whose_reader_died_does_not_break_the_drain(llama, cache):
    """`mii serve ... | tee log`, Ctrl-C: tee is gone, and the drain's messages fail."""
    port = free_port()
    read_end, write_end = os.pipe()
    process = subprocess.Popen(
        _serve_command(llama, port),
        stdout=write_end,
        stderr=write_end,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    os.close(write_end)
    client = MiiClient(f"127.0.0.1:{port}", NAME)
    try:
        started = lambda: registry.lookup(NAME) and client.is_healthy(timeout=1.0)  # noqa: E731
        assert wait_until(started, timeout=120)
        pids = [process.pid, *registry.lookup(NAME)["replica_pids"]]
        stream = _stream_in_background(client)
        os.close(read_end)  # the reader (tee) goes: every write to the pipe fails now
        read_end = None
        process.send_signal(signal.SIGINT)
        stream.assert_finishes()
        assert process.wait(60) == 0
        assert wait_until(lambda: not any(registry.pid_alive(p) for p in pids), timeout=60)
    finally:
        client.close()
        if read_end is not None:
            os.close(read_end)
        process.kill()
        process.wait()
