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

SERVER_OPTIONS = (("grpc.so_reuseport", 0),)


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
    server = grpc.aio.server(options=options, interceptors=list(interceptors) or None)
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as err:
        raise DeploymentError(f"cannot listen on {address} (is the port in use?)") from err
    if not bound:
        raise DeploymentError(f"cannot listen on {address} (is the port in use?)")
    return server
