"""Real collectors for the sinks' tests: rsyslogd, nats-server and an hpfeeds broker, each on loopback on a
free port with its own config in a temporary folder, stopped by pid. A collector whose program is absent
skips its tests, saying which package to install (CI installs them all: .ci/run)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

from deadend.sinks import OutEvent, SinkSet, Timing, parse_sink_url

HOST = "127.0.0.1"


@contextlib.contextmanager
def raw_server(on_accept: Callable[[socket.socket], bool]) -> Iterator[int]:
    """A bare TCP server on loopback (something on the port that is not the collector), its port: each
    connection goes to `on_accept` in the server's thread, which says whether to keep it open. Kept ones
    are closed, and the thread stopped, at the end."""
    server = socket.socket()
    server.bind((HOST, 0))
    server.listen()
    server.settimeout(0.1)
    held: list[socket.socket] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            if on_accept(conn):
                held.append(conn)
            else:
                conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join()
        for conn in held:
            conn.close()
        server.close()


T = TypeVar("T")
# Short enough for tests that stop a collector for seconds; the production defaults are in Timing.
FAST = Timing(backoff_first=0.05, backoff_max=0.5, timeout=2.0, sync_interval=0.2, proven=0.3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, proc: subprocess.Popen[bytes], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{what} exited with {proc.returncode} before listening")
        try:
            socket.create_connection((HOST, port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.02)
    raise AssertionError(f"{what} is not listening on {port} after {timeout} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(5)


def need(program: str, package: str) -> str:
    path = shutil.which(program, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
    if path is None:
        pytest.skip(f"{program} is not installed (apt-get install {package})")
    return path


def make_event(n: int, *, size: int = 0, level: str = "info", sensor: str = "sensor-1") -> OutEvent:
    """An event as the broker will hand it over: its id inside its body too."""
    ident = str(uuid.uuid4())
    record = {"v": 1, "id": ident, "time": "2026-11-25T16:35:55.259Z", "level": level, "event": "session.end"}
    record.update({"sensor": sensor, "n": n, "pad": "x" * size})
    body = json.dumps(record, separators=(",", ":")).encode("ascii")
    return OutEvent(ident, "2026-11-25T16:35:55.259Z", level, "session.end", sensor, body)


@dataclass
class Reports:
    """What the sinks told the operator, as (level, line)."""

    lines: list[tuple[str, str]] = field(default_factory=list)

    def __call__(self, level: str, line: str) -> None:
        assert "\n" not in line and line.isascii(), line
        self.lines.append((level, line))

    def matching(self, text: str) -> list[str]:
        return [line for _, line in self.lines if text in line]


_OPEN: list[SinkSet] = []


def sink_set(urls: list[str], reports: Reports, **kw: object) -> SinkSet:
    options: dict[str, object] = {"spool_dir": None, "spool_max_bytes": 1 << 20, "queue_events": 1000}
    options.update(kw)
    options.setdefault("timing", FAST)
    sinks = SinkSet([parse_sink_url(u) for u in urls], report=reports, **options)  # type: ignore[arg-type]
    _OPEN.append(sinks)
    return sinks


def run(
    main: Callable[[], Awaitable[T]], loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
) -> T:
    """asyncio.run(main()), closing every SinkSet it made even when an assertion fails: a live client
    library left to asyncio.run's cancellation can swallow it and hang the test."""

    async def guarded() -> T:
        try:
            return await main()
        finally:
            while _OPEN:
                await _OPEN.pop().close(1.0)

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(guarded())


async def until(condition: Callable[[], bool], timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def all_delivered(sinks: SinkSet, count: int) -> Callable[[], bool]:
    return lambda: all(s.delivered >= count for s in sinks.stats())


def first_seen(ids: list[str]) -> list[str]:
    """The ids in order of first arrival: what a consumer de-duplicating by id keeps."""
    seen: set[str] = set()
    return [i for i in ids if not (i in seen or seen.add(i))]  # type: ignore[func-returns-value]


def rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


# --- TLS material --------------------------------------------------------------------------------


@dataclass
class Pki:
    ca: Path
    other_ca: Path  # a CA that signed nothing of ours: verification against it must fail
    cert: Path
    key: Path


def make_pki(d: Path) -> Pki:
    """A test CA, a server certificate for localhost and 127.0.0.1 signed by it, and an unrelated CA."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl is not installed (apt-get install openssl)")

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, cwd=d)

    for ca in ("ca", "other"):
        run("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout",
            f"{ca}.key", "-out", f"{ca}.pem", "-days", "2", "-subj", f"/CN=deadend test {ca}")  # fmt: skip
    run("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", "server.key",
        "-out", "server.csr", "-subj", "/CN=localhost")  # fmt: skip
    (d / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")  # fmt: skip
    return Pki(d / "ca.pem", d / "other.pem", d / "server.pem", d / "server.key")


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# --- rsyslogd ------------------------------------------------------------------------------------

# Every property rsyslog parsed out of an RFC 5424 message, one received message per line; `$!id` is
# the event's id as mmjsonparse found it in the JSON of MSG (docs/sinks.md shows the same config).
RSYSLOG_FIELDS = ("pri", "syslogfacility-text", "syslogseverity-text", "timereported:::date-rfc3339",
                  "hostname", "app-name", "procid", "msgid", "structured-data", "$!id", "msg")  # fmt: skip


class Rsyslog:
    """rsyslogd in the foreground with a plain TCP and a TLS listener, writing what it parsed to a file."""

    def __init__(self, folder: Path, pki: Pki) -> None:
        self.binary = need("rsyslogd", "rsyslog rsyslog-gnutls")
        self.folder = folder
        self.tcp_port = free_port()
        self.tls_port = free_port()
        self.out = folder / "received.log"
        self.pidfile = folder / "rsyslogd.pid"
        template = "|".join(f"%{name}%" for name in RSYSLOG_FIELDS)
        (folder / "rsyslog.conf").write_text(
            f"""
global(workDirectory="{folder}" maxMessageSize="64k"
       defaultNetstreamDriverCAFile="{pki.ca}" defaultNetstreamDriverCertFile="{pki.cert}"
       defaultNetstreamDriverKeyFile="{pki.key}")
module(load="imtcp" maxSessions="200")
module(load="mmjsonparse")
input(type="imtcp" address="{HOST}" port="{self.tcp_port}")
input(type="imtcp" address="{HOST}" port="{self.tls_port}" streamDriver.name="gtls"
      streamDriver.mode="1" streamDriver.authMode="anon")
template(name="fields" type="string" string="{template}\\n")
action(type="mmjsonparse" cookie="")
action(type="omfile" file="{self.out}" template="fields" flushOnTXEnd="on")
"""
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [self.binary, "-n", "-f", str(self.folder / "rsyslog.conf"), "-i", str(self.pidfile)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wait_listening(self.tcp_port, self.proc, "rsyslogd")
        wait_listening(self.tls_port, self.proc, "rsyslogd")

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)

    def received(self) -> list[dict[str, str]]:
        if not self.out.exists():
            return []
        rows = []
        for line in self.out.read_text().splitlines():
            values = line.split("|", len(RSYSLOG_FIELDS) - 1)
            rows.append(dict(zip(RSYSLOG_FIELDS, values, strict=True)))
        return rows

    def wait_received(self, count: int, timeout: float = 15.0) -> list[dict[str, str]]:
        deadline = time.monotonic() + timeout
        while True:
            rows = self.received()
            if len(rows) >= count or time.monotonic() > deadline:
                return rows
            time.sleep(0.05)


@pytest.fixture
def rsyslog(tmp_path: Path, pki: Pki) -> Iterator[Rsyslog]:
    server = Rsyslog(tmp_path, pki)
    try:
        yield server
    finally:
        server.stop()


# --- nats-server ---------------------------------------------------------------------------------


class NatsServer:
    def __init__(self, folder: Path, config: str = "", port: int | None = None) -> None:
        self.binary = need("nats-server", "nats-server")
        self.folder = folder
        self.port = port or free_port()
        self.conf = folder / "nats.conf"
        self.conf.write_text(config)
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        cmd = [self.binary, "-js", "-sd", str(self.folder / "js"), "-a", HOST, "-p", str(self.port)]
        self.proc = subprocess.Popen(
            [*cmd, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_listening(self.port, self.proc, "nats-server")

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)

    @property
    def url(self) -> str:
        return f"nats://{HOST}:{self.port}"


@pytest.fixture
def nats_factory(tmp_path: Path) -> Iterator[Callable[..., NatsServer]]:
    servers: list[NatsServer] = []

    def make(config: str = "", port: int | None = None) -> NatsServer:
        folder = tmp_path / f"nats{len(servers)}"
        folder.mkdir()
        servers.append(NatsServer(folder, config, port))
        return servers[-1]

    try:
        yield make
    finally:
        for server in servers:
            server.stop()


# --- hpfeeds broker ------------------------------------------------------------------------------


class HpfeedsBroker:
    IDENT = "deadend-test"
    SECRET = "s3cret-for-tests"
    CHANNEL = "deadend.events"

    def __init__(self, folder: Path) -> None:
        binary = Path(sys.executable).with_name("hpfeeds-broker")
        if not binary.exists():
            pytest.skip("the hpfeeds broker is not installed (pip install 'hpfeeds[broker]')")
        self.port = free_port()
        auth = {self.IDENT: {"owner": "test", "secret": self.SECRET, "pubchans": [self.CHANNEL],
                             "subchans": [self.CHANNEL]}}  # fmt: skip
        (folder / "auth.json").write_text(json.dumps(auth))
        self.secret_file = folder / "secret"
        self.secret_file.write_text(self.SECRET + "\n")
        self.secret_file.chmod(0o600)
        self.cmd = [str(binary), "--bind", f"{HOST}:{self.port}", "--auth", str(folder / "auth.json"),
                    "--name", "test-broker"]  # fmt: skip
        self.proc: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_listening(self.port, self.proc, "hpfeeds-broker")

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)

    def url(self, ident: str = IDENT, secret_file: Path | None = None) -> str:
        secret = secret_file or self.secret_file
        return f"hpfeeds://{ident}@{HOST}:{self.port}/{self.CHANNEL}?secret_file={secret}"


@pytest.fixture
def hpfeeds_broker(tmp_path: Path) -> Iterator[HpfeedsBroker]:
    broker = HpfeedsBroker(tmp_path)
    try:
        yield broker
    finally:
        broker.stop()
