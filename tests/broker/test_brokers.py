"""--brokers 2: one supervisor, two brokers sharing the ports. Clients come from several loopback addresses
(127.0.0.2 and up), each standing for another attacker; broker/steering.py sends each to one broker."""

from __future__ import annotations

import ipaddress
import os
import re
import signal
import socket
import time
import urllib.request

from broker.steering import run_program, steering_program
from tests.conftest import Broker, read_all, read_until, sandboxes_below, wait_gone

HOLD = 'deadend.send("hi\\n") deadend.recv(10)'  # holds its session until the client sends or leaves
ECHO = 'deadend.send("hi\\n") local line = deadend.recv(100) if line then deadend.send("echo:" .. line) end'
SOURCES = [f"127.0.0.{i}" for i in range(2, 12)]
TWO = ("--brokers", "2", "--warm", "0")


def children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(entry))
            except OSError:
                continue
    return sorted(found)


def brokers_of(b: Broker) -> list[int]:
    """The supervisor's brokers, broker 0 first (they are started in order)."""
    found = children(b.proc.pid)
    assert len(found) == 2, found
    return found


def sessions_on(broker: int) -> int:
    """Sandboxes running under one broker (with --warm 0, one per session)."""
    return sum(len(sandboxes_below(zygote)) for zygote in children(broker))


def steered_to(source: str) -> int:
    header = bytes(12) + ipaddress.IPv4Address(source).packed + bytes(4)
    return run_program(steering_program(socket.AF_INET, 2), header)


def start(make_broker, scripts: dict[str, str], *args: str) -> Broker:
    b = make_broker(scripts, *TWO, *args, ready=False)
    b.wait_for(r"ready: 2 brokers", timeout=20)
    return b


def test_the_per_ip_cap_holds_across_brokers_and_each_address_stays_on_its_broker(make_broker) -> None:
    b = start(make_broker, {"7.lua": HOLD}, "--max-per-ip", "2")
    for source in SOURCES:
        for _ in range(2):
            assert read_until(b.connect(7, source=source), b"hi\n") == b"hi\n"
        assert read_all(b.connect(7, source=source)) == b""  # the third: refused at accept
    for source in SOURCES:
        b.wait_for(rf"peer={re.escape(source)} session end reason=per-ip-limit")
    for source in SOURCES:
        refused = re.findall(rf"peer={re.escape(source)} session end reason=per-ip-limit", "\n".join(b.lines))
        assert len(refused) == 1, (source, refused)
    # Each broker holds the sessions of the addresses the steering program sends it, and both hold some.
    expected = [0, 0]
    for source in SOURCES:
        expected[steered_to(source)] += 2
    assert 0 not in expected
    deadline = time.monotonic() + 10
    while [sessions_on(pid) for pid in brokers_of(b)] != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    assert [sessions_on(pid) for pid in brokers_of(b)] == expected


def test_reload_reaches_every_broker_and_opens_the_new_port_on_both(make_broker) -> None:
    b = start(make_broker, {"7.lua": ECHO})
    (b.scripts / "8.lua").write_text(ECHO)
    mark = b.mark()
    b.proc.send_signal(signal.SIGHUP)
    b.wait_for(r"reload: added 8\.lua", since=mark)
    deadline = time.monotonic() + 10
    while len(re.findall(r"reload: added 8\.lua", "\n".join(b.lines[mark:]))) < 2:
        assert time.monotonic() < deadline, "not every broker reloaded"
        time.sleep(0.05)
    for source in SOURCES:
        s = b.connect(8, source=source)
        assert read_until(s, b"hi\n") == b"hi\n"
        s.sendall(b"x\n")
        assert read_all(s) == b"echo:x\n"


def test_shutdown_ends_every_session_and_leaves_no_process(make_broker) -> None:
    b = start(make_broker, {"7.lua": HOLD})
    held = [b.connect(7, source=source) for source in SOURCES]
    for s in held:
        assert read_until(s, b"hi\n") == b"hi\n"
    everything = [b.proc.pid, *[p for p in children(b.proc.pid)]]
    everything += [p for pid in children(b.proc.pid) for p in children(pid)]
    assert b.stop() == 0
    assert not wait_gone(everything)
    assert "\n".join(b.lines).count("shutting down") == 2  # each broker ran its shutdown
    ends = re.findall(r"session end reason=(\S+)", "\n".join(b.lines))
    assert ends == ["shutdown"] * len(SOURCES)


def test_a_killed_broker_is_started_again_and_serves_its_addresses(make_broker) -> None:
    b = start(make_broker, {"7.lua": ECHO})
    victim = brokers_of(b)[1]
    below = [p for p in children(victim)]
    mark = b.mark()
    os.kill(victim, signal.SIGKILL)
    b.wait_for(r"broker 1 exited \(signal 9\); starting it again", since=mark)
    assert not wait_gone(below)  # its zygote and sandboxes went with it
    b.wait_for(r"ready: 2 brokers", since=mark, timeout=20)
    assert victim not in brokers_of(b)
    for source in SOURCES:  # addresses of both brokers are served, the new one's included
        s = b.connect(7, source=source)
        assert read_until(s, b"hi\n") == b"hi\n"
        s.sendall(b"y\n")
        assert read_all(s) == b"echo:y\n"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_metrics_are_the_sum_of_the_brokers(make_broker) -> None:
    port = free_port()
    b = start(make_broker, {"7.lua": ECHO}, "--metrics", f"127.0.0.1:{port}", "--workers", "40")
    for source in SOURCES:
        s = b.connect(7, source=source)
        read_until(s, b"hi\n")
        s.sendall(b"z\n")
        assert read_all(s) == b"echo:z\n"
    deadline = time.monotonic() + 10
    while len(re.findall(r"session end reason=done", "\n".join(b.lines))) < len(SOURCES):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    listened = b.port(7)
    assert f'deadend_connections_accepted_total{{port="{listened}"}} {float(len(SOURCES))}' in text
    assert f'deadend_sessions_ended_total{{port="{listened}",reason="done"}} {float(len(SOURCES))}' in text
    assert "deadend_sandboxes_max 40.0" in text  # 20 + 20: the shares add up to --workers
    assert text.count("deadend_build_info{") == 1


def test_brokers_that_cannot_serve_stop_the_supervisor_with_one_line(make_broker) -> None:
    b = make_broker({"7.lua": "this is not Lua"}, *TWO, ready=False, expect_exit=1)
    assert b.proc.wait(30) == 1
    b.wait_for(r"broker \d exited \(status 1\) before it served; the supervisor stops")
    assert "no servable script" in b.stderr_closed()


def test_the_caps_below_the_broker_count_are_one_line(make_broker) -> None:
    b = make_broker({"7.lua": ECHO}, "--brokers", "4", "--workers", "3", ready=False, expect_exit=1)
    assert b.proc.wait(30) == 1
    err = b.stderr_closed()
    assert err.count("\n") == 1 and "--workers and --max-connections must be at least --brokers (4)" in err
