"""The PROXY protocol parser (deadend.proxy): pure unit tests, no sockets."""

from __future__ import annotations

import ipaddress
import itertools
import struct

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from deadend.proxy import MAX_V1, MAX_V2_PAYLOAD, V2_SIGNATURE, ProxyError, ProxyHeader, parse_proxy_header

Peer = tuple[str, int] | None


def v2(cmd: int = 0x21, family: int = 0x11, payload: bytes = b"", length: int | None = None) -> bytes:
    size = len(payload) if length is None else length
    return V2_SIGNATURE + struct.pack("!BBH", cmd, family, size) + payload


def v2_inet(src: str, dst: str, sport: int, dport: int, tlvs: bytes = b"") -> bytes:
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    ports = struct.pack("!HH", sport, dport)
    return v2(0x21, 0x11 if s.version == 4 else 0x21, s.packed + d.packed + ports + tlvs)


def shown(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """How the broker shows a peer (broker.net.peer_ip), written independently of the parser."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return addr.compressed


VALID: list[tuple[bytes, Peer, Peer]] = [
    (b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n", ("192.0.2.1", 56324), ("198.51.100.2", 443)),
    (b"PROXY TCP4 0.0.0.0 255.255.255.255 0 65535\r\n", ("0.0.0.0", 0), ("255.255.255.255", 65535)),
    (b"PROXY TCP6 2001:DB8:0:0:0:0:0:1 2001:db8::2 1 2\r\n", ("2001:db8::1", 1), ("2001:db8::2", 2)),
    (b"PROXY TCP6 ::ffff:192.0.2.9 ::1 10 20\r\n", ("192.0.2.9", 10), ("::1", 20)),
    (b"PROXY TCP6 1:2:3:4:5:6:7:: ::1.2.3.4 3 4\r\n", ("1:2:3:4:5:6:7:0", 3), ("::102:304", 4)),
    (b"PROXY UNKNOWN\r\n", None, None),
    (b"PROXY UNKNOWN ffff:f::1 ffff::1 65535 65535\r\n", None, None),  # the spec's own example
    (v2_inet("192.0.2.1", "198.51.100.2", 56324, 443), ("192.0.2.1", 56324), ("198.51.100.2", 443)),
    (v2_inet("2001:db8::1", "2001:db8::2", 1, 2), ("2001:db8::1", 1), ("2001:db8::2", 2)),
    (v2_inet("::ffff:192.0.2.7", "::1", 5, 6), ("192.0.2.7", 5), ("::1", 6)),  # IPv4-mapped -> IPv4
    (v2_inet("10.0.0.1", "10.0.0.2", 7, 8, b"\x04\x00\x03abc"), ("10.0.0.1", 7), ("10.0.0.2", 8)),  # a TLV
    (v2(0x20, 0x00), None, None),  # LOCAL: a health check
    (v2(0x20, 0x11, b"\x00" * 12), None, None),  # LOCAL ignores the family and what follows it
    (v2(0x20, 0x12, b"x" * MAX_V2_PAYLOAD), None, None),
    (v2(0x21, 0x00, b"tlv"), None, None),  # AF_UNSPEC
    (v2(0x21, 0x31, b"/run/a.sock".ljust(216, b"\x00")), None, None),  # AF_UNIX
]


@pytest.mark.parametrize(("header", "source", "destination"), VALID)
def test_valid_header_keeps_the_client_bytes(header: bytes, source: Peer, destination: Peer) -> None:
    data = header + b"EHLO x\r\n\r\n\x00"
    result = parse_proxy_header(data)
    version = 1 if header.startswith(b"PROXY") else 2
    assert result == ProxyHeader(version, len(header), source, destination)
    assert data[result.length :] == b"EHLO x\r\n\r\n\x00"


@pytest.mark.parametrize("header", [h for h, _, _ in VALID])
def test_every_prefix_of_a_valid_header_is_incomplete(header: bytes) -> None:
    for i in range(len(header)):
        assert parse_proxy_header(header[:i]) is None, header[:i]


# Each is the shortest rejected prefix: the byte before it is still a possible header, this one is not.
EARLY = [
    *(b"G", b"S", b"\x16"),  # "GET / HTTP/1.1", "SSH-2.0-...", a TLS ClientHello: at the first byte
    *(b"p", b"PROXX", b"\r\n\r\n\x01", b"PROXY t", b"PROXY TCP5", b"PROXY  ", b"PROXY TCP4  "),
    b"PROXY TCP4 1.2.3.256",
    b"PROXY TCP4 01",
    b"PROXY TCP4 1.2.3.4.",
    b"PROXY TCP4 :",
    b"PROXY TCP6 1:::",
    b"PROXY TCP6 1::2::",
    b"PROXY TCP6 :1",
    b"PROXY TCP6 12345",
    b"PROXY TCP6 fe80::1%",
    b"PROXY TCP6 1:2:3:4:5:6:7:8:",
    b"PROXY TCP6 1:2:3:4:5:6:7:8.",
    b"PROXY TCP6 1:2:3:4:5:6:7::8",
    b"PROXY TCP6 1.",
    *(b"PROXY TCP6 1::2:3:4:5:6:1.", b"PROXY TCP6 1::2:3:4:5:6:7:"),  # "::" must stand for a group
    b"PROXY TCP4 1.2.3.4 5.6.7.8 65536",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 08",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 +",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 ",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\rX",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 \r",
    b"PROXY TCP4 1.2.3.4 5.6.7.\xd9",
    b"PROXY UNKNOWN\n",
    b"PROXY UNKNOWN " + b"x" * (MAX_V1 - 15),  # no room left for the CRLF
    v2(0x11)[:13],  # version 1 in a v2 header
    v2(0x22)[:13],  # command 2
    *(v2(0x21, family)[:14] for family in (0x12, 0x22, 0x32)),  # a TCP server: no datagram families
    *(v2(0x21, family)[:14] for family in (0x41, 0x10, 0x13, 0x01, 0xFF)),
    v2(0x21, 0x11, length=11)[:16],  # shorter than the 12-byte IPv4 block, refused before it arrives
    v2(0x21, 0x21, length=35)[:16],
    v2(0x21, 0x31, length=215)[:16],
    v2(0x20, 0x00, length=MAX_V2_PAYLOAD + 1)[:16],
]


@pytest.mark.parametrize("data", EARLY)
def test_rejected_at_the_first_impossible_byte(data: bytes) -> None:
    assert parse_proxy_header(data[:-1]) is None
    with pytest.raises(ProxyError) as e:
        parse_proxy_header(data)
    assert len(str(e.value)) <= 100 and str(e.value).isascii()


@pytest.mark.parametrize(
    "line",
    [
        b"PROXY TCP4 192.0.2.1 198.51.100.2 1 2 3\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2 1\r\n",
        b"PROXY TCP4 192.0.2.1 198.51.100.2  2\r\n",
        b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n",
        b"PROXY TCP4 ::1 ::1 1 2\r\n",
        b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n",
        b"PROXY TCP6 1:2:3:4:5:6:7 ::1 1 2\r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n",
        b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
        b"PROXY TCP4\r\n",
        b"PROXY \r\n",
        b"PROXY UNKNOWN " + b"x" * (MAX_V1 - 15) + b"\r\n",  # 108 bytes
        b"PROXY UNKNOWN " + b"x" * 200,
    ],
)
def test_malformed_v1(line: bytes) -> None:
    with pytest.raises(ProxyError):
        parse_proxy_header(line)


def test_line_lengths_at_the_limit() -> None:
    longest = b"PROXY UNKNOWN " + b"x" * (MAX_V1 - 16) + b"\r\n"
    assert len(longest) == MAX_V1
    assert parse_proxy_header(longest + b"more") == ProxyHeader(1, MAX_V1, None, None)
    assert parse_proxy_header(longest[:-1]) is None
    with pytest.raises(ProxyError):
        parse_proxy_header(longest[:-2] + b"x")


def test_empty_and_prefixes_of_both_versions_wait() -> None:
    for data in (b"", b"P", b"PRO", b"PROXY", b"PROXY ", b"\r", b"\r\n\r", V2_SIGNATURE, v2()[:15]):
        assert parse_proxy_header(data) is None


def test_v2_reads_no_further_than_its_length() -> None:
    data = v2(0x21, 0x11, b"\x7f\x00\x00\x01" * 2 + b"\x00\x01\x00\x02", length=12) + b"GARBAGE"
    assert parse_proxy_header(data) == ProxyHeader(2, 28, ("127.0.0.1", 1), ("127.0.0.1", 2))


def test_ipv6_prefix_rule_matches_ipaddress_on_short_strings() -> None:
    # Brute force over a small alphabet: a string is a viable prefix iff some completion (five characters
    # are always enough, as for "::1." -> "::1.1.1.1") is an address that ipaddress accepts.
    every = ["".join(t) for n in range(10) for t in itertools.product("1:.", repeat=n)]
    viable = {s[:i] for s in every if _is_ip6(s) for i in range(len(s) + 1)}
    for s in every:
        if len(s) <= 4:
            assert (outcome(b"PROXY TCP6 " + s.encode()) is None) == (s in viable), s


def _is_ip6(text: str) -> bool:
    try:
        ipaddress.IPv6Address(text)
    except ValueError:
        return False
    return True


# --- properties ------------------------------------------------------------------------------------

ports = st.integers(0, 65535)
ip4s = st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1))
ip6s = st.one_of(
    st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1)),
    st.builds(ipaddress.IPv6Address, st.integers(0, 2**40)),  # "::" forms
    st.builds(lambda n: ipaddress.IPv6Address(0xFFFF00000000 | n), st.integers(0, 2**32 - 1)),  # mapped
)


@st.composite
def ip6_text(draw: st.DrawFn, addr: ipaddress.IPv6Address) -> str:
    form = draw(st.sampled_from(["compressed", "exploded", "dotted", "upper"]))
    if form == "dotted":
        return addr.exploded[:30] + str(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF))
    return addr.compressed.upper() if form == "upper" else str(getattr(addr, form))


@st.composite
def headers(draw: st.DrawFn) -> tuple[bytes, Peer]:
    """A valid header of any kind and the source it must yield."""
    kind = draw(st.sampled_from(["tcp4", "tcp6", "unknown", "v2-inet", "v2-other"]))
    sport, dport = draw(ports), draw(ports)
    if kind == "unknown":
        tail = draw(st.binary(max_size=MAX_V1 - 15)).replace(b"\r", b"").replace(b"\n", b"")
        return b"PROXY UNKNOWN" + tail + b"\r\n", None
    if kind == "v2-other":
        cmd, family = draw(st.sampled_from([(0x20, 0x00), (0x20, 0x21), (0x21, 0x00), (0x21, 0x31)]))
        size = 216 if (cmd, family) == (0x21, 0x31) else 0
        return v2(cmd, family, draw(st.binary(min_size=size, max_size=size + 32))), None
    if kind == "v2-inet":
        src = draw(ip4s | ip6s)
        dst = draw(ip4s if src.version == 4 else ip6s)
        return v2_inet(str(src), str(dst), sport, dport, draw(st.binary(max_size=32))), (shown(src), sport)
    if kind == "tcp4":
        v4 = [draw(ip4s), draw(ip4s)]
        src, dst, texts = v4[0], v4[1], [str(a) for a in v4]
    else:
        v6 = [draw(ip6s), draw(ip6s)]
        src, dst, texts = v6[0], v6[1], [draw(ip6_text(a)) for a in v6]
    line = f"PROXY {kind.upper()} {texts[0]} {texts[1]} {sport} {dport}\r\n".encode()
    assume(len(line) <= MAX_V1)
    return line, (shown(src), sport)


@settings(max_examples=300, deadline=None)
@given(headers(), st.binary(max_size=40))
def test_valid_header_with_any_suffix(case: tuple[bytes, Peer], suffix: bytes) -> None:
    header, source = case
    result = parse_proxy_header(header + suffix)
    assert result is not None and result.length == len(header) and result.source == source
    assert all(parse_proxy_header(header[:i]) is None for i in range(len(header)))


starts = st.sampled_from([b"", b"PROXY ", b"PROXY TCP4 ", b"PROXY TCP6 ", b"PROXY UNKNOWN", V2_SIGNATURE])


@st.composite
def mangled(draw: st.DrawFn) -> bytes:
    header, _ = draw(headers())
    at = draw(st.integers(0, len(header) - 1))
    return header[:at] + draw(st.binary(min_size=1, max_size=2)) + header[at + 1 :]


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.binary(), st.builds(bytes.__add__, starts, st.binary()), mangled()))
def test_any_bytes_give_a_header_none_or_proxy_error(data: bytes) -> None:
    # The broker calls again after every read: once the parser has answered, more bytes change nothing.
    outcomes = [outcome(data[:i]) for i in range(len(data) + 1)]
    answers = [o for o in outcomes if o is not None]
    assert answers == answers[:1] * len(answers)
    if answers and isinstance(answers[0], ProxyHeader):  # it answers at its last byte, not later
        assert outcomes[answers[0].length] == answers[0] and outcomes[answers[0].length - 1] is None


def outcome(data: bytes) -> ProxyHeader | str | None:
    try:
        return parse_proxy_header(data)
    except ProxyError as e:
        assert len(str(e)) <= 100 and str(e).isascii() and str(e).isprintable()
        return "ProxyError"
