"""Print the TLS ClientHellos of capture files, one JSON object per TCP stream: how tls_vectors.json was made.

    python tests/data/pcap_hellos.py CAPTURE.pcap[ng] [...]

A deliberately small reader, independent of deadend.clienthello (the code under test must not cut its
own test data): classic pcap and pcapng; Ethernet (with VLAN tags), Linux cooked v1/v2, raw IP and BSD
loopback links; IPv4 and IPv6; TCP streams put back in sequence order (retransmissions and overlaps
dropped). In each client-to-server stream it looks for the first TLS handshake record holding a
ClientHello (not necessarily at the start: behind an HTTP CONNECT, say) and prints the records that
carry that whole handshake message, as hex, with the stream's client and server ports.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

Flow = tuple[str, int, str, int]


def frames(raw: bytes) -> list[tuple[int, bytes]]:
    """(link type, frame bytes) for every packet of a pcap or pcapng file."""
    magic = raw[:4]
    if magic == b"\x0a\x0d\x0d\x0a":
        return _pcapng(raw)
    # microsecond and nanosecond pcap, each in either byte order
    little = (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1")
    end = "<" if magic in little else ">"
    link = struct.unpack_from(end + "I", raw, 20)[0] & 0xFFFF
    out, pos = [], 24
    while pos + 16 <= len(raw):
        caplen = struct.unpack_from(end + "I", raw, pos + 8)[0]
        out.append((link, raw[pos + 16 : pos + 16 + caplen]))
        pos += 16 + caplen
    return out


def _pcapng(raw: bytes) -> list[tuple[int, bytes]]:
    out: list[tuple[int, bytes]] = []
    links: list[int] = []
    end, pos = "<", 0
    while pos + 12 <= len(raw):
        if raw[pos : pos + 4] == b"\x0a\x0d\x0d\x0a":  # section header: byte order, interfaces restart
            end = "<" if raw[pos + 8 : pos + 12] == b"\x4d\x3c\x2b\x1a" else ">"
            links = []
        kind, size = struct.unpack_from(end + "II", raw, pos)
        body = raw[pos + 8 : pos + size - 4]
        if kind == 1:
            links.append(struct.unpack_from(end + "H", body, 0)[0])
        elif kind == 6:
            iface, _, _, caplen = struct.unpack_from(end + "IIII", body, 0)
            out.append((links[iface], body[20 : 20 + caplen]))
        elif kind == 3:
            out.append((links[0], body[4:]))
        pos += size
    return out


def ip_packet(link: int, frame: bytes) -> bytes | None:
    if link == 1:  # Ethernet
        kind, pos = struct.unpack_from("!H", frame, 12)[0], 14
        while kind in (0x8100, 0x88A8):
            kind, pos = struct.unpack_from("!H", frame, pos + 2)[0], pos + 4
        return frame[pos:] if kind in (0x0800, 0x86DD) else None
    if link == 113:  # Linux cooked v1
        return frame[16:]
    if link == 276:  # Linux cooked v2
        return frame[20:]
    if link in (101, 12, 14):  # raw IP
        return frame
    if link in (0, 108):  # BSD loopback: a 4-byte family
        return frame[4:]
    return None


def tcp_segment(packet: bytes) -> tuple[Flow, int, int, bytes] | None:
    """(flow, sequence number, flags, payload) of a TCP packet."""
    version = packet[0] >> 4
    if version == 4:
        header, proto, total = (packet[0] & 0x0F) * 4, packet[9], struct.unpack_from("!H", packet, 2)[0]
        src, dst = ".".join(map(str, packet[12:16])), ".".join(map(str, packet[16:20]))
        payload = packet[header:total]
    elif version == 6:
        proto, pos = packet[6], 40
        while proto in (0, 43, 60):  # hop-by-hop, routing, destination options
            proto, pos = packet[pos], pos + 8 + packet[pos + 1] * 8
        src, dst = packet[8:24].hex(), packet[24:40].hex()
        payload = packet[pos : 40 + struct.unpack_from("!H", packet, 4)[0]]
    else:
        return None
    if proto != 6:
        return None
    sport, dport, seq = struct.unpack_from("!HHI", payload, 0)
    offset, flags = payload[12] >> 4, payload[13]
    return (src, sport, dst, dport), seq, flags, payload[offset * 4 :]


def streams(raw: bytes) -> list[tuple[Flow, bytes]]:
    """(flow, bytes in order) for each direction of each TCP connection, in order of first data."""
    segments: dict[Flow, list[tuple[int, bytes]]] = {}
    isn: dict[Flow, int] = {}
    for link, frame in frames(raw):
        packet = ip_packet(link, frame)
        seg = tcp_segment(packet) if packet else None
        if seg is None:
            continue
        flow, seq, flags, data = seg
        if flags & 0x02:  # SYN: data starts one past it
            isn[flow] = seq + 1
        if data:
            segments.setdefault(flow, []).append((seq, data))
    out = []
    for flow, parts in segments.items():
        base = isn.get(flow, min(s for s, _ in parts))
        stream = bytearray()
        for rel, data in sorted(((s - base) % 2**32, d) for s, d in parts):
            if rel + len(data) > len(stream) >= rel:
                stream += data[len(stream) - rel :]
        out.append((flow, bytes(stream)))
    return out


def client_hello_records(stream: bytes) -> bytes | None:
    """The handshake records carrying the first ClientHello in `stream`."""
    start = 0
    while (start := stream.find(b"\x16\x03", start)) >= 0:
        if len(stream) > start + 5 and stream[start + 5] == 1:
            break
        start += 1
    else:
        return None
    pos, message = start, b""
    while len(message) < 4 or len(message) < 4 + int.from_bytes(message[1:4], "big"):
        if stream[pos] != 0x16 or pos + 5 > len(stream):
            return None
        size = struct.unpack_from("!H", stream, pos + 3)[0]
        message += stream[pos + 5 : pos + 5 + size]
        pos += 5 + size
    return stream[start:pos] if pos <= len(stream) else None


def main(paths: list[str]) -> None:
    for path in paths:
        for flow, data in streams(Path(path).read_bytes()):
            records = client_hello_records(data)
            if records is not None:
                info = {"file": Path(path).name, "client_port": flow[1], "server_port": flow[3]}
                print(json.dumps({**info, "hex": records.hex()}))


if __name__ == "__main__":
    main(sys.argv[1:])
