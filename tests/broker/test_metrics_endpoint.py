"""`--metrics` against hostile clients: a real broker, real sockets on loopback.

The endpoint has no authentication, so whoever reaches its address can hold connections open, send huge
heads or never finish one. None of that may cost the broker threads, memory or its ability to serve.
"""

from __future__ import annotations

import contextlib
import re
import smtplib
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tests.conftest import EXAMPLES, HOST, Broker

IDLE = 200
BIG_HEAD = b"GET /metrics HTTP/1.1\r\nHost: x\r\n" + b"".join(
    b"X-Pad-%02d: " % i + b"a" * (64 * 1024 - 16) + b"\r\n" for i in range(99)
)  # 99 headers of almost 64 KiB each: within http.server's per-line and header-count limits


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def proc_status(pid: int) -> tuple[int, int]:
    """The process's thread count and resident memory in bytes, from /proc/PID/status."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines())
    return int(fields["Threads"]), int(fields["VmRSS"].split()[0]) * 1024


def get(port: int, request: bytes = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n") -> tuple[bytes, bytes]:
    """The response's head and body, read until the server closes."""
    with socket.create_connection((HOST, port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return head, body


def status_of(head: bytes) -> int:
    m = re.match(rb"HTTP/1\.[01] (\d{3}) ", head)
    return int(m.group(1)) if m else 0


def send_big(port: int) -> bytes:
    """Send BIG_HEAD (the server may close or reset before it is all sent); whatever came back."""
    with socket.create_connection((HOST, port), timeout=10) as s:
        try:
            s.sendall(BIG_HEAD + b"\r\n")
            return s.recv(65536)
        except OSError:  # reset by a server that stopped reading: what the test wants
            return b""


def start(make_broker, *args: str) -> tuple[Broker, int]:
    mport = free_port()
    b = make_broker({"25.lua": (EXAMPLES / "25.lua").read_text()}, "--metrics", f"{HOST}:{mport}", *args)
    b.wait_for(rf"metrics on http://{re.escape(HOST)}:{mport}/metrics")
    return b, mport


def test_idle_connections_and_huge_heads_cost_no_threads_or_memory(make_broker) -> None:
    b, mport = start(make_broker)
    head, body = get(mport)
    assert status_of(head) == 200 and b"deadend_build_info" in body
    threads0, rss0 = proc_status(b.proc.pid)
    peak_threads, peak_rss = threads0, rss0

    def sample() -> None:
        nonlocal peak_threads, peak_rss
        threads, rss = proc_status(b.proc.pid)
        peak_threads, peak_rss = max(peak_threads, threads), max(peak_rss, rss)

    def ten_big_heads_at_once() -> list[bytes]:
        with ThreadPoolExecutor(10) as pool:
            sending = [pool.submit(send_big, mport) for _ in range(10)]
            while not all(f.done() for f in sending):
                sample()
                time.sleep(0.01)
            return [f.result() for f in sending]

    idle = [socket.create_connection((HOST, mport), timeout=10) for _ in range(IDLE)]
    try:
        time.sleep(0.5)  # the broker has accepted them all by now
        sample()
        ten_big_heads_at_once()
        # The broker still serves attackers meanwhile.
        with smtplib.SMTP(HOST, b.port(25), timeout=10) as smtp:
            assert smtp.ehlo()[0] == 250
        sample()
    finally:
        for s in idle:
            s.close()
    # With room again, the huge heads are read up to the head limit and refused: at most 8 KiB each.
    answers = ten_big_heads_at_once()
    sample()
    assert peak_threads <= 16, (threads0, peak_threads)
    assert peak_rss - rss0 <= 32 << 20, (rss0 >> 20, peak_rss >> 20)
    assert all(a == b"" or status_of(a) == 431 for a in answers), answers
    head, body = get(mport)
    assert status_of(head) == 200 and b"deadend_build_info" in body


def test_a_silent_client_is_dropped_after_the_head_timeout(make_broker) -> None:
    _b, mport = start(make_broker)
    with socket.create_connection((HOST, mport), timeout=15) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the rest
        began = time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            assert s.recv(1024) == b""
        waited = time.monotonic() - began
    assert 4.0 <= waited <= 8.0, waited  # HEAD_TIMEOUT is 5 s


def test_one_response_per_connection_without_a_version_banner(make_broker) -> None:
    _b, mport = start(make_broker)
    # A second request on the same connection is not answered: the server closes after the first.
    head, body = get(mport, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\nGET /metrics HTTP/1.1\r\n\r\n")
    headers = head.lower().split(b"\r\n")
    assert status_of(head) == 200 and body.count(b"# HELP deadend_build_info") == 1
    assert not any(h.startswith(b"server:") for h in headers), headers
    assert status_of(get(mport, b"GET / HTTP/1.1\r\n\r\n")[0]) == 404
    assert status_of(get(mport, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n")[0]) == 405
