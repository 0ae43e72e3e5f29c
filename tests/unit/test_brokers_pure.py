"""--brokers, the pure parts: the steering programs (run by a classic BPF interpreter), each broker's
share of the caps, the sum of their metrics, the supervisor's word to a broker, the option itself."""

from __future__ import annotations

import ipaddress
import socket
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker.gate import source_of
from broker.metrics import summed
from broker.steering import run_program, steering_program
from deadend import wire
from deadend.config import Config, PortSettings
from deadend.options import BROKERS_MAX, parse_brokers


def ipv4_header(source: str) -> bytes:
    return bytes(12) + ipaddress.IPv4Address(source).packed + bytes(4)


def ipv6_header(source: str) -> bytes:
    return bytes(8) + ipaddress.IPv6Address(source).packed + bytes(16)


@given(st.ip_addresses(v=4), st.integers(1, 64))
def test_an_ipv4_address_always_gets_the_same_broker_in_range(address: ipaddress.IPv4Address, n: int) -> None:
    program = steering_program(socket.AF_INET, n)
    header = ipv4_header(str(address))
    assert 0 <= run_program(program, header) < n
    assert run_program(program, header) == run_program(program, ipv4_header(str(address)))


@given(st.ip_addresses(v=6), st.integers(0, (1 << 64) - 1), st.integers(1, 64))
def test_an_ipv6_64_is_one_key_as_the_per_ip_cap_counts_it(
    address: ipaddress.IPv6Address, host: int, n: int
) -> None:
    # Two addresses of one /64 are one source for broker/gate.py; they reach the same broker.
    program = steering_program(socket.AF_INET6, n)
    prefix = int(address) >> 64
    other = ipaddress.IPv6Address((prefix << 64) | host)
    assert source_of(str(address)) == source_of(str(other))
    assert run_program(program, ipv6_header(str(address))) == run_program(program, ipv6_header(str(other)))
    assert 0 <= run_program(program, ipv6_header(str(other))) < n


def test_addresses_spread_over_the_brokers() -> None:
    for n in (2, 3, 16):
        program = steering_program(socket.AF_INET, n)
        counts = [0] * n
        for i in range(4096):
            counts[run_program(program, ipv4_header(str(ipaddress.IPv4Address(0x0A000000 + i * 257))))] += 1
        assert min(counts) > 4096 / n / 2, counts  # no broker starved, none flooded
        counts6 = [0] * n
        program6 = steering_program(socket.AF_INET6, n)
        for i in range(4096):
            counts6[run_program(program6, ipv6_header(f"2001:db8:{i:x}::1"))] += 1
        assert min(counts6) > 4096 / n / 2, counts6


def test_the_program_is_what_the_kernel_reads() -> None:
    from broker.steering import encode

    program = steering_program(socket.AF_INET, 2)
    code = encode(program)
    assert len(code) == 8 * len(program)
    assert struct.unpack("=HBBI", code[:8]) == program[0]


def test_the_shares_add_up_to_the_whole_and_max_per_ip_stays_whole() -> None:
    config = Config(
        scripts=Path("s"),
        workers=65,
        warm=5,
        queue_size=129,
        max_connections=4097,
        call_rate_total=4000.0,
        record_max_bytes=1001,
        record_max_files=7,
        spool=Path("/var/spool/deadend"),
        spool_max_bytes=1 << 20,
        max_per_ip=8,
        metrics=("127.0.0.1", 9464),
        ports={22: PortSettings({"workers": 9, "memory": 16}), 25: PortSettings({"memory": 8})},
        brokers=3,
    )
    shares = [config.share(i, 3) for i in range(3)]
    for field in ("workers", "warm", "queue_size", "max_connections", "record_max_bytes", "record_max_files"):
        parts = [getattr(s, field) for s in shares]
        assert sum(parts) == getattr(config, field), field
        assert max(parts) - min(parts) <= 1 and parts == sorted(parts, reverse=True), (field, parts)
    assert sum(s.call_rate_total for s in shares) == pytest.approx(4000.0)
    assert sum(s.spool_max_bytes for s in shares) == 1 << 20
    assert [s.spool for s in shares] == [Path(f"/var/spool/deadend/broker-{i}") for i in range(3)]
    assert all(s.max_per_ip == 8 and s.metrics is None for s in shares)
    assert [s.ports[22].values["workers"] for s in shares] == [3, 3, 3]
    assert all(s.ports[22].values["memory"] == 16 and s.ports[25] == config.ports[25] for s in shares)


def test_metrics_are_summed_by_series_and_info_shown_once() -> None:
    one = (
        b"# HELP deadend_sessions_ended_total Session ends by reason\n"
        b"# TYPE deadend_sessions_ended_total counter\n"
        b'deadend_sessions_ended_total{port="25",reason="done"} 3.0\n'
        b'deadend_build_info{version="0.1.0"} 1.0\n'
        b"deadend_sandboxes_max 32.0\n"
    )
    two = (
        b"# HELP deadend_sessions_ended_total Session ends by reason\n"
        b"# TYPE deadend_sessions_ended_total counter\n"
        b'deadend_sessions_ended_total{port="25",reason="done"} 4.0\n'
        b'deadend_sessions_ended_total{port="22",reason="idle"} 1.0\n'
        b'deadend_build_info{version="0.1.0"} 1.0\n'
        b"deadend_sandboxes_max 32.0\n"
    )
    text = summed([one, two]).decode()
    assert text.count("# TYPE deadend_sessions_ended_total counter") == 1
    assert 'deadend_sessions_ended_total{port="25",reason="done"} 7.0' in text
    assert 'deadend_sessions_ended_total{port="22",reason="idle"} 1.0' in text
    assert 'deadend_build_info{version="0.1.0"} 1.0' in text
    assert "deadend_sandboxes_max 64.0" in text
    assert summed([]) == b""


def test_a_brokers_place_reads_back_and_nothing_else_does() -> None:
    place = wire.Supervised(1, 4, 7, 1234)
    assert wire.Supervised.decode(place.encode()) == place
    for bad in ("", "1/4/7", "4/4/7/1", "a/4/7/1", "-1/4/7/1", "1/4/7/1/2"):
        with pytest.raises(ValueError):
            wire.Supervised.decode(bad)


def test_brokers_is_a_count_or_auto() -> None:
    assert parse_brokers("2") == 2
    assert 1 <= parse_brokers("auto") <= BROKERS_MAX
    for bad in ("0", "-1", "x", str(BROKERS_MAX + 1), "1.5"):
        with pytest.raises(ValueError):
            parse_brokers(bad)


def test_a_broker_is_started_again_later_each_time_and_then_given_up() -> None:
    from broker.supervisor import MAX_RESTARTS, RESTART_DELAY, RESTART_DELAY_MAX, RESTART_WINDOW, Backoff

    backoff = Backoff()
    delays = [backoff.exited(float(t)) or 0.0 for t in range(MAX_RESTARTS)]
    assert delays[0] == RESTART_DELAY and delays == sorted(delays)
    assert all(0 < d <= RESTART_DELAY_MAX for d in delays)
    assert backoff.exited(float(MAX_RESTARTS)) is None  # one exit too many within the window
    calm = Backoff()
    for i in range(3 * MAX_RESTARTS):  # exits spread wider than the window never add up
        assert calm.exited(i * (RESTART_WINDOW / 2 + 1)) is not None
        calm.served()
        assert calm.delay == RESTART_DELAY
