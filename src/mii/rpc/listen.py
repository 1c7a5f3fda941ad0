"""Every gRPC server of mii (the balancer, each replica) is created here, so that a
busy port fails to bind instead of being shared.

gRPC sets SO_REUSEPORT on its listening sockets by default: a second server on a
port that another one already listens on would then start silently, and the
kernel would split new connections between the two. mii turns that off, and
raises ``DeploymentError`` naming the address when the port cannot be bound
(grpc raises ``RuntimeError`` in some versions and returns port 0 in others).
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Sequence

import grpc

from mii.errors import DeploymentError, InvalidRequestError

# gRPC core queues the calls that arrive faster than the Python server accepts them,
# and fails them with CANCELLED (nobody cancelled) once that queue passes 1,000
# (randomly, up to 3,000: then every one) or a call waited there 30 s: a burst of
# 5,000 calls lost 2,007 that way. Those limits are raised out of reach, so that the
# engines' own admission limit (max_queued_requests, mii.engine.admission) is the
# one that speaks, with RESOURCE_EXHAUSTED and a Retry-After. maximum_concurrent_rpcs
# stays unset (no limit), as does HTTP/2's max_concurrent_streams (no limit).
#
# Connections that hold a descriptor and do nothing are closed: one that has not
# finished HTTP/2's handshake within HANDSHAKE_TIMEOUT_MS (a raw TCP connection,
# or only the preface; grpc's default waits 120 s), and one without any call for
# IDLE_CONNECTION_MS (its client reconnects when it next calls).
_NO_LIMIT = 2**31 - 1
HANDSHAKE_TIMEOUT_MS = 10_000
IDLE_CONNECTION_MS = 10 * 60 * 1000
SERVER_OPTIONS = (
    ("grpc.so_reuseport", 0),
    ("grpc.server.max_pending_requests", _NO_LIMIT),
    ("grpc.server.max_pending_requests_hard_limit", _NO_LIMIT),
    ("grpc.server_max_unrequested_time_in_server", 24 * 3600),  # seconds
    ("grpc.server_handshake_timeout_ms", HANDSHAKE_TIMEOUT_MS),
    ("grpc.max_connection_idle_ms", IDLE_CONNECTION_MS),
)


def listening_server(
    address: str,
    interceptors: Sequence[grpc.aio.ServerInterceptor] = (),
    max_receive_bytes: int = -1,
    in_use_hint: str = "",
) -> grpc.aio.Server:
    """A ``grpc.aio.Server`` bound to ``address`` ("host:port"), not yet started.
    ``interceptors`` see every call (:mod:`mii.rpc.auth`); request messages up to
    ``max_receive_bytes`` are accepted (-1: any size; a larger one is answered
    RESOURCE_EXHAUSTED by grpc). ``in_use_hint``: how to choose another port, said
    when this one is in use.

    A host name is bound on every address it resolves to, each or none: grpc
    alone reports success when any one of them binds, so ``localhost`` would
    take ``[::1]`` while another deployment holds ``127.0.0.1`` on the same port
    (clients of ``localhost`` then reach either)."""
    options = (*SERVER_OPTIONS, ("grpc.max_receive_message_length", max_receive_bytes))
    server = grpc.aio.server(
        options=options,
        interceptors=list(interceptors) or None,
        maximum_concurrent_rpcs=None,
    )
    host, port = split_address(address)
    bound = 0
    for ip in _resolve(host, port, address):
        target = f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"
        if _listened_on(ip, port):  # said here, before grpc logs its own error line
            raise DeploymentError(f"cannot listen on {target} (is the port in use?{in_use_hint})")
        if ip == "0.0.0.0" and port:
            guard = _ipv6_wildcard_guard(port)
            if guard is not None:  # (kept as long as the server: see below)
                server._mii_ipv6_guard = guard  # type: ignore[attr-defined]
        try:
            ok = server.add_insecure_port(target)
        except RuntimeError:
            ok = 0
        if ok:
            bound += 1
            continue
        reason = _bind_failure(ip, port, in_use_hint)
        if reason is None:  # this machine has no such address (e.g. no IPv6): skip it
            continue
        raise DeploymentError(f"cannot listen on {target}{reason}")
    if not bound:
        raise DeploymentError(f"cannot listen on {address}: none of its addresses can be bound")
    return server


def _ipv6_wildcard_guard(port: int) -> socket.socket | None:
    """A socket bound (not listening) on ``[::]:port``, IPv6 only, or None.

    grpc binds "0.0.0.0" as the dual-stack ``[::]``, so a deployment told to listen on
    every IPv4 address also answered on every IPv6 one (a user trial: its HTTP port
    did not), past firewalls written for IPv4. With ``[::]:port`` held, grpc's
    dual-stack bind fails and it binds IPv4's wildcard alone; IPv6 connections to the
    port are refused. (``--host ::`` listens on both.)"""
    try:
        guard = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    except OSError:  # no IPv6 on this machine: grpc binds IPv4 alone anyway
        return None
    try:
        guard.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        guard.bind(("::", port))
    except OSError:  # (held by another socket: grpc's dual-stack bind fails just the same)
        guard.close()
        return None
    return guard


def host_port(host: str, port: int | str) -> str:
    """``host:port`` as gRPC targets and URLs write it: an IPv6 literal in brackets
    (``[::1]:50050``; ``::1:50050`` does not resolve)."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def refuse_url_or_bad_port(target: str) -> None:
    """InvalidRequestError for a client's target that cannot be a gRPC address: a
    URL (a retry loop met UnavailableError, "retry me", for ever), or a port
    outside 1..65535. A deployment's name passes."""
    _, url, rest = target.partition("://")
    if url:
        raise InvalidRequestError(
            f"{target!r} is a URL: give a deployment's name or its gRPC host:port, no "
            f"scheme ({rest.split('/')[0]!r}?); the HTTP port is for HTTP and OpenAI clients",
            field="model_or_deployment_name",
        )
    host, sep, port = target.rpartition(":")
    if sep and host and port.isdigit() and not 0 < int(port) < 65536:
        raise InvalidRequestError(
            f"{target!r}: its port {port} is not in 1..65535",
            field="model_or_deployment_name",
        )


def split_address(address: str) -> tuple[str, int]:
    """("host", port) of "host:port", "[v6]:port" or "v6:port" (the last colon splits)."""
    host, _, port = address.rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise DeploymentError(f"{address!r} is not HOST:PORT") from None


def _resolve(host: str, port: int, address: str) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError as err:
        raise DeploymentError(
            f"cannot listen on {address}: cannot resolve {host!r}: {err}"
        ) from None
    return list(dict.fromkeys(info[4][0] for info in infos))  # each address once, in order


def bind_error(ip: str, port: int, reuse_address: bool = False) -> OSError | None:
    """What binding a TCP socket to ``ip:port`` raises (None when it binds; the socket
    is closed at once). ``reuse_address``: SO_REUSEADDR, as grpc sets it."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            if reuse_address:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((ip, port))
    except OSError as err:
        return err
    return None


def _listened_on(ip: str, port: int) -> bool:
    """Whether another socket listens on ``ip:port`` (with SO_REUSEADDR, as grpc
    binds, connections of a stopped server in TIME_WAIT do not count)."""
    err = bind_error(ip, port, reuse_address=True)
    return err is not None and err.errno == errno.EADDRINUSE


def _bind_failure(ip: str, port: int, in_use_hint: str = "") -> str | None:
    """Why ``ip:port`` cannot be bound, as the end of an error message (with
    ``in_use_hint`` when it is in use); None when the machine lacks that address
    family or address."""
    err = bind_error(ip, port)
    if err is None:
        return " (grpc could not bind it)"
    if err.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
        return None
    if err.errno == errno.EADDRINUSE:
        return f" (is the port in use?{in_use_hint})"
    return f": {err.strerror or err}"
