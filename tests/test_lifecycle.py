"""Start-up and shutdown: signals end sessions with reason shutdown, and no process is ever left."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from conftest import HOST, REPO, descendants, read_all

WAITER = """
deadend.send("hi\\n")
local d = deadend.recv(10)
deadend.log("recv returned " .. tostring(d))
deadend.send("late")  -- must fail quietly: the connection is closed
"""


def _wait_gone(pids: list[int], timeout: float = 5.0) -> list[int]:
    deadline = time.monotonic() + timeout
    alive = pids
    while alive and time.monotonic() < deadline:
        time.sleep(0.05)
        alive = [p for p in alive if _alive(p)]
    return alive


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_sigterm_ends_sessions_with_reason_shutdown(make_broker) -> None:
    b = make_broker({"7.lua": WAITER, "8.lua": "while true do deadend.sleep(1000) end"})
    clients = [b.connect(7) for _ in range(3)] + [b.connect(8)]
    for c in clients[:3]:
        assert c.recv(3) == b"hi\n"
    time.sleep(0.2)
    tree = descendants(b.proc.pid)
    assert len(tree) >= 5  # zygote + at least 4 session children
    assert b.stop(signal.SIGTERM) == 0
    # scripts blocked in recv got nil and could finish; the sleeper was ended after the grace
    text = "\n".join(b.lines)
    assert text.count("script: recv returned nil") == 3
    assert text.count("session end reason=shutdown") == 4
    for c in clients:
        assert read_all(c) == b""
    assert _wait_gone(tree) == []


def test_sigint_exits_zero(make_broker) -> None:
    b = make_broker({"7.lua": WAITER})
    c = b.connect(7)
    assert c.recv(3) == b"hi\n"
    assert b.stop(signal.SIGINT) == 0
    assert "session end reason=shutdown" in "\n".join(b.lines)


def test_sigkilled_broker_takes_its_children(make_broker) -> None:
    b = make_broker({"7.lua": WAITER})
    clients = [b.connect(7) for _ in range(3)]
    for c in clients:
        assert c.recv(3) == b"hi\n"
    tree = descendants(b.proc.pid)
    assert len(tree) >= 4
    b.proc.kill()
    b.proc.wait()
    assert _wait_gone(tree) == [], "zygote or children outlived a SIGKILLed broker"


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
    assert "script: \\x1b[2J\\x1b]0;pwned\\x07" in text
    assert "script: \\x0d\\x0aFAKE INFO line" in text


def test_broker_survives_the_zygote_dying(make_broker) -> None:
    b = make_broker({"7.lua": 'deadend.send("up")'})
    with b.connect(7) as s:
        assert read_all(s) == b"up"
    zygote = [p for p in descendants(b.proc.pid) if _is_zygote(p, b.proc.pid)]
    assert len(zygote) == 1
    os.kill(zygote[0], signal.SIGKILL)
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


def _is_zygote(pid: int, broker_pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return ppid == broker_pid and b"sandbox.zygote" in f.read()
    except OSError:
        return False
