"""Ports that mii picks itself: replicas' gRPC ports, tensor-parallel rendezvous
ports, and the tests' servers.

A port the kernel hands out for ``bind(0)`` lies in its ephemeral range, from
which every outgoing connection of every process on the machine also takes its
local port. Between the pick and the server's bind (seconds, for a replica that
loads a model) a busy neighbour can take it: under Ray, whose processes open
connections by the hundred, a test's HTTP port was taken that way and ``mii
serve`` failed with "Address already in use". So the pick is made below the
ephemeral range, where only an explicit bind can take a port, and checked free.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

from mii.rpc.deployment_config import DEFAULT_RESTFUL_API_PORT
from mii.rpc.listen import bind_error

# Above Ray's default worker ports (10002-19999, which its raylets bind one by one)
# and the well-known and registered services below them.
LOWEST_PORT = 20000
# Ports mii's own defaults listen on (restful_api_port): never handed to a replica.
RESERVED_PORTS = frozenset({DEFAULT_RESTFUL_API_PORT})
PICK_TRIES = 64
_DEFAULT_EPHEMERAL = (32768, 60999)  # Linux's default ip_local_port_range


def ephemeral_range() -> tuple[int, int]:
    """The kernel's range of local ports for outgoing connections (Linux's file;
    its default elsewhere)."""
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return _DEFAULT_EPHEMERAL


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port of ``host`` that nothing is bound to now, below the ephemeral
    range where one is free (else the kernel's pick)."""
    low = ephemeral_range()[0]
    for _ in range(PICK_TRIES if low > LOWEST_PORT + 1000 else 0):
        port = random.randrange(LOWEST_PORT, low)
        if port not in RESERVED_PORTS and bind_error(host, port) is None:
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]
