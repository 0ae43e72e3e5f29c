"""What reading and fingerprinting a ClientHello costs the broker, beside the handshake it precedes.

    python bench/clienthello.py [--rounds 20000]

1. read_client_hello + ja4 + ja3 on a Chrome ClientHello (tests/data/tls_vectors.json), per hello: the
   work the broker adds to every TLS connection. Also the costliest hello within the bounds (64 KiB,
   every list at MAX_ITEMS) and fuzzed mutations of the browser hello (the worst of 10,000, their p99).
2. Baseline, same run: the server's side of a TLS 1.3 handshake in memory (ssl.SSLObject over memory
   BIOs, ECDSA P-256 certificate from deadend.tlscert, a Python ssl client on the other side), so the
   figure above reads as a share of what a TLS connection costs anyway.

Each figure is the wall time of single calls (per-call CPU clocks are too coarse), on a machine shared
with others: read the medians, and the ratio to the baseline.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import ssl
import statistics
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from deadend.clienthello import MAX_HELLO, MAX_ITEMS, Complete, ja3, ja4, read_client_hello  # noqa: E402
from deadend.tlscert import generate_certificate, server_context  # noqa: E402


def timed(fn: Callable[[], object], rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        start = time.perf_counter_ns()
        fn()
        out.append((time.perf_counter_ns() - start) / 1000)
    return out


def summary(label: str, micros: list[float]) -> str:
    ordered = sorted(micros)
    p99 = ordered[int(len(ordered) * 0.99) - 1]
    return f"{label:<58} median {statistics.median(ordered):8.1f} us   p99 {p99:8.1f} us   (N={len(ordered)})"


def fingerprint(data: bytes) -> None:
    result = read_client_hello(data)
    assert isinstance(result, Complete)
    ja4(result.hello), ja3(result.hello)


def handshake_once(server: ssl.SSLContext, client: ssl.SSLContext) -> float:
    """Microseconds the server side spends in one in-memory handshake."""
    s_in, s_out, c_in, c_out = ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO(), ssl.MemoryBIO()
    srv = server.wrap_bio(s_in, s_out, server_side=True)
    cli = client.wrap_bio(c_in, c_out, server_hostname="www.example.com")
    spent = 0
    done = {"server": False, "client": False}
    while not all(done.values()):
        for side, obj, out, peer_in in (("client", cli, c_out, s_in), ("server", srv, s_out, c_in)):
            if done[side]:
                continue
            start = time.perf_counter_ns()
            try:
                obj.do_handshake()
                done[side] = True
            except ssl.SSLWantReadError:
                pass
            if side == "server":
                spent += time.perf_counter_ns() - start
            peer_in.write(out.read())
    return spent / 1000


def mutate(rnd: random.Random, wire: bytes) -> bytes:
    data = bytearray(wire)
    for _ in range(rnd.randint(1, 4)):
        at = rnd.randrange(len(data))
        data[at : at + 2] = rnd.choice([bytes([rnd.randrange(256)]), b"\x00\x00", b"\xff\xff", b""])
    return bytes(data)


def attempt(data: bytes) -> None:
    try:
        result = read_client_hello(data)
    except ValueError:
        return
    if isinstance(result, Complete):
        ja4(result.hello), ja3(result.hello)


def costliest_hello() -> bytes:
    """The hello that asks the most work of us within the bounds: every list at MAX_ITEMS (extensions,
    ciphers, signature algorithms, groups, ALPN protocols, server names), padded to MAX_HELLO."""

    def vec(width: int, data: bytes) -> bytes:
        return len(data).to_bytes(width, "big") + data

    n = MAX_ITEMS
    u16s = b"".join(struct.pack("!H", 0x0100 + i) for i in range(n))
    known = [
        (0x0000, vec(2, b"\x00\x00\x00" * n)),
        (0x0010, vec(2, b"\x01a" * n)),
        (0x000D, vec(2, u16s)),
        (0x000A, vec(2, u16s)),
        (0x002B, vec(1, u16s[:254])),
        (0x000B, vec(1, bytes(255))),
    ]
    others = [(0x4000 + i, b"") for i in range(n - len(known) - 1)]
    head = b"\x03\x03" + bytes(32) + b"\x00" + vec(2, u16s) + b"\x01\x00"

    def body(padding: int) -> bytes:
        exts = [*known, *others, (0x0015, bytes(padding))]
        return head + vec(2, b"".join(struct.pack("!H", t) + vec(2, d) for t, d in exts))

    message = b"\x01" + MAX_HELLO.to_bytes(3, "big") + body(MAX_HELLO - len(body(0)))
    chunks = [message[i : i + 16384] for i in range(0, len(message), 16384)]
    return b"".join(b"\x16\x03\x01" + struct.pack("!H", len(c)) + c for c in chunks)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--rounds", type=int, default=20000)
    args = parser.parse_args()
    vectors = json.loads((REPO / "tests" / "data" / "tls_vectors.json").read_text())["vectors"]
    chrome = bytes.fromhex(next(v for v in vectors if v["name"] == "chrome-tls13-grease-h2")["records"])
    print(f"{platform.python_implementation()} {platform.python_version()}, {ssl.OPENSSL_VERSION}, ", end="")
    print(f"{platform.machine()}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")

    for _ in range(1000):  # warm up
        fingerprint(chrome)
    label = f"read + JA4 + JA3, a Chrome hello ({len(chrome)} bytes)"
    print(summary(label, timed(lambda: fingerprint(chrome), args.rounds)))
    print(
        summary(
            "read_client_hello alone, the same hello", timed(lambda: read_client_hello(chrome), args.rounds)
        )
    )
    print(
        summary(
            "one NeedMore answer (the hello minus its last byte)",
            timed(lambda: read_client_hello(chrome[:-1]), args.rounds),
        )
    )

    rnd = random.Random(1)
    fuzz = []
    for data in (mutate(rnd, chrome) for _ in range(10_000)):
        start = time.perf_counter_ns()
        attempt(data)
        fuzz.append((time.perf_counter_ns() - start) / 1000)
    print(summary("10,000 fuzzed mutations of it, any outcome", fuzz) + f"   worst {max(fuzz):.1f} us")
    big = costliest_hello()
    label = f"read + JA4 + JA3, the costliest hello we accept ({len(big)} B)"
    print(summary(label, timed(lambda: fingerprint(big), 200)))

    material = generate_certificate("www.example.com")
    server = server_context(material)
    client = ssl.create_default_context(cadata=material.cert_pem.decode())
    client.set_alpn_protocols(["h2", "http/1.1"])
    for _ in range(20):
        handshake_once(server, client)
    rounds = max(200, args.rounds // 20)
    baseline = [handshake_once(server, client) for _ in range(rounds)]
    print(summary("baseline: the server's side of a TLS 1.3 handshake (P-256)", baseline))


if __name__ == "__main__":
    main()
