"""The broker's events delivered by --sink to real collectors: rsyslog, nats-server (JetStream), a file.

The sinks' own tests (test_sinks_*.py) drive a SinkSet in-process; these run `deadend broker` processes,
real clients over loopback, and read what the collectors stored: every session's end arrives, with the
event's id, the sensor's name, where the client came from and what it reached, and what the script logged
as fields; through an outage of the collectors and a broker restart (the fleet test); and with a
collector gone for good, the spool stops at its cap and sessions are served as before.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats

from tests.conftest import HOST, Broker, read_all
from tests.sinks.collectors import NatsServer, Rsyslog, free_port

SUBJECT = "deadend.events"
# Banner, one line in, the line logged as a field, close: three events per session (connect, script.log,
# session.end), the third the one every collector must have.
SCRIPT = """
deadend.send("220 fleet ESMTP\\r\\n")
local line = deadend.recv(200)
deadend.log("auth", "warn", {user = "root", password = line or "", tries = 1})
deadend.close()
"""


def session(b: Broker, source: str = HOST) -> bytes:
    with b.connect(25, source=source) as s:
        banner = read_until_line(s)
        s.sendall(b"hunter2\r\n")
        return banner + read_all(s, 5.0)


def read_until_line(s: socket.socket) -> bytes:
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(100)
        if not chunk:
            break
        data += chunk
    return data


def json_events(lines: list[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in lines if line.startswith("{")]


def ends(events: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """session.end events by id."""
    return {e["id"]: e for e in events if e["event"] == "session.end"}


async def _jetstream(url: str) -> list[dict[str, Any]]:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        try:
            info = await js.stream_info("DEADEND")
        except nats.js.errors.NotFoundError:
            return []
        out: list[dict[str, Any]] = []
        # An ephemeral pull consumer from the first message: the stream read in batches, not one by one.
        reader = await js.pull_subscribe(SUBJECT, stream="DEADEND")
        try:
            while len(out) < info.state.messages:
                for msg in await reader.fetch(batch=1000, timeout=5):
                    assert msg.headers is not None
                    event = json.loads(msg.data)
                    assert msg.headers["Nats-Msg-Id"] == event["id"]
                    out.append(event)
        finally:
            await reader.unsubscribe()
        return out
    finally:
        await nc.close()


def jetstream(server: NatsServer) -> list[dict[str, Any]]:
    return asyncio.run(_jetstream(server.url))


def syslog_events(rsyslog: Rsyslog) -> list[dict[str, Any]]:
    return [json.loads(row["msg"].lstrip()) for row in rsyslog.received()]


def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1))  # type: ignore[union-attr]


def scripts_folder(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "25.lua").write_text(SCRIPT)
    return folder


def test_events_reach_every_sink_with_id_sensor_destination_and_fields(
    make_broker: Callable[..., Broker],
    rsyslog: Rsyslog,
    nats_factory: Callable[..., NatsServer],
    tmp_path: Path,
) -> None:
    nats_server = nats_factory()
    events_file = tmp_path / "events.jsonl"
    b = make_broker(
        scripts_folder(tmp_path, "scripts"),
        "--log-format", "json", "--sensor", "sensor-a",
        "--sink", f"syslog+tcp://{HOST}:{rsyslog.tcp_port}",
        "--sink", f"nats://{HOST}:{nats_server.port}/{SUBJECT}",
        "--sink", f"file://{events_file}",
        "--spool", str(tmp_path / "spool"),
    )  # fmt: skip
    sources = [f"127.0.0.{i}" for i in range(2, 12)]
    for source in sources:
        assert session(b, source).startswith(b"220 fleet ESMTP")
    b.wait_for(r'"event":"session.end"(.*"peer":"127.0.0.11")?', 10)
    until(lambda: len(ends(json_events(b.lines))) >= len(sources), 10, "the session ends on stdout")
    stdout_ends = ends(json_events(b.lines))

    def file_events() -> list[dict[str, Any]]:
        return (
            [json.loads(line) for line in events_file.read_text().splitlines()]
            if events_file.exists()
            else []
        )

    readers: list[tuple[str, Callable[[], list[dict[str, Any]]]]] = [
        ("file", file_events),
        ("rsyslog", lambda: syslog_events(rsyslog)),
        ("jetstream", lambda: jetstream(nats_server)),
    ]
    for name, read in readers:

        def arrived(read: Callable[[], list[dict[str, Any]]] = read) -> bool:
            return set(stdout_ends) <= set(ends(read()))

        until(arrived, 20, f"every session end in {name}")
        got = read()
        assert len({e["id"] for e in got}) == len(got), f"{name}: an event twice"
        for event in got:
            assert uuid.UUID(event["id"]).version == 7 and event["sensor"] == "sensor-a" and event["v"] == 3
        for ident, end in ends(got).items():
            assert end == stdout_ends[ident], f"{name} changed an event"
            assert end["dst_ip"] == HOST and end["dst_port"] == b.port(25)
        logged = [e for e in got if e["event"] == "script.log"]
        assert {e["peer"] for e in logged} == set(sources)
        assert all(
            e["fields"] == {"password": "hunter2\\x0d\\x0a", "tries": 1, "user": "root"} for e in logged
        )
    # rsyslog parsed the RFC 5424 header: the sensor is the host, the event its MSGID
    rows = rsyslog.received()
    assert {row["hostname"] for row in rows} == {"sensor-a"} and "session.end" in {
        row["msgid"] for row in rows
    }

    # logrotate: the file moves away, SIGUSR1, and the next events go to a new file
    events_file.rename(tmp_path / "events.jsonl.1")
    b.proc.send_signal(signal.SIGUSR1)
    until(events_file.exists, 5, "the file sink to reopen its file")
    session(b, "127.0.0.20")
    until(
        lambda: any(e["peer"] == "127.0.0.20" for e in ends(file_events()).values()),
        10,
        "an end after rotation",
    )


def test_a_collector_gone_for_good_fills_the_spool_to_its_cap_and_sessions_go_on(
    make_broker: Callable[..., Broker], tmp_path: Path
) -> None:
    dead = free_port()  # nothing listens here, ever
    spool = tmp_path / "spool"
    cap = 256 << 10  # the smallest spool the broker takes
    metrics_port = free_port()
    b = make_broker(
        scripts_folder(tmp_path, "scripts"),
        "--sink", f"syslog+tcp://{HOST}:{dead}", "--spool", str(spool), "--spool-max-bytes", str(cap),
        "--sink-queue", "100", "--metrics", f"{HOST}:{metrics_port}", "--max-per-ip", "100",
    )  # fmt: skip
    b.wait_for(r"sink syslog\+tcp://.* down: connection refused; spooling", 10)
    banners = []
    for i in range(400):  # ~1,200 events of ~500 bytes: twice the spool's cap
        started = time.monotonic()
        banners.append(session(b, f"127.0.{1 + i // 200}.{1 + i % 200}"))
        assert time.monotonic() - started < 2.0, "a session stalled behind the dead collector"
    assert all(banner.startswith(b"220 fleet ESMTP") for banner in banners)
    b.wait_for(r"sink syslog\+tcp://.*: spool full \([\d,]+ bytes\): oldest events dropped", 15)
    on_disk = sum(f.stat().st_size for f in spool.rglob("*") if f.is_file())
    assert on_disk <= cap + (64 << 10), on_disk  # the cap, and at most one segment being written
    with socket.create_connection((HOST, metrics_port), timeout=5) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        text = read_all(s, 5).decode()
    dropped = re.search(r'deadend_sink_dropped_total\{sink="syslog\+tcp://[^"]+"\} (\d+)', text)
    assert dropped and int(dropped.group(1)) > 0, text[-2000:]
    assert re.search(r'deadend_sink_up\{sink="syslog\+tcp://[^"]+"\} 0', text)
    # one line when it went down, and the drops reported once (a minute's worth), not per event
    assert len([line for line in b.lines if " down: " in line]) == 1
    assert len([line for line in b.lines if "spool full" in line]) == 1


def test_fleet_three_sensors_outage_and_restart_lose_no_session_end(
    make_broker: Callable[..., Broker],
    rsyslog: Rsyslog,
    nats_factory: Callable[..., NatsServer],
    tmp_path: Path,
) -> None:
    """Three brokers (three sensors) deliver to one JetStream stream and one rsyslog. 300 sessions; the
    collectors stop for 30 s in the middle and one broker is restarted once meanwhile (its spool carries
    its undelivered events over). Afterwards every session's end of every sensor is in both collectors,
    exactly once after de-duplicating by id; the brokers' memory stayed bounded."""
    nats_server = nats_factory()
    sinks = ["--sink", f"nats://{HOST}:{nats_server.port}/{SUBJECT}",
             "--sink", f"syslog+tcp://{HOST}:{rsyslog.tcp_port}"]  # fmt: skip

    def start(i: int) -> Broker:
        return make_broker(
            scripts_folder(tmp_path, f"scripts{i}-{time.monotonic_ns()}"),
            "--log-format", "json", "--sensor", f"sensor-{i}", "--spool", str(tmp_path / f"spool{i}"),
            "--max-per-ip", "100", *sinks,
        )  # fmt: skip

    brokers = [start(i) for i in range(3)]
    served: list[Broker] = list(brokers)  # every broker process that served sessions, the restarted one too
    failures: list[str] = []

    def clients(i: int) -> None:
        for n in range(100):
            source = f"127.{i + 1}.{n // 100}.{n % 100 + 1}"
            deadline = time.monotonic() + 20
            while True:
                try:
                    reply = session(brokers[i], source)
                    break
                except OSError as e:
                    # The restarted broker is away for a moment: its client tries again.
                    if time.monotonic() > deadline:
                        failures.append(f"sensor-{i} session {n}: {e}")
                        return
                    time.sleep(0.2)
            if not reply.startswith(b"220 fleet ESMTP"):
                failures.append(f"sensor-{i} session {n}: {reply[:40]!r}")
            time.sleep(0.13)  # 100 sessions over ~15 s of the 30 s outage and around it

    threads = [threading.Thread(target=clients, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    time.sleep(3)
    nats_server.stop()
    rsyslog.stop()
    outage = time.monotonic()
    rss_start = {b.proc.pid: rss_kib(b.proc.pid) for b in brokers}
    rss_peak = dict(rss_start)
    time.sleep(5)
    assert brokers[0].stop() == 0  # its undelivered events stay in its spool...
    brokers[0] = start(0)  # ...and the next run, on the same spool, delivers them
    served.append(brokers[0])
    while time.monotonic() - outage < 30:
        for b in brokers:
            if b.proc.poll() is None:
                rss_peak[b.proc.pid] = max(rss_peak.get(b.proc.pid, 0), rss_kib(b.proc.pid))
        time.sleep(0.5)
    nats_server.start()
    rsyslog.start()
    for t in threads:
        t.join(60)
    assert not failures, failures[:5]

    expected: dict[str, dict[str, Any]] = {}
    for b in served:
        expected.update(ends(json_events(b.lines)))
    assert len(expected) >= 300

    until(lambda: set(expected) <= set(ends(jetstream(nats_server))), 60, "every session end in JetStream")
    until(lambda: set(expected) <= set(ends(syslog_events(rsyslog))), 60, "every session end in rsyslog")
    for name, got in (("jetstream", jetstream(nats_server)), ("rsyslog", syslog_events(rsyslog))):
        by_id = ends(got)
        assert {e["sensor"] for e in by_id.values()} == {"sensor-0", "sensor-1", "sensor-2"}
        assert all(by_id[ident] == event for ident, event in expected.items()), name
        print(
            f"{name}: {len(got)} events, {len([e for e in got if e['event'] == 'session.end'])} session ends "
            f"({len(by_id)} distinct) for {len(expected)} sessions"
        )
    growth = {pid: (rss_peak[pid] - rss_start[pid]) // 1024 for pid in rss_start}
    print(f"broker RSS growth during the outage (MiB): {growth}")
    assert all(g < 64 for g in growth.values()), growth
    assert os.path.isdir(tmp_path / "spool0")
