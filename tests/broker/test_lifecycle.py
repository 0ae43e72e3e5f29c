"""Start-up and shutdown: signals end sessions with reason shutdown, and no process is ever left."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import (
    AS_ROOT,
    HOST,
    REPO,
    Broker,
    descendants,
    read_all,
    sandboxes_below,
    wait_gone,
    zygote_of,
)

WAITER = """
deadend.send("hi\\n")
local d = deadend.recv(10)
deadend.log("recv returned " .. tostring(d))
deadend.send("late")  -- must fail quietly: the connection is closed
"""


def session_workers(b: Broker, expected: int, timeout: float = 3.0) -> int:
    """How many sandboxes run below the zygote's fork server, once that is `expected` or at the deadline
    (a session's worker appears a moment after its connection)."""
    deadline = time.monotonic() + timeout
    while (n := len(sandboxes_below(zygote_of(b)))) != expected and time.monotonic() < deadline:
        time.sleep(0.05)
    return n


def test_sigterm_ends_sessions_with_reason_shutdown(make_broker) -> None:
    # No warm workers: every process below the zygote now is a session's.
    b = make_broker({"7.lua": WAITER, "8.lua": "while true do deadend.sleep(1000) end"}, "--warm", "0")
    clients = [b.connect(7) for _ in range(3)] + [b.connect(8)]
    for c in clients[:3]:
        assert c.recv(3) == b"hi\n"
    assert session_workers(b, 4) == 4  # one per session and no other (no warm ones)
    tree = descendants(b.proc.pid)
    assert b.stop(signal.SIGTERM) == 0
    # scripts blocked in recv got nil and could finish; the sleeper was ended after the grace
    text = "\n".join(b.lines)
    assert text.count('script: "recv returned nil"') == 3
    assert text.count("session end reason=shutdown") == 4
    for c in clients:
        assert read_all(c) == b""
    assert wait_gone(tree) == []


def test_sigint_exits_zero(make_broker) -> None:
    b = make_broker({"7.lua": WAITER})
    c = b.connect(7)
    assert c.recv(3) == b"hi\n"
    assert b.stop(signal.SIGINT) == 0
    assert "session end reason=shutdown" in "\n".join(b.lines)


def test_sigkilled_broker_takes_its_children(make_broker) -> None:
    b = make_broker({"7.lua": WAITER}, "--warm", "0")  # no warm workers: all below the zygote are sessions'
    clients = [b.connect(7) for _ in range(3)]
    for c in clients:
        assert c.recv(3) == b"hi\n"
    assert session_workers(b, 3) == 3  # one per session and no other (no warm ones)
    tree = descendants(b.proc.pid)
    b.expect_exit = -9
    b.proc.kill()
    b.proc.wait()
    assert wait_gone(tree) == [], "zygote or children outlived a SIGKILLed broker"


def test_port_in_use_is_one_clear_error(tmp_path) -> None:
    (tmp_path / "25.lua").write_text("deadend.send('x')")
    blocker = socket.socket()
    blocker.bind((HOST, 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    try:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "deadend",
                "broker",
                "--scripts",
                str(tmp_path),
                "--host",
                HOST,
                "--port-offset",
                str(port - 25),
                *AS_ROOT,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            cwd=REPO,
        )
    finally:
        blocker.close()
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert f"cannot listen on {HOST}:{port} for 25.lua: Address already in use" in lines[0]
    assert "Traceback" not in proc.stderr + proc.stdout


def test_child_stderr_never_reaches_the_terminal(make_broker) -> None:
    # Nothing a script does reaches the broker's stderr; stdout only carries escaped log lines.
    b = make_broker({"7.lua": 'print("\\27[2J\\27]0;pwned\\7") deadend.log("\\r\\nFAKE INFO line")'})
    with b.connect(7) as s:
        read_all(s)
    b.wait_for(r"session end")
    b.stop()
    assert b.stderr == ""
    text = "\n".join(b.lines)
    assert "\x1b" not in text and "\r" not in text
    assert 'script: "\\x1b[2J\\x1b]0;pwned\\x07"' in text
    assert 'script: "\\x0d\\x0aFAKE INFO line"' in text


def test_broker_survives_the_zygote_dying(make_broker) -> None:
    b = make_broker({"7.lua": 'deadend.send("up")'})
    with b.connect(7) as s:
        assert read_all(s) == b"up"
    os.kill(zygote_of(b), signal.SIGKILL)
    b.wait_for(r"sandbox zygote exited; restarting it")
    deadline = time.monotonic() + 10
    while True:  # the next connections are served by the new zygote's children
        try:
            with b.connect(7) as s:
                if read_all(s) == b"up":
                    break
        except OSError:
            pass
        assert time.monotonic() < deadline, "not serving after a zygote restart"
        time.sleep(0.1)
    assert b.proc.poll() is None


PIDS_CGROUP = Path("/sys/fs/cgroup/pids")


@pytest.mark.skipif(
    os.geteuid() != 0 or not (PIDS_CGROUP / "cgroup.procs").exists(),
    reason="needs root and a cgroup v1 pids hierarchy to cap the broker's process count",
)
def test_broker_survives_running_out_of_processes(make_broker) -> None:
    # Fewer processes allowed than --workers: forks fail. Connections that cannot get a sandbox are
    # refused with a reason; the zygote, the broker and the sessions it could start all carry on.
    group = PIDS_CGROUP / f"deadend-test-{os.getpid()}-{time.monotonic_ns()}"
    group.mkdir()
    try:
        (group / "pids.max").write_text("14")
        procs = str(group / "cgroup.procs")

        def join_group() -> None:
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        b = make_broker(
            {"7.lua": WAITER}, "--max-per-ip", "100", "--queue-timeout", "0.5", preexec_fn=join_group
        )
        clients = [b.connect(7) for _ in range(25)]
        greeted = 0
        for c in clients:
            c.settimeout(5)
            with contextlib.suppress(OSError):
                greeted += c.recv(3) == b"hi\n"
        assert 3 <= greeted < 25, greeted
        b.wait_for(r"refused: no sandbox could be forked|cannot pre-fork sandboxes")
        assert b.proc.poll() is None
        for c in clients:
            c.close()
        deadline = time.monotonic() + 15
        while True:  # once processes free up, connections are served again
            with b.connect(7) as s:
                s.settimeout(5)
                try:
                    if s.recv(3) == b"hi\n":
                        break
                except OSError:
                    pass
            assert time.monotonic() < deadline, "not serving after processes came free"
            time.sleep(0.2)
        assert "sandbox zygote exited" not in "\n".join(b.lines)
        b.stop()
    finally:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                group.rmdir()
                break
            except OSError:  # members still exiting
                time.sleep(0.1)


def test_blocked_stdout_does_not_stall_the_broker(tmp_path) -> None:
    # Nobody reads the broker's stdout for a while: sessions are still served and the CPU deadline still
    # fires; once the reader catches up, the lines are there (or their drop is reported).
    (tmp_path / "7.lua").write_text('deadend.log(string.rep("x", 2000)) deadend.send("ok")')
    (tmp_path / "8.lua").write_text("string.find(string.rep('a', 3000), '.-.-.-.-b$')")
    port = free_port_pair()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deadend",
            "broker",
            "--scripts",
            str(tmp_path),
            "--host",
            HOST,
            "--port-offset",
            str(port - 7),
            "--cpu-slice",
            "1",
            *AS_ROOT,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
    )
    try:
        wait_listening(port)
        victim = socket.create_connection((HOST, port + 1), timeout=5)
        start = time.monotonic()
        for _ in range(150):  # ~300 KiB of log lines: far beyond the pipe's 64 KiB
            with socket.create_connection((HOST, port), timeout=5) as s:
                assert read_all(s) == b"ok"
        assert read_all(victim, timeout=5) == b""  # killed by the deadline despite the blocked log
        assert time.monotonic() - start < 20
        victim.close()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if (
            proc.stdout is not None
        ):  # a failure above left it open: its ResourceWarning would fail a later test
            proc.stdout.close()
    text = out.decode()
    assert proc.returncode == 0
    assert "session end reason=cpu-deadline" in text
    # 150 sessions plus the one that probed for the listener
    assert text.count("session end reason=done") == 151 or "log output too slow" in text


def free_port_pair() -> int:
    for _ in range(100):
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind((HOST, 0))
                b.bind((HOST, a.getsockname()[1] + 1))
                return a.getsockname()[1]
            except OSError:
                continue
    raise RuntimeError("no free port pair")


def wait_listening(port: int, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError("broker did not start listening")
