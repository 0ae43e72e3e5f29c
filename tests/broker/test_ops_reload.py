"""SIGHUP reload: new ports open, removed ones close, changed scripts serve new connections, and no session
is dropped. Only loopback; every broker comes from the `make_broker` fixture, which checks what it leaves."""

from __future__ import annotations

import os
import re
import signal
import socket
import time
import urllib.request
from pathlib import Path

import pytest

from broker.listeners import plan_reload
from deadend.scripts import Script
from tests.conftest import HOST, Broker, descendants, read_until

V1 = """deadend.send("v1\\n")
while true do
  local l = deadend.recv(1024)
  if not l then return end
  deadend.send("v1:" .. l)
end
"""
V2 = V1.replace("v1", "v2")
GREETER = 'deadend.send("hello new\\n")\n'
ECHO = """deadend.send("echo\\n")
while true do
  local l = deadend.recv(1024)
  if not l then return end
  deadend.send("e:" .. l)
end
"""
BROKEN = 'deadend.send("never\\n"\nlocal = 1\n'
NEW_PORT = 4711  # a script port present at start; see addable() for ports added later
RELOAD_LINE = r"reload(?:: | failed).*$"


def hup(b: Broker, timeout: float = 10.0) -> str:
    """Send SIGHUP and return the reload's summary line (from "reload" on)."""
    mark = b.mark()
    b.proc.send_signal(signal.SIGHUP)
    return b.wait_for(RELOAD_LINE, timeout, since=mark).group(0)


def reload_says(b: Broker, expected: str) -> None:
    """Send SIGHUP and check the reload's summary line; on a mismatch, show what the broker logged."""
    mark = b.mark()
    line = hup(b)
    assert line == expected, since(b, mark) + "\n" + b.stderr


def greet(b: Broker, port: int) -> tuple[socket.socket, bytes]:
    c = b.connect(port)
    return c, read_until(c, b"\n")


def ask(c: socket.socket, line: bytes) -> bytes:
    c.sendall(line)
    return read_until(c, b"\n")


def since(b: Broker, mark: int) -> str:
    return "\n".join(b.lines[mark:])


def conn_ids(b: Broker, n: int, timeout: float = 5.0) -> list[str]:
    """The first `n` connection ids, once their connect lines are logged (the log is written by a thread,
    so a line may arrive after the client already got its first bytes)."""
    deadline = time.monotonic() + timeout
    while len(ids := b.conn_ids()) < n and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(ids) >= n, ids
    return ids[:n]


def addable(b: Broker) -> int:
    """A script port (from 4711 on) that the broker can bind right now. The fixture checked only the ports of
    the scripts present at start; offset + port may be another socket's, for instance a client's in
    TIME_WAIT, which blocks the broker's bind even with SO_REUSEADDR."""
    for port in range(4711, 4811):
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the broker binds
            try:
                s.bind((HOST, b.port(port)))
            except OSError:
                continue
            return port
    raise AssertionError("no bindable port near offset + 4711")


def refused(b: Broker, port: int) -> None:
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((HOST, b.port(port)), timeout=2).close()


# --- the planner -----------------------------------------------------------------------------------


def script(port: int, source: bytes, folder: str = "/s") -> Script:
    return Script(port, Path(folder) / f"{port}.lua", source)


def test_plan_reload_added_changed_unchanged_removed() -> None:
    serving = {25: script(25, b"old"), 80: script(80, b"same"), 110: script(110, b"gone")}
    found = [script(25, b"new"), script(80, b"same", "/elsewhere"), script(4711, b"fresh")]
    plan = plan_reload(serving, found)
    assert [s.port for s in plan.added] == [4711]
    assert [(s.port, s.source) for s in plan.changed] == [(25, b"new")]  # the new version, not the old
    assert plan.removed == [110]  # 80: same bytes, so neither changed nor anything else
    assert plan


def test_plan_reload_no_change_and_everything_removed() -> None:
    serving = {25: script(25, b"a"), 22: script(22, b"b"), 80: script(80, b"c")}
    same = plan_reload(serving, [script(22, b"b"), script(25, b"a"), script(80, b"c")])
    assert not same
    assert (same.added, same.changed, same.removed) == ([], [], [])
    gone = plan_reload(serving, [])
    assert gone.removed == [22, 25, 80]
    assert not gone.added and not gone.changed
    assert plan_reload({}, [script(22, b"")]).added[0].port == 22


# --- the running broker ----------------------------------------------------------------------------


def test_changed_script_keeps_running_sessions_on_the_old_version(make_broker) -> None:
    b = make_broker({"25.lua": V1})
    old = []
    for _ in range(3):  # one after the other, so the log's connect lines are in this order
        c, hello = greet(b, 25)
        assert hello == b"v1\n"
        old.append(c)
    old_ids = conn_ids(b, 3)
    (b.scripts / "25.lua").write_text(V2)
    new = addable(b)
    (b.scripts / f"{new}.lua").write_text(GREETER)

    reload_says(b, f"reload: added {new}.lua, changed 25.lua")
    for i, c in enumerate(old):  # still the v1 sessions, still answering
        assert ask(c, b"ping%d\n" % i) == b"v1:ping%d\n" % i
    fresh, hello = greet(b, 25)
    assert hello == b"v2\n"
    assert ask(fresh, b"x\n") == b"v2:x\n"
    added, hello = greet(b, new)
    assert hello == b"hello new\n"
    for c in (*old, fresh, added):
        c.close()
    for conn in old_ids:
        end = b.session_end(conn)
        assert end.group(1) == "done", end.group(0)
        assert end.group(2) == "peer", end.group(0)
    text = "\n".join(b.lines)
    assert "reason=shutdown" not in text and "reason=crash" not in text


def test_removed_script_stops_listening_but_its_session_finishes(make_broker) -> None:
    b = make_broker({"25.lua": V1, f"{NEW_PORT}.lua": ECHO})
    c, hello = greet(b, NEW_PORT)
    assert hello == b"echo\n"
    (conn,) = conn_ids(b, 1)
    (b.scripts / f"{NEW_PORT}.lua").unlink()

    mark = b.mark()
    reload_says(b, f"reload: removed {NEW_PORT}.lua")
    b.wait_for(rf"stopped listening on {re.escape(HOST)}:{b.port(NEW_PORT)}: {NEW_PORT}.lua", since=mark)
    refused(b, NEW_PORT)
    assert ask(c, b"still there\n") == b"e:still there\n"  # the open session is untouched
    other, hello = greet(b, 25)  # the other port is untouched too
    assert hello == b"v1\n"
    other.close()
    assert f"conn={conn} " not in since(b, mark)  # nothing ended it
    c.close()
    end = b.session_end(conn)
    assert (end.group(1), end.group(2)) == ("done", "peer"), end.group(0)


def test_broken_change_keeps_the_previous_version(make_broker) -> None:
    b = make_broker({"25.lua": V1})
    (b.scripts / "25.lua").write_text(BROKEN)
    mark = b.mark()
    reload_says(b, "reload: failed 25.lua")
    err = b.wait_for(r"ERROR .*compile error in 25\.lua: (.*); keeping the previous version$", since=mark)
    assert "25.lua:" in err.group(1)  # the compiler's message, with the chunk name
    for _ in range(2):
        c, hello = greet(b, 25)
        assert hello == b"v1\n"
        assert ask(c, b"a\n") == b"v1:a\n"
        c.close()
    # fixed: the change goes through on the next reload
    (b.scripts / "25.lua").write_text(V2)
    reload_says(b, "reload: changed 25.lua")
    c, hello = greet(b, 25)
    assert hello == b"v2\n"
    c.close()


def test_new_broken_script_is_not_opened_and_other_files_are_ignored(make_broker) -> None:
    b = make_broker({"25.lua": V1})
    new = addable(b)
    (b.scripts / f"{new}.lua").write_text(BROKEN)
    (b.scripts / "README").write_text("not a script\n")
    mark = b.mark()
    reload_says(b, f"reload: failed {new}.lua")
    b.wait_for(rf"compile error in {new}\.lua: .*; port not opened$", since=mark)
    b.wait_for(r"ignored README: not a \.lua file", since=mark)
    assert f"listening on {HOST}:{b.port(new)}" not in since(b, mark)
    refused(b, new)
    c, hello = greet(b, 25)
    assert hello == b"v1\n"
    c.close()
    # fixed: now it is added and served
    (b.scripts / f"{new}.lua").write_text(GREETER)
    reload_says(b, f"reload: added {new}.lua")
    c, hello = greet(b, new)
    assert hello == b"hello new\n"
    c.close()


def test_two_sighups_in_quick_succession(make_broker) -> None:
    b = make_broker({"25.lua": V1})
    new = addable(b)
    (b.scripts / f"{new}.lua").write_text(GREETER)
    mark = b.mark()
    b.proc.send_signal(signal.SIGHUP)
    b.proc.send_signal(signal.SIGHUP)
    first = b.wait_for(RELOAD_LINE, since=mark).group(0)
    assert first == f"reload: added {new}.lua", first
    time.sleep(0.7)  # a second run, if the second signal was not merged into the first, is done by now
    lines = re.findall(RELOAD_LINE, since(b, mark), re.M)
    assert 1 <= len(lines) <= 2, lines
    assert lines[1:] in ([], ["reload: no change"]), lines
    assert since(b, mark).count(f"listening on {HOST}:{b.port(new)}") == 1
    # the reload loop is still alive, and the broker still serves both ports
    reload_says(b, "reload: no change")
    for port, expected in ((25, b"v1\n"), (new, b"hello new\n")):
        c, hello = greet(b, port)
        assert hello == expected
        c.close()
    assert "broker.error" not in since(b, mark) and b.stderr == "", b.stderr


def test_vanished_scripts_folder_fails_the_reload_and_keeps_serving(make_broker) -> None:
    b = make_broker({"25.lua": V1})
    c, hello = greet(b, 25)  # a session across both reloads
    assert hello == b"v1\n"
    away = b.scripts.with_name(b.scripts.name + "-away")
    b.scripts.rename(away)
    try:
        mark = b.mark()
        line = hup(b)
        assert line.startswith("reload failed"), line
        assert str(b.scripts) in line
        assert "stopped listening" not in since(b, mark)
        other, hello = greet(b, 25)
        assert hello == b"v1\n"
        other.close()
        assert ask(c, b"a\n") == b"v1:a\n"
    finally:
        away.rename(b.scripts)
    reload_says(b, "reload: no change")
    assert ask(c, b"b\n") == b"v1:b\n"
    (conn,) = conn_ids(b, 1)
    c.close()
    assert b.session_end(conn).group(1) == "done"


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def settled(read, expected: int, timeout: float = 3.0) -> int:
    """`read()` once it equals `expected`, or its last value at the deadline."""
    deadline = time.monotonic() + timeout
    value = read()
    while value != expected and time.monotonic() < deadline:
        time.sleep(0.05)
        value = read()
    return value


def test_reloads_do_not_leak_descriptors_or_processes(make_broker) -> None:
    b = make_broker({"25.lua": V1}, "--warm", "0")
    pid = b.proc.pid
    time.sleep(0.2)
    fds, procs = open_fds(pid), len(descendants(pid))
    removed = set()
    for i in range(5):
        port = addable(b)
        removed.add(port)
        new = b.scripts / f"{port}.lua"
        new.write_text(GREETER + f"-- {i}\n")
        reload_says(b, f"reload: added {port}.lua")
        if i == 0:
            c, hello = greet(b, port)  # the added listener really serves
            assert hello == b"hello new\n"
            c.close()
        new.unlink()
        reload_says(b, f"reload: removed {port}.lua")
    assert settled(lambda: len(descendants(pid)), procs) == procs  # compile children reaped
    # A removed script's socket stays bound (parked) for its return: one per port removed, no more.
    parked = fds + len(removed)
    assert settled(lambda: open_fds(pid), parked) == parked, os.listdir(f"/proc/{pid}/fd")
    c, hello = greet(b, 25)
    assert hello == b"v1\n"
    c.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def test_failed_reload_is_not_counted_as_ok(make_broker) -> None:
    metrics = free_port()
    b = make_broker({"25.lua": V1}, "--metrics", f"{HOST}:{metrics}")
    away = b.scripts.with_name(b.scripts.name + "-away")
    b.scripts.rename(away)
    try:
        assert hup(b).startswith("reload failed")
    finally:
        away.rename(b.scripts)
    with urllib.request.urlopen(f"http://{HOST}:{metrics}/metrics", timeout=5) as r:
        text = r.read().decode()
    assert 'deadend_reloads_total{result="ok"}' not in text
    assert 'deadend_reloads_total{result="error"} 1.0' in text


def test_reload_compiles_even_when_every_worker_is_busy(make_broker) -> None:
    # Attackers holding every sandbox must not block a reload: the compile gets a sandbox past --workers.
    b = make_broker({"25.lua": V1}, "--workers", "2", "--warm", "0", "--max-per-ip", "2")
    held = [greet(b, 25)[0] for _ in range(2)]
    new = addable(b)
    (b.scripts / f"{new}.lua").write_text(GREETER)
    started = time.monotonic()
    reload_says(b, f"reload: added {new}.lua")
    assert time.monotonic() - started < 5.0
    for c in held:
        c.sendall(b"still\n")
        assert read_until(c, b"\n") == b"v1:still\n"
        c.close()
