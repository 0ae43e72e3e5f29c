"""broker.gate: the global and the per-IP caps at accept time."""

from __future__ import annotations

from broker.gate import Gate, connections_fd_allows, source_of
from deadend.reasons import Reason


def test_gate_caps_per_source_and_globally() -> None:
    gate = Gate(max_connections=5)
    counted = []
    for ip in ("192.0.2.1", "192.0.2.1"):
        refused, key = gate.admit(ip, "", 2)
        assert refused is None
        counted.append(key)
    assert gate.admit("192.0.2.1", "", 2)[0] == Reason.PER_IP_LIMIT
    # one IPv6 host rotating addresses inside its /64 counts as one source
    for ip in ("2001:db8::1", "2001:db8::2"):
        refused, key = gate.admit(ip, "", 2)
        assert refused is None
        counted.append(key)
    assert gate.admit("2001:db8::3", "", 2)[0] == Reason.PER_IP_LIMIT
    refused, key = gate.admit("198.51.100.1", "", 2)
    counted.append(key)
    assert gate.admit("198.51.100.2", "", 2)[0] == Reason.CONN_LIMIT
    for key in counted:
        gate.release(key)
    assert gate.active == 0 and gate.per_ip == {}
    assert gate.refused == {Reason.PER_IP_LIMIT: 2, Reason.CONN_LIMIT: 1}


def test_per_pool_scopes_count_apart() -> None:
    gate = Gate(max_connections=100)
    assert gate.admit("192.0.2.1", "process", 1)[0] is None
    assert gate.admit("192.0.2.1", "process", 1)[0] == Reason.PER_IP_LIMIT
    assert gate.admit("192.0.2.1", "dense-22", 1)[0] is None  # another pool: its own quarter


def test_deferred_source_for_proxy_headers() -> None:
    gate = Gate(max_connections=10)
    refused, counted = gate.admit(None)
    assert refused is None and counted is None and gate.active == 1
    assert gate.admit_source("192.0.2.7", "", 1)[0] is None
    assert gate.admit_source("192.0.2.7", "", 1)[0] == Reason.PER_IP_LIMIT


def test_sources_and_descriptor_budget() -> None:
    assert source_of("192.0.2.1") == "192.0.2.1"
    assert source_of("2001:db8:0:1:aaaa::1") == "2001:db8:0:1::"
    assert connections_fd_allows(1024, 10, 4) == (1024 - 64 - 10 - 12) // 4
    dense = connections_fd_allows(1024, 10, 4, 100)
    assert dense > 800  # a dense session costs its socket and a share of its worker's descriptors
