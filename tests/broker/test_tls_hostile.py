"""Hostile TLS clients against the real broker: a corpus of malformed, oversized, truncated and stalled
ClientHellos, and 10,000 fuzzed TLS records, before and during the handshake.

Nothing may crash or stall the broker: each connection ends with exactly one session.end line with its
reason, the handshakes that fail say why in one tls.failed line each, and afterwards the broker still
serves a real client. The legal extremes (a hello spread over 64 records, a hello near 64 KiB) complete.
"""

from __future__ import annotations

import collections
import json
import random
import socket
import ssl
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from deadend.clienthello import MAX_HELLO, MAX_RECORDS
from tests.broker.test_ops_events import json_records
from tests.conftest import DATA, HOST, Broker

SCRIPT = "if deadend.starttls() then deadend.send('ok') deadend.recv(100) end"
VECTORS = [
    bytes.fromhex(v["records"]) for v in json.loads((DATA / "tls_vectors.json").read_text())["vectors"]
]


def message_of(records: bytes) -> bytes:
    """The handshake message the records of a vector carry (each of them has one record)."""
    return records[5:]


def as_records(message: bytes, sizes: list[int], version: bytes = b"\x03\x01") -> bytes:
    out, at = b"", 0
    for size in sizes:
        piece = message[at : at + size]
        if not piece:
            break
        out += b"\x16" + version + len(piece).to_bytes(2, "big") + piece
        at += size
    if at < len(message):
        piece = message[at:]
        out += b"\x16" + version + len(piece).to_bytes(2, "big") + piece
    return out


def with_padding(message: bytes, total: int) -> bytes:
    """The hello grown to a body of `total` bytes with a padding extension (RFC 7685)."""
    body = message[4:]
    fixed = 2 + 32
    session = body[fixed]
    at = fixed + 1 + session
    ciphers = int.from_bytes(body[at : at + 2], "big")
    at += 2 + ciphers
    at += 1 + body[at]
    ext_len = int.from_bytes(body[at : at + 2], "big")
    pad = total - len(body) - 4
    extensions = body[at + 2 : at + 2 + ext_len] + b"\x00\x15" + pad.to_bytes(2, "big") + bytes(pad)
    new = body[:at] + len(extensions).to_bytes(2, "big") + extensions
    return b"\x01" + len(new).to_bytes(3, "big") + new


BASE = message_of(VECTORS[0])  # Chrome's TLS 1.3 hello
UNPADDED = message_of(VECTORS[6])  # a TLS 1.2 hello without a padding extension (one of ours is added)
CORPUS: dict[str, tuple[bytes, str]] = {
    # name: (what the client sends, then closes its side; the tls.failed error expected, "" if none)
    "plaintext-http": (
        b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
        "not a TLS handshake record (content type 0x47)",
    ),
    "ssh-banner": (b"SSH-2.0-OpenSSH_9.6\r\n", "not a TLS handshake record (content type 0x53)"),
    "sslv2-hello": (b"\x80\x2e\x01\x00\x02\x00\x15", "SSL 2.0 style, not read"),
    "alert-first": (b"\x15\x03\x03\x00\x02\x02\x28", "not a TLS handshake record (content type 0x15)"),
    "record-major-2": (b"\x16\x02\x00\x00\x05", "TLS record major version 2 is not 3"),
    "record-length-0": (b"\x16\x03\x01\x00\x00", "TLS handshake record length 0 is not in 1..16384"),
    "record-length-16385": (b"\x16\x03\x01\x40\x01", "TLS handshake record length 16385 is not in 1..16384"),
    "not-a-client-hello": (
        b"\x16\x03\x01\x00\x04\x02\x00\x00\x00",
        "handshake message type 2 is not a ClientHello",
    ),
    "oversized-hello": (
        b"\x16\x03\x01\x00\x04\x01\xff\xff\xff",
        "ClientHello length 16777215 is over our limit",
    ),
    "hello-too-short": (b"\x16\x03\x01\x00\x04\x01\x00\x00\x05", "shorter than its fixed fields"),
    "record-past-the-hello": (
        as_records(BASE + b"\x00\x00", [len(BASE) + 2]),
        "a handshake record carries 2 bytes past the ClientHello",
    ),
    "alert-inside-the-hello": (
        as_records(BASE, [100])[:105] + b"\x15\x03\x03\x00\x02\x02\x28",
        "a non-handshake record inside the hello (content type 0x15)",
    ),
    "bogus-session-id-length": (
        as_records(BASE[:38] + b"\xff" + BASE[39:], [len(BASE)]),
        "session_id length",
    ),
    "bogus-cipher-length": (
        as_records(BASE[:71] + b"\xff\xff" + BASE[73:], [len(BASE)]),
        "cipher_suites length 65535 overruns its container",
    ),
    "truncated-then-closed": (
        VECTORS[0][:300],
        "the client closed the connection before its ClientHello was complete",
    ),
    "65-records": (
        as_records(BASE, [1] * MAX_RECORDS),
        f"ClientHello spans more than {MAX_RECORDS} records",
    ),
    "a-hello-no-cipher-openssl-serves": (
        as_records(b"\x01\x00\x00\x29\x03\x03" + bytes(32) + b"\x00\x00\x02\x00\x00\x01\x00", [45]),
        "TLS handshake failed: NO_SHARED_CIPHER",
    ),
}


def exchange(port: int, data: bytes, timeout: float = 15.0) -> bytes:
    """Send `data`, stop sending, read until the server closes: what the server sent."""
    with socket.create_connection((HOST, port), timeout=timeout) as s:
        try:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        except OSError:  # the server may close (and reset) before it read everything
            return b""
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except OSError:
            pass
        return got


def ends_by_peer_port(b: Broker, expected: int, timeout: float = 30.0) -> dict[int, list[dict[str, Any]]]:
    deadline = time.monotonic() + timeout
    while True:
        records = json_records([line for line in list(b.lines) if line.startswith("{")])
        by_port: dict[int, list[dict[str, Any]]] = collections.defaultdict(list)
        for r in records:
            if r["conn"] is not None:
                by_port[r["peer_port"]].append(r)
        ends = sum(1 for r in records if r["event"] == "session.end")
        if ends >= expected or time.monotonic() > deadline:
            return by_port
        time.sleep(0.1)


def real_client_works(b: Broker) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection((HOST, b.port(7)), timeout=10) as raw, context.wrap_socket(raw) as tls:
        assert tls.recv(2) == b"ok"


@pytest.fixture
def broker(make_broker) -> Broker:
    return make_broker(
        {"7.lua": SCRIPT},
        *("--log-format", "json", "--tls-handshake-timeout", "3", "--sessions-per-worker", "64"),
        *("--workers", "4", "--max-per-ip", "1000", "--queue-timeout", "30"),
    )


def test_the_hostile_corpus_each_ends_once_with_its_reason(broker: Broker) -> None:
    b = broker
    ports: dict[str, int] = {}
    for name, (data, _error) in CORPUS.items():
        with socket.create_connection((HOST, b.port(7)), timeout=15) as s:
            ports[name] = s.getsockname()[1]
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
            s.settimeout(15)
            while s.recv(65536):
                pass
    by_port = ends_by_peer_port(b, len(CORPUS))
    for name, (_data, error) in CORPUS.items():
        events = by_port[ports[name]]
        ends = [e for e in events if e["event"] == "session.end"]
        failed = [e for e in events if e["event"] == "tls.failed"]
        assert len(ends) == 1 and len(failed) == 1, (name, events)
        assert ends[0]["reason"] == "tls-handshake", (name, ends[0])
        assert error in failed[0]["error"], (name, failed[0]["error"])
    real_client_works(b)


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("64-records", as_records(BASE, [1] * (MAX_RECORDS - 1))),  # the most records a hello may take
        ("near-64-KiB", as_records(with_padding(UNPADDED, MAX_HELLO - 200), [16384] * 4)),
    ],
)
def test_the_legal_extremes_complete(broker: Broker, name: str, message: bytes) -> None:
    got = exchange(broker.port(7), message)
    assert got[:1] == b"\x16" and got[5:6] == b"\x02", got[:16]  # a ServerHello: OpenSSL took the hello
    by_port = ends_by_peer_port(broker, 1)
    assert sum(1 for events in by_port.values() for e in events if e["event"] == "session.end") == 1


def mutated(rnd: random.Random) -> tuple[bytes, int]:
    """One connection's bytes: a real hello, mutated and split into records, then fuzzed records of every
    content type, as a handshake in progress would receive them. Returns the bytes and the record count."""
    message = bytearray(message_of(rnd.choice(VECTORS)))
    for _ in range(rnd.choice((0, 0, 1, 2, 8))):
        message[rnd.randrange(4, len(message))] = rnd.randrange(256)
    if rnd.random() < 0.2:  # a length field somewhere made wrong
        at = rnd.randrange(4, len(message) - 1)
        message[at : at + 2] = rnd.randrange(65536).to_bytes(2, "big")
    if rnd.random() < 0.1:
        del message[rnd.randrange(4, len(message)) :]
    sizes = [rnd.randint(1, 600) for _ in range(rnd.choice((1, 1, 2, 4, 16)))]
    data = as_records(bytes(message), sizes, rnd.choice((b"\x03\x01", b"\x03\x03", b"\x03\x00")))
    count = data.count(b"\x16\x03")  # about the records (a payload may hold the pattern: fine for a count)
    for _ in range(rnd.randint(5, 40)):
        kind = rnd.choice((20, 21, 22, 23, 22, 23, rnd.randrange(256)))
        payload = rnd.randbytes(rnd.choice((1, 2, 6, 32, 300, 2000)))
        header = bytes([kind]) + rnd.choice((b"\x03\x03", b"\x03\x01", rnd.randbytes(2)))
        length = len(payload) if rnd.random() < 0.9 else rnd.randrange(65536)
        data += header + length.to_bytes(2, "big") + payload
        count += 1
    return data, count


def test_ten_thousand_fuzzed_records(broker: Broker) -> None:
    seed = random.randrange(1 << 32)
    print(f"fuzz seed {seed}")
    rnd = random.Random(seed)
    connections: list[bytes] = []
    total = 0
    while total < 10_000:
        data, count = mutated(rnd)
        connections.append(data)
        total += count
    rss_before = rss_kib(broker.proc.pid)
    started = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda data: exchange(broker.port(7), data), connections))
    elapsed = time.monotonic() - started
    by_port = ends_by_peer_port(broker, len(connections), timeout=60)
    ends = [e for events in by_port.values() for e in events if e["event"] == "session.end"]
    reasons = collections.Counter(e["reason"] for e in ends)
    print(f"{total} records in {len(connections)} connections, {elapsed:.1f} s: {dict(reasons)}")
    assert len(ends) == len(connections), reasons
    assert all(sum(e["event"] == "session.end" for e in events) == 1 for events in by_port.values())
    assert set(reasons) <= {"tls-handshake", "done"}, reasons
    assert reasons["tls-handshake"] > len(connections) // 2
    assert sum(1 for a in answers if a[:1] == b"\x16") > 10  # some hellos reached OpenSSL's handshake
    assert elapsed < 120
    assert rss_kib(broker.proc.pid) - rss_before < 64 * 1024  # the broker's memory stays bounded
    real_client_works(broker)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
