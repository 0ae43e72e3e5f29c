"""What TLS costs: the broker's CPU per TLS session, and the time to first byte of 443.lua beside 80.lua.

    python bench/tls.py [--sessions 400] [--rounds 200] [--key-type rsa|ecdsa|both]

One broker (`python -m deadend broker`, default mode: one sandboxed child per session) serves copies of
examples/80.lua and examples/443.lua with their tarpit set to 0 (else its 150-450 ms per read sets the
pace). 443.lua is 80.lua behind `deadend.starttls("http/1.1")`, so the difference between the two is
what TLS adds. Every figure is measured on both ports in alternating rounds, in the same run.

1. TTFB: a Python ssl client (TLS 1.3, SNI, ALPN h2,http/1.1, as browsers offer) or a plain socket
   connects, sends `GET / HTTP/1.1` and reads the first byte of the response: connect() to that byte,
   one client at a time, p50 and p99 over --rounds each.
2. CPU per session, 8 concurrent clients each doing connect, GET /, read the whole page, close:
   - the broker process alone (utime + stime): where TLS runs;
   - every process of the server (broker, zygote, its fork server, the children it reaped), as
     bench/run.py figure 2 counts them;
   each window ends once the broker has logged every session end and the zygote has reaped every child
   but the warm ones. Divided by sessions. The TLS rows' difference to the plain rows is TLS's cost.
3. The broker's own account of its handshakes: deadend_tls_cpu_seconds_total over
   deadend_tls_handshakes_total from its metrics (the sum of the tls.handshake events' cpu_ms: the
   ClientHello's parsing and fingerprints and OpenSSL's handshake, on the event loop thread's CPU clock).

The certificate is the one the broker generates at start-up: RSA 2048 by default (--tls-key-type rsa),
ECDSA P-256 with --key-type ecdsa; `both` runs one broker after the other.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import platform
import re
import shutil
import socket
import ssl
import statistics
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))


def _harness() -> Any:
    """bench/run.py, whose server handling (Served: start, CPU readings, quiesce) this reuses."""
    spec = importlib.util.spec_from_file_location("deadend_bench_run", BENCH / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


_run = _harness()
HOST: str = _run.HOST
Served = _run.Served
cpu_times = _run.cpu_times
pct = _run.pct

PLAIN, TLS = 80, 443
CLIENTS = 8
REQUEST = b"GET / HTTP/1.1\r\nHost: www.example.com\r\nUser-Agent: bench\r\nConnection: close\r\n\r\n"
PAGE_END = b"</html>\n"


def scripts_folder() -> Path:
    """80.lua and 443.lua without their tarpit."""
    folder = Path(tempfile.mkdtemp(prefix="deadend-bench-tls-"))
    for port in (PLAIN, TLS):
        source = (REPO / "examples" / f"{port}.lua").read_text()
        tarpit = r"local TARPIT_BASE, TARPIT_JITTER = \d+, \d+"
        fast, n = re.subn(tarpit, "local TARPIT_BASE, TARPIT_JITTER = 0, 0", source)
        assert n == 1, f"{port}.lua: the tarpit line moved"
        (folder / f"{port}.lua").write_text(fast)
    return folder


CONTEXT = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
CONTEXT.check_hostname = False
CONTEXT.verify_mode = ssl.CERT_NONE
CONTEXT.set_alpn_protocols(["h2", "http/1.1"])


def exchange(port: int, tls: bool, whole: bool) -> float:
    """connect() to the first byte of the response (seconds); with `whole`, the page read to its end."""
    started = time.perf_counter()
    raw = socket.create_connection((HOST, port), timeout=30)
    sock: socket.socket = CONTEXT.wrap_socket(raw, server_hostname="www.example.com") if tls else raw
    with sock:
        sock.sendall(REQUEST)
        data = sock.recv(65536)
        first = time.perf_counter() - started
        assert data.startswith(b"HTTP/1.1 200 OK"), data[:80]
        while whole and not data.endswith(PAGE_END):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return first


def ttfb(served: Any, rounds: int) -> dict[int, list[float]]:
    times: dict[int, list[float]] = {PLAIN: [], TLS: []}
    for i in range(rounds * 2):
        port = (PLAIN, TLS)[i % 2]
        times[port].append(exchange(served.port(port), port == TLS, whole=True) * 1000)
    served.expected += rounds * 2
    served.quiesce()
    return times


def cpu_per_session(served: Any, port: int, sessions: int) -> tuple[float, float]:
    """(broker ms, all processes ms) per session, `sessions` over CLIENTS concurrent clients."""
    assert served.proc is not None
    broker_before, all_before = cpu_times(served.proc.pid)[0], served.cpu_seconds()

    def one(_: int) -> float:
        return exchange(served.port(port), port == TLS, whole=True)

    with ThreadPoolExecutor(CLIENTS) as pool:
        list(pool.map(one, range(sessions)))
    served.expected += sessions
    served.quiesce()
    broker = cpu_times(served.proc.pid)[0] - broker_before
    total = served.cpu_seconds() - all_before
    return broker / sessions * 1000, total / sessions * 1000


def machine() -> str:
    model = "unknown CPU"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return (
        f"{os.cpu_count()}-core {platform.machine()} ({model}), Linux {platform.release()}, "
        f"Python {platform.python_version()}, {ssl.OPENSSL_VERSION}"
    )


def run(key_type: str, sessions: int, rounds: int, folder: Path) -> list[tuple[str, str, str, str]]:
    metrics = free_port()
    argv = [sys.executable, "-m", "deadend", "broker", "--scripts", str(folder), "--host", HOST]
    argv += ["--log-format", "json", "--tls-key-type", key_type, "--tls-name", "www.example.com"]
    argv += ["--max-per-ip", "1000", "--metrics", f"{HOST}:{metrics}"]
    # CPU is read over one zygote, which must not be replaced mid-run; the call throttles are lifted, as
    # bench/run.py lifts them, so that they do not set the pace
    argv += ["--zygote-forks", "1000000000", "--call-rate", "10000000", "--call-rate-total", "1e8"]
    argv += ["--allow-root"] if os.geteuid() == 0 else []
    served = Served(f"deadend ({key_type})", argv, warm=4, isolated=True)
    served.start([PLAIN, TLS])
    try:
        exchange(served.port(PLAIN), False, True), exchange(served.port(TLS), True, True)  # warm up
        served.expected += 2
        served.quiesce()
        times = ttfb(served, rounds)
        plain = cpu_per_session(served, PLAIN, sessions)
        tls = cpu_per_session(served, TLS, sessions)
        plain_again = cpu_per_session(served, PLAIN, sessions)  # the machine's drift, both sides of TLS
        tls_again = cpu_per_session(served, TLS, sessions)
        handshake = handshake_cpu_ms(metrics)
    finally:
        served.stop()
    plain_cpu = tuple(statistics.mean(v) for v in zip(plain, plain_again, strict=True))
    tls_cpu = tuple(statistics.mean(v) for v in zip(tls, tls_again, strict=True))
    rows = [
        (
            "TTFB of GET /, one client, p50",
            f"{pct(times[TLS], 50):.2f} ms",
            f"{pct(times[PLAIN], 50):.2f} ms",
        ),
        (
            "TTFB of GET /, one client, p99",
            f"{pct(times[TLS], 99):.2f} ms",
            f"{pct(times[PLAIN], 99):.2f} ms",
        ),
        ("broker process CPU per session (8 clients)", f"{tls_cpu[0]:.2f} ms", f"{plain_cpu[0]:.2f} ms"),
        ("all processes' CPU per session (8 clients)", f"{tls_cpu[1]:.2f} ms", f"{plain_cpu[1]:.2f} ms"),
    ]
    rows += [
        ("TLS adds, broker process", f"{tls_cpu[0] - plain_cpu[0]:.2f} ms", ""),
        ("TLS adds, all processes", f"{tls_cpu[1] - plain_cpu[1]:.2f} ms", ""),
        ("the broker's own account: CPU per handshake (metrics)", f"{handshake:.2f} ms", ""),
    ]
    return [(key_type, *row) for row in rows]


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def handshake_cpu_ms(metrics_port: int) -> float:
    """The mean broker CPU per handshake, from the broker's own metrics."""
    with urllib.request.urlopen(f"http://{HOST}:{metrics_port}/metrics", timeout=10) as response:
        text = response.read().decode()
    cpu = sum(float(v) for v in re.findall(r"^deadend_tls_cpu_seconds_total\{[^}]*\} (\S+)$", text, re.M))
    count = sum(
        float(v) for v in re.findall(r'^deadend_tls_handshakes_total\{[^}]*result="ok"\} (\S+)$', text, re.M)
    )
    return cpu / count * 1000 if count else float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=400, help="sessions per CPU window (default 400)")
    parser.add_argument("--rounds", type=int, default=200, help="TTFB samples per port (default 200)")
    parser.add_argument("--key-type", choices=("rsa", "ecdsa", "both"), default="both")
    args = parser.parse_args()
    folder = scripts_folder()
    started = datetime.datetime.now(datetime.UTC)
    rows: list[tuple[str, str, str, str]] = []
    try:
        for key_type in ("rsa", "ecdsa") if args.key_type == "both" else (args.key_type,):
            rows += run(key_type, args.sessions, args.rounds, folder)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    print(__doc__)
    print(f"Run {started:%Y-%m-%d %H:%M} UTC on {machine()}; load average now {os.getloadavg()[0]:.2f}.")
    print(f"--sessions {args.sessions} --rounds {args.rounds}\n")
    print("| key | figure | 443.lua (TLS) | 80.lua (plain) |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
