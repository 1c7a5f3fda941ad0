"""Every gRPC server of mii (the balancer, each replica) is created here, so that a
busy port fails to bind instead of being shared.

gRPC sets SO_REUSEPORT on its listening sockets by default: a second server on a
port that another one already listens on would then start silently, and the
kernel would split new connections between the two. mii turns that off, and
raises ``DeploymentError`` naming the address when the port cannot be bound
(grpc raises ``RuntimeError`` in some versions and returns port 0 in others).
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc

from mii.errors import DeploymentError

# gRPC core queues the calls that arrive faster than the Python server accepts them,
# and fails them with CANCELLED (nobody cancelled) once that queue passes 1,000
# (randomly, up to 3,000: then every one) or a call waited there 30 s: a burst of
# 5,000 calls lost 2,007 that way. Those limits are raised out of reach, so that the
# engines' own admission limit (max_queued_requests, mii.engine.admission) is the
# one that speaks, with RESOURCE_EXHAUSTED and a Retry-After. maximum_concurrent_rpcs
# stays unset (no limit), as does HTTP/2's max_concurrent_streams (no limit).
_NO_LIMIT = 2**31 - 1
SERVER_OPTIONS = (
    ("grpc.so_reuseport", 0),
    ("grpc.server.max_pending_requests", _NO_LIMIT),
    ("grpc.server.max_pending_requests_hard_limit", _NO_LIMIT),
    ("grpc.server_max_unrequested_time_in_server", 24 * 3600),  # seconds
)


def listening_server(
    address: str,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    max_receive_bytes: int = -1,
) -> grpc.aio.Server:
    """A ``grpc.aio.Server`` bound to ``address`` ("host:port"), not yet started.
    ``interceptors`` see every call (:mod:`mii.rpc.auth`); request messages up to
    ``max_receive_bytes`` are accepted (-1: any size; a larger one is answered
    RESOURCE_EXHAUSTED by grpc)."""
    options = (*SERVER_OPTIONS, ("grpc.max_receive_message_length", max_receive_bytes))
    server = grpc.aio.server(
        options=options,
        interceptors=list(interceptors) or None,
        maximum_concurrent_rpcs=None,
    )
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as err:
        raise DeploymentError(f"cannot listen on {address} (is the port in use?)") from err
    if not bound:
        raise DeploymentError(f"cannot listen on {address} (is the port in use?)")
    return server
