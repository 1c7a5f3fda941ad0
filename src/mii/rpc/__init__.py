"""mii's gRPC deployments: the replicas, the balancer, the REST gateway."""

from __future__ import annotations

import os
from collections.abc import MutableMapping


def quiet_grpc_logs(env: MutableMapping[str, str] = os.environ) -> None:
    """Keep grpc's C core to errors in a process mii runs (``env``: its environment).
    Left to its defaults it wrote INFO lines of its own to standard error ("I1206
    ... chttp2_transport.cc ... Got goaway" when a connection closed during a failed
    start), in mii serve's output before mii's own error line. A user's own
    GRPC_VERBOSITY wins. Only mii's processes: the mii command and the deployment
    and replica processes it starts, never a program that merely imports mii."""
    env.setdefault("GRPC_VERBOSITY", "ERROR")
