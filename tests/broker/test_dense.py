"""Dense mode (--sessions-per-worker K): up to K sessions in one sandbox child, each in its own Lua state.

Children are counted as the zygote's children in /proc (the zygote is the broker's only python child).
Placement is made deterministic by connection order: a new child is forked only when every live one is
full, and the next session goes to the least loaded live child.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import threading
import time

import pytest

from tests.conftest import Broker, alive, descendants, fork_server, read_all, read_until, wait_gone, zygote_of

ECHO = "deadend.send('hi\\n') local line = deadend.recv(100) if line then deadend.send('echo:' .. line) end"
TARPIT = (
    'deadend.send("t\\n") while true do deadend.sleep(500) if not deadend.send("x\\n") then return end end'
)


# --- helpers ---------------------------------------------------------------------------------------

# Every session of these tests comes from one client address: lift the per-IP cap (by default a quarter of
# what the pool can hold), which is not what is tested here.
ONE_ADDRESS = ("--max-per-ip", "100000")


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, ppid) of a process, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return fields[0], int(fields[1])


def sandboxes(b: Broker) -> set[int]:
    """The live (not zombie) sandbox children: the fork server's children."""
    server = fork_server(zygote_of(b))
    return {p for p in descendants(b.proc.pid) if (_stat(p) or ("", 0))[1] == server and alive(p)}


def wait_sandboxes(b: Broker, count: int, timeout: float = 5.0) -> set[int]:
    """Wait until exactly `count` sandbox children are alive; return their pids."""
    deadline = time.monotonic() + timeout
    while True:
        found = sandboxes(b)
        if len(found) == count or time.monotonic() > deadline:
            assert len(found) == count, f"{len(found)} sandbox children, expected {count}: {found}"
            return found
        time.sleep(0.02)


def open_session(b: Broker, port: int, banner: bytes) -> tuple[socket.socket, str]:
    """Connect, wait for the script's first bytes (it has its slot) and return the socket and conn id."""
    before = len(b.conn_ids())
    s = b.connect(port)
    assert read_until(s, banner) == banner
    deadline = time.monotonic() + 5
    while len(b.conn_ids()) <= before:
        assert time.monotonic() < deadline, "no connect line"
        time.sleep(0.01)
    return s, b.conn_ids()[before]


def end_of(b: Broker, conn: str, timeout: float = 10.0) -> str:
    return b.session_end(conn, timeout).group(1)


def ended(b: Broker) -> list[str]:
    """conn ids with a session-end line so far."""
    return re.findall(r"conn=([0-9a-f]{12}) .*session end reason=", "\n".join(b.lines))


# --- 1. isolation --------------------------------------------------------------------------------


def test_sessions_in_one_child_do_not_share_globals(make_broker) -> None:
    writer = """
secret = "A"
_G.x = "A"
string.x = "A"
table.x = "A"
math.x = "A"
deadend.x = "A"
setmetatable(_G, {__index = function() return "A" end})
deadend.send("set\\n")
deadend.recv(10)
deadend.send(tostring(secret) .. tostring(string.x))
"""
    reader = """
local seen = {tostring(secret), tostring(_G.x), tostring(rawget(_G, "x")), tostring(string.x),
  tostring(table.x), tostring(math.x), tostring(deadend.x), tostring(("").x), tostring(getmetatable(_G)),
  tostring(nothing_here)}
deadend.send(table.concat(seen, ",") .. "\\n")
"""
    b = make_broker(
        {"7.lua": writer, "8.lua": reader},
        *ONE_ADDRESS,
        "--sessions-per-worker",
        "8",
        "--workers",
        "1",
        "--warm",
        "0",
    )
    a, _ = open_session(b, 7, b"set\n")
    [pid] = wait_sandboxes(b, 1)
    with b.connect(8) as r:
        assert read_all(r) == b",".join([b"nil"] * 10) + b"\n"
    assert sandboxes(b) == {pid}  # B ran in the very child that holds A's state
    a.sendall(b"go")
    assert read_all(a) == b"AA"  # A's own state kept what it set
    a.close()
    assert sandboxes(b) == {pid}


# --- 2. memory caps ------------------------------------------------------------------------------

HOLD_6MIB = """
local t = {}
for i = 1, 6 * 1024 do t[i] = string.rep("x", 1000) .. i end
deadend.send("held\\n")
deadend.recv(10)
local n = 0
for i = 1, #t do n = n + #t[i] end
deadend.send("still " .. n .. "\\n")
"""
BOMB = "deadend.send('b\\n') local t = {} for i = 1, 1e9 do t[i] = string.rep('y', 64) .. i end"


def test_memory_cap_is_per_session(make_broker) -> None:
    b = make_broker(
        {"7.lua": HOLD_6MIB, "8.lua": BOMB},
        "--memory",
        "8",
        *ONE_ADDRESS,
        "--sessions-per-worker",
        "4",
        "--workers",
        "1",
        "--warm",
        "0",
    )
    a, conn_a = open_session(b, 7, b"held\n")
    c, conn_c = open_session(b, 7, b"held\n")  # 12 MiB held in one child: the 8 MiB cap is per state
    [pid] = wait_sandboxes(b, 1)
    bomb, conn_bomb = open_session(b, 8, b"b\n")
    assert end_of(b, conn_bomb) == "memory-limit"
    assert read_all(bomb) == b""
    bomb.close()
    expected = b"still %d\n" % sum(1000 + len(str(i)) for i in range(1, 6 * 1024 + 1))
    for s in (a, c):
        s.sendall(b"go")
        assert read_all(s) == expected
        s.close()
    assert end_of(b, conn_a) == "done" and end_of(b, conn_c) == "done"
    assert sandboxes(b) == {pid}  # a session hitting its cap does not cost the child


# --- 3. instruction budget -----------------------------------------------------------------------


def test_instruction_limit_ends_only_its_session(make_broker) -> None:
    b = make_broker(
        {"7.lua": ECHO, "8.lua": "deadend.send('l\\n') while true do end"},
        "--instructions",
        "2000000",
        *ONE_ADDRESS,
        "--sessions-per-worker",
        "4",
        "--workers",
        "1",
        "--warm",
        "0",
    )
    sibling, conn_sibling = open_session(b, 7, b"hi\n")
    [pid] = wait_sandboxes(b, 1)
    loop, conn_loop = open_session(b, 8, b"l\n")
    assert end_of(b, conn_loop) == "instruction-limit"
    assert read_all(loop) == b""
    loop.close()
    sibling.sendall(b"one\n")
    assert read_all(sibling) == b"echo:one\n"
    sibling.close()
    assert end_of(b, conn_sibling) == "done"
    with b.connect(7) as s:  # the same child serves the next session
        assert read_until(s, b"hi\n") == b"hi\n"
        assert sandboxes(b) == {pid}
        s.sendall(b"two\n")
        assert read_all(s) == b"echo:two\n"


# --- 4. a child killed for one session takes exactly its own sessions ------------------------------


def test_cpu_deadline_kills_only_the_culprits_child(make_broker) -> None:
    sleeper = "deadend.send('s\\n') deadend.sleep(60000)"
    hostile = "deadend.send('h\\n') string.find(string.rep('a', 3000), '.-.-.-.-b$')"
    b = make_broker(
        {"7.lua": TARPIT, "8.lua": sleeper, "9.lua": hostile},
        *ONE_ADDRESS,
        "--sessions-per-worker",
        "4",
        "--workers",
        "2",
        "--warm",
        "0",
        "--cpu-slice",
        "1",
    )
    # Four tarpits fill the first child; the fifth connection needs the second child, and the
    # next two go to it too (the first is full): second child = tarpit, sleeper, hostile.
    first = [open_session(b, 7, b"t\n") for _ in range(4)]
    first_pids = wait_sandboxes(b, 1)
    other, conn_other = open_session(b, 7, b"t\n")
    sleeping, conn_sleeping = open_session(b, 8, b"s\n")
    both = wait_sandboxes(b, 2)
    assert len(first_pids & both) == 1
    [first_pid] = first_pids & both
    [second_pid] = both - first_pids
    mark = b.mark()
    started = time.monotonic()
    bad, conn_bad = open_session(b, 9, b"h\n")

    assert end_of(b, conn_bad) == "cpu-deadline"
    for conn in (conn_other, conn_sleeping):
        assert end_of(b, conn) == "worker-lost"
    # promptly: the sleeper had 60 s to go, the tarpit's sibling loss does not wait for its next call
    assert time.monotonic() - started < 1 + 2
    assert wait_gone([second_pid]) == []
    for conn in (conn_other, conn_sleeping):
        warn = b.wait_for(rf"WARN.*conn={conn} .*worker-lost: the sandbox it shared", since=mark)
        assert warn
        lines = [x for x in b.lines if f"conn={conn}" in x and "session end" in x]
        assert len(lines) == 1, lines
    b.wait_for(rf"WARN.*conn={conn_bad} .*cpu-deadline: no API call within 1\.0s", since=mark)
    assert not re.search(rf"conn={conn_bad} .*worker-lost", "\n".join(b.lines))
    assert read_all(bad) == b"" and read_all(sleeping) == b""
    assert re.fullmatch(rb"(x\n)*", read_all(other))  # its ticks until the kill, then the close
    for s in (bad, other, sleeping):
        s.close()

    # the first child's sessions never noticed: each gets fresh ticks after the other child died
    for s, conn in first:
        s.setblocking(False)
        try:
            while s.recv(65536):  # what was sent before the kill
                pass
        except BlockingIOError:
            pass
        s.settimeout(3)
        assert read_until(s, b"x\n").endswith(b"x\n"), conn
    assert alive(first_pid)
    assert set(ended(b)) == {conn_bad, conn_other, conn_sleeping}

    # and a new connection is served
    with b.connect(7) as s:
        assert read_until(s, b"t\n") == b"t\n"
    for s, _ in first:
        s.close()
    for _, conn in first:
        assert end_of(b, conn) == "done"


def test_worker_lost_detail_names_the_killed_child(make_broker) -> None:
    # The WARN line of a sibling that was sleeping in the broker names the killed child's pid, as the
    # one of a sibling that was waiting on the child does.
    sleeper = "deadend.send('s\\n') deadend.sleep(60000)"
    hostile = "deadend.send('h\\n') string.find(string.rep('a', 3000), '.-.-.-.-b$')"
    b = make_broker(
        {"8.lua": sleeper, "9.lua": hostile},
        *ONE_ADDRESS,
        "--sessions-per-worker",
        "2",
        "--workers",
        "1",
        "--warm",
        "0",
        "--cpu-slice",
        "0.5",
    )
    sleeping, conn_sleeping = open_session(b, 8, b"s\n")
    [pid] = wait_sandboxes(b, 1)
    bad, conn_bad = open_session(b, 9, b"h\n")
    assert end_of(b, conn_bad) == "cpu-deadline"
    assert end_of(b, conn_sleeping) == "worker-lost"
    warn = b.wait_for(rf"conn={conn_sleeping} .*worker-lost: (.*)").group(1)
    sleeping.close()
    bad.close()
    assert f"(pid {pid})" in warn, warn


# --- 5. retirement -------------------------------------------------------------------------------


def test_child_is_retired_after_four_k_sessions(make_broker) -> None:
    b = make_broker(
        {"7.lua": ECHO}, *ONE_ADDRESS, "--sessions-per-worker", "2", "--workers", "1", "--warm", "0"
    )
    pids = []
    for n in range(12):
        s, conn = open_session(b, 7, b"hi\n")
        [pid] = wait_sandboxes(b, 1)
        pids.append(pid)
        s.sendall(b"%d\n" % n)
        assert read_all(s) == b"echo:%d\n" % n
        s.close()
        assert end_of(b, conn) == "done"
    first = pids[0]
    served_by_first = pids.count(first)
    # 4 x K = 8 sessions per worker (the start-up compile ran in a one-session worker, not here)
    assert served_by_first == 8, pids
    assert pids[:served_by_first] == [first] * served_by_first
    second = pids[served_by_first]
    assert second != first
    assert pids[served_by_first:] == [second] * (12 - served_by_first)
    assert _stat(first) is None  # gone and reaped, not a zombie


def test_retired_child_finishes_its_open_sessions_first(make_broker) -> None:
    # A retired child with a session still open keeps it; it is killed once that session ends.
    b = make_broker(
        {"7.lua": ECHO}, *ONE_ADDRESS, "--sessions-per-worker", "2", "--workers", "2", "--warm", "0"
    )
    held, conn_held = open_session(b, 7, b"hi\n")
    [first] = wait_sandboxes(b, 1)
    for n in range(8):  # fills the first child's count of 8 (compile + held + 6), then a second one
        with b.connect(7) as s:
            assert read_until(s, b"hi\n") == b"hi\n"
            s.sendall(b"%d\n" % n)
            assert read_all(s) == b"echo:%d\n" % n
    both = wait_sandboxes(b, 2)
    assert first in both
    held.sendall(b"late\n")
    assert read_all(held) == b"echo:late\n"
    held.close()
    assert end_of(b, conn_held) == "done"
    assert wait_gone([first]) == []
    deadline = time.monotonic() + 5
    while _stat(first) is not None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _stat(first) is None


# --- 6. broker-side ends free the slot -----------------------------------------------------------


def test_broker_side_end_aborts_the_state_and_reuses_the_slot(make_broker) -> None:
    b = make_broker(
        {"7.lua": ECHO, "8.lua": "deadend.send('z\\n') deadend.sleep(60000)"},
        *ONE_ADDRESS,
        "--sessions-per-worker",
        "2",
        "--workers",
        "1",
        "--warm",
        "0",
        "--session-time",
        "1",
    )
    started = time.monotonic()
    sleepers = [open_session(b, 8, b"z\n") for _ in range(2)]
    [pid] = wait_sandboxes(b, 1)
    for s, conn in sleepers:
        assert end_of(b, conn) == "session-time"
        assert read_all(s) == b""
        s.close()
    assert 0.9 < time.monotonic() - started < 4
    # both slots are free again in the same child: two sessions at once, no fork, no queueing
    pair = [open_session(b, 7, b"hi\n") for _ in range(2)]
    assert sandboxes(b) == {pid}
    for n, (s, conn) in enumerate(pair):
        s.sendall(b"%d\n" % n)
        assert read_all(s) == b"echo:%d\n" % n
        s.close()
        assert end_of(b, conn) == "done"
    assert not re.search(r"sandbox-crash|protocol-violation|worker-lost|capacity", "\n".join(b.lines))


def test_session_time_while_the_child_computes(make_broker) -> None:
    # The session ends while the child owes its next frame: ABORT follows that frame, the slot is reused.
    busy = (
        "deadend.send('w\\n') while true do local s = 0 for i = 1, 1e7 do s = s + i end deadend.get_ip() end"
    )
    b = make_broker(
        {"7.lua": ECHO, "8.lua": busy},
        *ONE_ADDRESS,
        "--sessions-per-worker",
        "2",
        "--workers",
        "1",
        "--warm",
        "0",
        "--session-time",
        "1",
        "--instructions",
        "1000000000",
    )
    s, conn = open_session(b, 8, b"w\n")
    [pid] = wait_sandboxes(b, 1)
    assert end_of(b, conn) == "session-time"
    assert read_all(s) == b""
    s.close()
    pair = [open_session(b, 7, b"hi\n") for _ in range(2)]
    assert sandboxes(b) == {pid}
    for s, conn in pair:
        s.sendall(b"ok\n")
        assert read_all(s) == b"echo:ok\n"
        s.close()
        assert end_of(b, conn) == "done"
    assert not re.search(r"sandbox-crash|protocol-violation|worker-lost|cpu-deadline", "\n".join(b.lines))


def test_linger_end_reuses_the_slot(make_broker) -> None:
    closer = "deadend.send('c\\n') deadend.close() while true do deadend.sleep(50) end"
    b = make_broker(
        {"7.lua": ECHO, "8.lua": closer},
        *ONE_ADDRESS,
        "--sessions-per-worker",
        "2",
        "--workers",
        "1",
        "--warm",
        "0",
        "--linger",
        "0.3",
    )
    for _ in range(2):
        s, conn = open_session(b, 8, b"c\n")
        assert read_all(s) == b""
        s.close()
        assert end_of(b, conn) == "linger"
    [pid] = wait_sandboxes(b, 1)
    pair = [open_session(b, 7, b"hi\n") for _ in range(2)]
    assert sandboxes(b) == {pid}
    for s, conn in pair:
        s.sendall(b"ok\n")
        assert read_all(s) == b"echo:ok\n"
        s.close()
        assert end_of(b, conn) == "done"


# --- 7. many concurrent sessions over one pipe ---------------------------------------------------


def test_many_sessions_echo_without_cross_talk(make_broker) -> None:
    echo = (
        "deadend.send('ready\\n') for i = 1, 20 do local d = deadend.recv(200) "
        "if not d then return end deadend.send(d) end"
    )
    b = make_broker(
        {"7.lua": echo}, *ONE_ADDRESS, "--sessions-per-worker", "32", "--workers", "1", "--warm", "0"
    )
    count = 30
    barrier = threading.Barrier(count + 1, timeout=20)
    results: dict[int, bytes] = {}
    errors: list[BaseException] = []

    def client(k: int) -> None:
        try:
            with b.connect(7, timeout=15) as s:
                assert read_until(s, b"ready\n", timeout=15) == b"ready\n"
                barrier.wait()
                barrier.wait()
                got = b""
                for i in range(20):
                    line = b"%d:%d:%s\n" % (k, i, os.urandom(6).hex().encode())
                    s.sendall(line)
                    want = len(got) + len(line)
                    while len(got) < want:
                        chunk = s.recv(want - len(got))
                        assert chunk, "closed early"
                        got += chunk
                    assert got.endswith(line), (k, i, got[-80:])
                assert read_all(s, timeout=10) == b""
                results[k] = got
        except BaseException as e:
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=client, args=(k,)) for k in range(count)]
    for t in threads:
        t.start()
    barrier.wait()  # every session is open and has its slot
    assert len(sandboxes(b)) == 1
    barrier.wait()
    for t in threads:
        t.join(30)
    assert not errors, errors[:3]
    assert len(results) == count
    for k, got in results.items():
        assert re.fullmatch(rb"(%d:\d+:[0-9a-f]{12}\n){20}" % k, got)
    conns = b.conn_ids()
    assert len(conns) == count
    assert [end_of(b, c) for c in conns] == ["done"] * count


# --- 8. compiling at start-up --------------------------------------------------------------------


def test_compile_errors_at_start_up(make_broker) -> None:
    # Ten compiles through one child of K=2 slots: the child retires (after 8) during start-up.
    scripts = {f"{p}.lua": f"deadend.send('port {p}')" for p in range(101, 110)}
    scripts["110.lua"] = "deadend.send('broken' -- no closing parenthesis"
    b = make_broker(scripts, *ONE_ADDRESS, "--sessions-per-worker", "2", "--workers", "1", "--warm", "0")
    b.wait_for(r"compile error in 110\.lua: .*'\)' expected.*port not opened")
    b.wait_for(r"ready: 9 script")
    for p in range(101, 110):
        with b.connect(p) as s:
            assert read_all(s) == b"port %d" % p
    with pytest.raises(OSError):
        b.connect(110, timeout=1)
    assert len(sandboxes(b)) <= 1
    assert not re.search(r"sandbox-crash|protocol-violation|worker-lost", "\n".join(b.lines))


# --- 9. shutdown ---------------------------------------------------------------------------------


def test_shutdown_ends_every_dense_session(make_broker) -> None:
    b = make_broker(
        {
            "7.lua": ECHO,
            "8.lua": "deadend.send('z\\n') deadend.sleep(60000)",
            "9.lua": TARPIT,
        },
        *ONE_ADDRESS,
        "--sessions-per-worker",
        "2",
        "--workers",
        "3",
    )
    opened = [
        open_session(b, 7, b"hi\n"),
        open_session(b, 8, b"z\n"),
        open_session(b, 9, b"t\n"),
        open_session(b, 8, b"z\n"),
        open_session(b, 7, b"hi\n"),
    ]
    wait_sandboxes(b, 3)
    everything = descendants(b.proc.pid)
    started = time.monotonic()
    assert b.stop(signal.SIGTERM) == 0
    assert time.monotonic() - started < 10
    for s, conn in opened:
        assert end_of(b, conn) == "shutdown"
        s.close()
    assert wait_gone(everything) == []


# --- 10. the per-session CPU meter ---------------------------------------------------------------


def test_session_cpu_meter_ends_only_its_session(make_broker) -> None:
    burner = (
        "deadend.send('c\\n') while true do local s = 0 for i = 1, 2e6 do s = s + i end deadend.get_ip() end"
    )
    b = make_broker(
        {"7.lua": ECHO, "8.lua": burner},
        "--session-cpu",
        "1",
        "--cpu-slice",
        "5",
        *ONE_ADDRESS,
        "--sessions-per-worker",
        "2",
        "--workers",
        "1",
        "--warm",
        "0",
    )
    sibling, conn_sibling = open_session(b, 7, b"hi\n")
    [pid] = wait_sandboxes(b, 1)
    started = time.monotonic()
    burn, conn_burn = open_session(b, 8, b"c\n")
    assert end_of(b, conn_burn, timeout=15) == "cpu-limit"
    assert 0.8 < time.monotonic() - started < 6
    assert read_all(burn) == b""
    burn.close()
    sibling.sendall(b"after\n")
    assert read_all(sibling) == b"echo:after\n"
    sibling.close()
    assert end_of(b, conn_sibling) == "done"
    assert sandboxes(b) == {pid}


# --- --workers counts children -------------------------------------------------------------------


def test_workers_caps_the_children_with_a_warm_one(make_broker) -> None:
    # --workers 1, K=2: two sessions at most. The start-up compile ran past --workers (the warm child was
    # still starting); that child must not stay on as a second child next to the warm one.
    b = make_broker(
        {"7.lua": ECHO},
        *ONE_ADDRESS,
        "--sessions-per-worker",
        "2",
        "--workers",
        "1",
        "--queue-timeout",
        "0.5",
    )
    time.sleep(0.5)  # the warm child, if any, has started
    held = [open_session(b, 7, b"hi\n") for _ in range(2)]
    try:
        with b.connect(7) as third:
            third.settimeout(3)
            assert third.recv(10) == b""  # waited in the queue, then refused; not served by a third slot
        b.wait_for(r"session end reason=capacity")
        assert len(sandboxes(b)) == 1, sandboxes(b)
    finally:
        for s, _ in held:
            s.close()
