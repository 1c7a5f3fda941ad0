"""The key-value store a tensor-parallel group meets in (torch.distributed's
TCPStore): where it listens, and the secret prefix of its keys.

torch's TCPStore listens on every interface, whatever address it is given, and
answers anyone who connects. So when this process hosts the store (rank 0
without torchrun's agent), it listens on a socket bound here to MASTER_ADDR
only (loopback for mii's deployments), handed to the store as
``master_listen_fd``.

Loopback still lets other local users connect. The store has no
authentication, but no command lists its keys: every key of the group lives
under a random prefix (``MII_TP_STORE_SECRET``, drawn by the replica for its
ranks and passed in their environment), so a foreign client can neither read
nor write a key the group uses (the process group's rendezvous, a failing
rank's error). What it can still do is write other keys (read by nobody) or
flood the store; the worst that follows is that replica failing, which it then
reports (NOT_SERVING) like any rank failure.
"""

from __future__ import annotations

import datetime
import os
import socket
from typing import Any

import torch.distributed as dist

import mii.envs as envs

_BASE_STORE: Any = None
_GENERATION = 0


def fresh_store(rank: int, world: int, timeout: datetime.timedelta):
    """A key-value store no earlier group of this process used: a pipeline made
    after another was destroyed must not meet the first one's keys."""
    global _BASE_STORE, _GENERATION
    if _BASE_STORE is None:
        host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
        # torchrun's agent already serves a store at MASTER_ADDR:MASTER_PORT;
        # other launchers (deepspeed, mii.serve) leave rank 0 to host it.
        agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
        listener = listening_socket(host, port) if rank == 0 and not agent else None
        try:
            _BASE_STORE = dist.TCPStore(
                host,
                port,
                world,
                is_master=listener is not None,
                timeout=timeout,
                wait_for_workers=False,
                master_listen_fd=None if listener is None else listener.fileno(),
            )
        except BaseException:
            if listener is not None:
                listener.close()
            raise
        if listener is not None:
            listener.detach()  # the store owns the socket now, and closes it when it ends
    _GENERATION += 1
    return dist.PrefixStore(f"{key_prefix()}/group{_GENERATION}", _BASE_STORE)


def key_prefix() -> str:
    """The prefix of every key of this process's groups (secret in deployments)."""
    secret = envs.TP_STORE_SECRET.get()
    return "mii" if secret is None else f"mii/{secret}"


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket listening on ``host:port`` only (not on every interface)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
    except OSError as err:
        raise RuntimeError(
            f"cannot listen on MASTER_ADDR={host}, MASTER_PORT={port} for the "
            f"tensor-parallel store: {err}"
        ) from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(1024)
    except OSError as err:
        sock.close()
        raise RuntimeError(
            f"cannot listen on MASTER_ADDR={host}, MASTER_PORT={port} for the "
            f"tensor-parallel store (is the port in use?): {err.strerror or err}"
        ) from None
    return sock
