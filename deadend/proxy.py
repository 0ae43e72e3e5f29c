"""The HAProxy PROXY protocol, versions 1 and 2: a pure parser, no I/O.

A load balancer in front of the broker prepends one header to each connection saying who the real client
is (https://www.haproxy.org/download/2.8/doc/proxy-protocol.txt). The broker reads into a buffer and calls
`parse_proxy_header` after every read: None means "a valid start, read more"; ProxyError means the bytes
can never become a header, which it reports as early as the bytes allow, so a client that types "GET /"
is turned away at once rather than after a timeout. Whether a peer may send a header at all (only trusted
balancers should) is the caller's policy, not this module's.

    v1  "PROXY TCP4 <src> <dst> <sport> <dport>\\r\\n"   (TCP6 alike; "PROXY UNKNOWN...\\r\\n")
    v2  12-byte signature, ver_cmd, family, 2-byte length, then that many bytes (addresses, then TLVs)
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass
from typing import Final

MAX_V1: Final = 107  # the v1 spec's maximum line length including CRLF
MAX_V2_PAYLOAD: Final = 4096  # we refuse longer v2 address+TLV blocks (spec allows 65535)

V1_PREFIX: Final = b"PROXY "
V2_SIGNATURE: Final = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_FIXED: Final = 16  # signature, ver_cmd, family, length

# v2 family/protocol byte -> size of its address block. Only the stream families a TCP server can have
# been handed; the spec's other valid values are the DGRAM ones (0x12, 0x22, 0x32), refused here.
_V2_ADDRESS_BYTES: Final = {0x00: 0, 0x11: 12, 0x21: 36, 0x31: 216}
_V2_DGRAM: Final = (0x12, 0x22, 0x32)

_DIGITS: Final = frozenset("0123456789")
_HEX: Final = frozenset("0123456789abcdefABCDEF")
_IP6_CHARS: Final = _HEX | {":", "."}  # no "%": a scope id means nothing on another host


class ProxyError(ValueError):
    """The bytes are not a valid PROXY header; the message is one short sentence safe to log."""


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    version: int  # 1 or 2
    length: int  # how many bytes of the buffer the header took
    source: tuple[str, int] | None  # the real client; None for v1 UNKNOWN, v2 LOCAL, AF_UNSPEC, AF_UNIX
    destination: tuple[str, int] | None


def parse_proxy_header(data: bytes) -> ProxyHeader | None:
    """The header at the start of `data`, or None if `data` is a valid but incomplete prefix of one.
    Raises ProxyError as soon as `data` cannot be the start of a valid header."""
    if V2_SIGNATURE.startswith(data[:12]):  # also true for b"": no byte yet rules anything out
        return _parse_v2(data)
    if V1_PREFIX.startswith(data[:6]):
        return _parse_v1(data) if len(data) >= len(V1_PREFIX) else None
    raise ProxyError(f"not a PROXY protocol header (starts {_show(data)})")


def _show(raw: bytes) -> str:
    # Hostile bytes go into log lines only escaped and cut short.
    return repr(raw[:12]) + ("..." if len(raw) > 12 else "")


def peer_text(addr: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    """SPEC.md get_ip(): dotted quad, compressed IPv6, IPv4-mapped IPv6 as plain IPv4. The one home of
    the rule: a script sees the same string for a client whether it came directly or through a balancer."""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return addr.compressed


def peer_address(text: str) -> str:
    """`text` (from a recording or a transcript) as peer_text shows it; ValueError if it is not an IP
    address. A scope id (`fe80::1%eth0`) is refused: no client has one, and it is free text."""
    if "%" in text:
        raise ValueError(f"{text!r} has a scope id")
    return peer_text(ipaddress.ip_address(text))


# --- version 2 ------------------------------------------------------------------------------------


def _parse_v2(data: bytes) -> ProxyHeader | None:
    if len(data) > 12:
        version, command = data[12] >> 4, data[12] & 0x0F
        if version != 2:
            raise ProxyError(f"PROXY v2 header has version {version}, expected 2")
        if command not in (0, 1):
            raise ProxyError(f"PROXY v2 command {command} is neither LOCAL (0) nor PROXY (1)")
    local = len(data) > 12 and data[12] & 0x0F == 0
    # LOCAL (a balancer's health check) carries no client: the spec says its family byte is ignored.
    if len(data) > 13 and not local:
        family = data[13]
        if family in _V2_DGRAM:
            raise ProxyError(f"PROXY v2 family 0x{family:02x} is a datagram one; this is a TCP server")
        if family not in _V2_ADDRESS_BYTES:
            raise ProxyError(f"PROXY v2 family/protocol byte 0x{family:02x} is not valid")
    if len(data) < _V2_FIXED:
        return None
    family = data[13]
    (length,) = struct.unpack_from("!H", data, 14)
    if length > MAX_V2_PAYLOAD:
        raise ProxyError(f"PROXY v2 length {length} is over our limit of {MAX_V2_PAYLOAD}")
    needed = 0 if local else _V2_ADDRESS_BYTES[family]
    if length < needed:
        raise ProxyError(f"PROXY v2 length {length} is shorter than its {needed}-byte address block")
    total = _V2_FIXED + length
    if len(data) < total:
        return None
    if local or family in (0x00, 0x31):  # AF_UNSPEC, AF_UNIX: no IP to show; what follows is skipped
        return ProxyHeader(2, total, None, None)
    if family == 0x11:
        src4, dst4 = ipaddress.IPv4Address(data[16:20]), ipaddress.IPv4Address(data[20:24])
        sport, dport = struct.unpack_from("!HH", data, 24)
        return ProxyHeader(2, total, (peer_text(src4), sport), (peer_text(dst4), dport))
    src6, dst6 = ipaddress.IPv6Address(data[16:32]), ipaddress.IPv6Address(data[32:48])
    sport, dport = struct.unpack_from("!HH", data, 48)
    return ProxyHeader(2, total, (peer_text(src6), sport), (peer_text(dst6), dport))


# --- version 1 ------------------------------------------------------------------------------------

_V1_FIELDS: Final = ("source address", "destination address", "source port", "destination port")


def _parse_v1(data: bytes) -> ProxyHeader | None:
    # `data` starts with b"PROXY ". Look no further than one maximal line.
    cr = data.find(b"\r", 0, MAX_V1)
    line = data[:cr] if cr >= 0 else data[:MAX_V1]
    if b"\n" in line:
        raise ProxyError("PROXY v1 line has a LF without a CR before it")
    if len(line) > MAX_V1 - 2:
        raise ProxyError(f"PROXY v1 line is longer than {MAX_V1} bytes")
    if cr >= 0 and len(data) > cr + 1 and data[cr + 1] != 0x0A:
        raise ProxyError("PROXY v1 line has a CR not followed by LF")
    ended = cr >= 0  # the line's content is final even if the LF has not arrived yet
    done = cr >= 0 and len(data) > cr + 1

    proto, space, rest = line[6:].partition(b" ")
    if proto.startswith(b"UNKNOWN"):
        # The spec has receivers ignore whatever follows UNKNOWN up to the CRLF.
        return ProxyHeader(1, cr + 2, None, None) if done else None
    if not space and not ended and any(p.startswith(proto) for p in (b"TCP4", b"TCP6", b"UNKNOWN")):
        return None  # the protocol word is still arriving
    if proto not in (b"TCP4", b"TCP6"):
        raise ProxyError(f"PROXY v1 protocol {_show(proto)} is not TCP4, TCP6 or UNKNOWN")

    fields = rest.split(b" ") if space else []
    if len(fields) > 4:
        raise ProxyError(f"PROXY v1 {proto.decode()} line has more than 4 fields")
    if ended and len(fields) < 4:
        raise ProxyError(f"PROXY v1 {proto.decode()} line has {len(fields)} fields, expected 4")
    addresses: list[str] = []
    ports: list[int] = []
    for i, raw in enumerate(fields):
        final = ended or i < len(fields) - 1  # only the last field of an unended line may still grow
        text = raw.decode("ascii") if raw.isascii() else None
        if text is None or not _v1_field_ok(text, i, proto == b"TCP6", final):
            raise ProxyError(f"PROXY v1 {_V1_FIELDS[i]} {_show(raw)} is not valid")
        if final and i < 2:
            addresses.append(peer_text(ipaddress.ip_address(text)))
        elif final:
            ports.append(int(text))
    if not done:
        return None
    return ProxyHeader(1, cr + 2, (addresses[0], ports[0]), (addresses[1], ports[1]))


def _v1_field_ok(text: str, index: int, ip6: bool, final: bool) -> bool:
    if index >= 2:
        return _port_ok(text, final)
    if ip6:
        return _ip6_ok(text) if final else _ip6_prefix_ok(text)
    return _ip4_ok(text) if final else _ip4_prefix_ok(text)


def _port_ok(text: str, final: bool) -> bool:
    return _decimal_ok(text, 65535) or (not final and not text)


def _decimal_ok(text: str, top: int) -> bool:
    # No sign, no leading zero: one spelling per number, as the spec's printf("%u") writes it.
    return (
        0 < len(text) <= len(str(top))
        and set(text) <= _DIGITS
        and (text == "0" or text[0] != "0")
        and int(text) <= top
    )


def _ip4_prefix_ok(text: str) -> bool:
    """Whether some completion of `text` is a dotted quad."""
    *head, last = text.split(".")
    return len(head) <= 3 and all(_decimal_ok(p, 255) for p in head) and (not last or _decimal_ok(last, 255))


def _ip4_ok(text: str) -> bool:
    parts = text.split(".")
    # ipaddress agrees (it refuses leading zeros since 3.9.5); checking here too keeps the rule visible.
    return len(parts) == 4 and all(_decimal_ok(p, 255) for p in parts) and _is_ip(text, 4)


def _ip6_ok(text: str) -> bool:
    return set(text) <= _IP6_CHARS and _is_ip(text, 6)


def _is_ip(text: str, version: int) -> bool:
    try:
        return ipaddress.ip_address(text).version == version
    except ValueError:
        return False


def _ip6_prefix_ok(text: str) -> bool:
    """Whether some completion of `text` is an IPv6 address as `ipaddress` reads it: eight groups of 1-4 hex
    digits, or fewer around one "::" (which stands for at least one group), the last two groups possibly
    written as a dotted quad."""
    if not set(text) <= _IP6_CHARS or ":::" in text or text.count("::") > 1:
        return False
    if text.startswith(":") and not text.startswith("::") and len(text) > 1:
        return False  # a leading ":" can only begin a "::"
    *head, last = text.split(":")
    groups = [g for g in head if g]  # the empty ones are the two sides of the "::"
    if not all(len(g) <= 4 and set(g) <= _HEX for g in groups):
        return False
    gap = "::" in text
    if "." in last:  # a dotted quad has begun: it takes the last two groups
        return _ip4_prefix_ok(last) and (len(groups) <= 5 if gap else len(groups) == 6)
    if len(last) > 4 or not set(last) <= _HEX:
        return False
    if not gap:
        return len(groups) <= 7  # room for one more group, or for a "::"
    open_colon = text.endswith(":") and not text.endswith("::")  # a group must follow
    return len(groups) + bool(last) + open_colon <= 7
