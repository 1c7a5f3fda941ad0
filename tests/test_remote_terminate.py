"""Who may stop a deployment over gRPC: without an API key, only callers on its own
machine (a deployment bound to 0.0.0.0 must not be stoppable by anyone who can
reach its port); with one, every key holder. And the start-up warning of a
deployment open to the network without a key."""

from __future__ import annotations

import asyncio
import contextlib
import socket

import grpc
import pytest

from mii.rpc import mii_pb2, mii_pb2_grpc
from mii.rpc.auth import TERMINATE_REFUSED, open_to_network_warning, peer_is_local
from mii.rpc.balancer import BalancerServicer
from mii.rpc.proto_parse import add_mii_servicer


@pytest.mark.parametrize(
    "peer, local",
    [
        ("ipv4:127.0.0.1:50050", True),
        ("ipv4:127.3.4.5:1", True),
        ("ipv6:[::1]:50050", True),
        ("ipv6:%5B::1%5D:50050", True),  # as grpc writes it
        ("ipv6:%5B::ffff:127.0.0.1%5D:50050", True),
        ("ipv6:[::ffff:127.0.0.1]:50050", True),  # IPv4 loopback on a dual-stack socket
        ("unix:/tmp/mii.sock", True),
        ("ipv4:198.51.100.7:40000", False),
        ("ipv6:[2001:db8::1]:40000", False),
        ("ipv6:%5B2001:db8::1%5D:40000", False),
        ("ipv6:[::ffff:198.51.100.7]:40000", False),
        ("garbage", False),
        ("", False),
    ],
)
def test_which_grpc_peers_are_this_machine(peer, local):
    assert peer_is_local(peer) is local


class _Aborted(Exception):
    pass


class _Context:
    """The part of a grpc.aio ServicerContext that Terminate uses."""

    def __init__(self, peer: str):
        self._peer = peer
        self.aborted: tuple | None = None

    def peer(self) -> str:
        return self._peer

    async def abort(self, code, details):
        self.aborted = (code, details)
        raise _Aborted


def _terminate(peer: str, has_api_key: bool) -> tuple[bool, tuple | None]:
    stop = asyncio.Event()
    servicer = BalancerServicer("test", stop, has_api_key=has_api_key)
    context = _Context(peer)
    with contextlib.suppress(_Aborted):
        asyncio.run(servicer.Terminate(mii_pb2.TerminateRequest(), context))
    return stop.is_set(), context.aborted


def test_without_a_key_terminate_from_another_machine_is_refused():
    stopped, aborted = _terminate("ipv4:198.51.100.7:40000", has_api_key=False)
    assert not stopped
    assert aborted == (grpc.StatusCode.PERMISSION_DENIED, TERMINATE_REFUSED)
    assert "--api-key" in TERMINATE_REFUSED and "mii terminate" in TERMINATE_REFUSED


def test_without_a_key_terminate_from_this_machine_stops_it():
    assert _terminate("ipv4:127.0.0.1:40000", has_api_key=False) == (True, None)
    assert _terminate("ipv6:[::1]:40000", has_api_key=False) == (True, None)


def test_with_a_key_its_holders_may_terminate_from_anywhere():
    # (the API key interceptor has already refused callers without the key)
    assert _terminate("ipv4:198.51.100.7:40000", has_api_key=True) == (True, None)


def _non_loopback_ipv4() -> str | None:
    """This machine's address on its default route (no packet is sent), if any."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("198.51.100.1", 9))
        except OSError:
            return None
        address = s.getsockname()[0]
    return None if address.startswith("127.") else address


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


def _terminate_over(bind: str, dial: str) -> tuple[grpc.StatusCode | None, bool]:
    """Terminate sent over real sockets to a keyless balancer bound to ``bind`` (its
    port filled in), dialled at ``dial``: (the refusal's code or None, stopped)."""

    async def scenario() -> tuple[grpc.StatusCode | None, bool]:
        stop = asyncio.Event()
        server = grpc.aio.server()
        add_mii_servicer(BalancerServicer("test", stop), server)
        port = server.add_insecure_port(f"{bind}:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"{dial}:{port}") as channel:
                stub = mii_pb2_grpc.MiiStub(channel)
                try:
                    await stub.Terminate(mii_pb2.TerminateRequest(), timeout=10)
                except grpc.aio.AioRpcError as err:
                    return err.code(), stop.is_set()
            return None, stop.is_set()
        finally:
            await server.stop(None)

    return asyncio.run(scenario())


def test_real_calls_from_this_machine_stop_it():
    """Over real sockets, as grpc writes its peers (IPv6 ones percent-encoded: a check
    that read them as written in these tests' tables refused `mii terminate` of a
    deployment on ::1 or localhost), and through the machine's own network address
    (`mii terminate` dials the host a deployment was bound to)."""
    assert _terminate_over("127.0.0.1", "127.0.0.1") == (None, True)
    assert _terminate_over("0.0.0.0", "127.0.0.1") == (None, True)
    if _ipv6_loopback():
        assert _terminate_over("[::1]", "[::1]") == (None, True)
        assert _terminate_over("[::]", "localhost") == (None, True)
    address = _non_loopback_ipv4()
    if address is not None:
        assert _terminate_over("0.0.0.0", address) == (None, True)
        assert _terminate_over(address, address) == (None, True)


def test_the_start_up_warning_of_a_deployment_open_to_the_network():
    warning = open_to_network_warning("0.0.0.0", [50050, 28080], None)
    assert warning is not None
    assert "without an API key" in warning and "50050 and 28080" in warning
    assert "can stop it" in warning
    assert "--api-key" in warning
    assert open_to_network_warning("*", [50050], None) is not None
    # bound to the loopback, or with a key: nothing to warn about
    assert open_to_network_warning("127.0.0.1", [50050], None) is None
    assert open_to_network_warning("::1", [50050], None) is None
    assert open_to_network_warning("localhost", [50050], None) is None
    assert open_to_network_warning("0.0.0.0", [50050], "secret") is None
