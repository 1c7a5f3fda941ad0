"""mii's own port picks (replicas, tensor-parallel rendezvous, the tests' servers)
lie below the kernel's ephemeral range, where no outgoing connection can take the
port between the pick and the bind (under Ray a test's HTTP port was taken that
way: "Address already in use"), and skip ports something is bound to."""

from __future__ import annotations

import socket

from mii.rpc import free_port as picks


def test_ports_are_picked_below_the_ephemeral_range_and_free():
    low, high = picks.ephemeral_range()
    assert picks.LOWEST_PORT < low <= high
    for _ in range(20):
        port = picks.free_port()
        assert picks.LOWEST_PORT <= port < low
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free indeed


def test_a_bound_port_is_skipped(monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken_port = taken.getsockname()[1]
        offers = iter([taken_port, 28080, taken_port, 23456])  # (28080: mii's REST default)
        monkeypatch.setattr(picks.random, "randrange", lambda a, b: next(offers))
        assert picks.free_port() == 23456


def test_without_room_below_the_range_the_kernel_picks(monkeypatch):
    monkeypatch.setattr(picks, "ephemeral_range", lambda: (1024, 65535))
    port = picks.free_port()
    assert 1024 <= port <= 65535
