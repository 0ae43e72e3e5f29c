"""Test harness: the real broker as a subprocess, real sandbox children, loopback sockets only."""

from __future__ import annotations

import io
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from broker.zygote import DirectSpawner
from deadend.logs import SCRIPT_LINE, unquote

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "examples"
DATA = Path(__file__).resolve().parent / "data"  # scripts and vectors the tests read
# A valid recording header (docs/recording.md), for tests that write recordings by hand.
RECORDING_HEADER: dict[str, object] = {
    "format": "deadend-recording",
    "version": 1,
    "conn": "0123456789ab",
    "port": 25,
    "peer": "203.0.113.7",
    "peer_port": 42702,
    "script": "25.lua",
    "script_sha256": "ab" * 32,
    "started": "2025-11-25T14:24:49.250Z",
    "started_unix": 1764080689.25,
}
FAKES = Path(__file__).resolve().parent / "fakes"  # the attacker's programs: compromised workers, a zygote
HOST = "127.0.0.1"


def descendants(pid: int) -> list[int]:
    """Every live process below `pid` (by walking /proc parent links)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def ns_pids(pid: int) -> list[int]:
    """The process's pid in each PID namespace it is in, outermost first (NSpid in /proc/PID/status)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("NSpid:"):
                    return [int(v) for v in line.split()[1:]]
    except OSError:
        pass
    return []


def fork_server(zygote: int) -> int:
    """The process that forks the sandboxes: in a PID namespace of its own (sandbox/namespaces.py) the
    zygote's child that is that namespace's init, else the zygote itself."""
    for pid in descendants(zygote):
        found = ns_pids(pid)
        if len(found) > 1 and found[-1] == 1:
            return pid
    return zygote


def sandboxes_below(zygote: int) -> list[int]:
    """Every sandbox process of a zygote: everything below its fork server."""
    return descendants(fork_server(zygote))


def runs(pid: int | None, module: bytes) -> bool:
    """Whether `pid`'s command line names `module` (False once it has gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return module in f.read()
    except OSError:
        return False


def parent_of(pid: int) -> int | None:
    """Its parent's pid, or None if it has gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


def zygote_of(b: Broker) -> int:
    """A broker's zygote: the process running sandbox.zygote that its parent started (the broker, or with
    --user the launcher); its fork server, forked from it, runs the same program."""
    found = [
        pid
        for pid in descendants(b.proc.pid)
        if runs(pid, b"sandbox.zygote") and not runs(parent_of(pid), b"sandbox.zygote")
    ]
    assert len(found) == 1, found
    return found[0]


def free_offset(ports: list[int]) -> int:
    """An offset that puts every script port on a free loopback port."""
    for _ in range(200):
        offset = random.randint(20000, 50000) - min(ports)
        socks = []
        try:
            for p in ports:
                s = socket.socket()
                socks.append(s)
                s.bind((HOST, p + offset))
            return offset
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


# The broker refuses to run sandboxes as root without --user or --allow-root; CI runs the suite as root.
# Tests of --user itself pass it; the rest keep running as whoever runs the suite.
AS_ROOT = ["--allow-root"] if os.geteuid() == 0 else []


class Broker:
    """One running `deadend broker` process and its log lines."""

    def __init__(self, scripts: Path, args: list[str], ports: list[int], **popen: Any) -> None:
        self.scripts = scripts
        self.offset = free_offset(ports) if ports else 20000
        cmd = [sys.executable, "-m", "deadend", "broker", "--scripts", str(scripts), "--host", HOST]
        cmd += ["--port-offset", str(self.offset), *args]
        if "--user" not in args:
            cmd += AS_ROOT
        self._launch(cmd, **popen)

    def _launch(self, cmd: list[str], **popen: Any) -> None:
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            cwd=REPO,
            **popen,
        )
        self.lines: list[str] = []
        self.sockets: list[socket.socket] = []  # every client socket `connect` made, closed at the end
        self.err_lines: list[str] = []  # stderr as it comes, line by line (a check mid-run sees it)
        self.expect_exit = 0  # what the fixture's teardown expects the broker to exit with
        self._cond = threading.Condition()
        self._cursor = 0
        self._err_done = threading.Event()
        threading.Thread(target=self._pump, daemon=True).start()
        threading.Thread(target=self._pump_err, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        self.proc.stdout.close()
        with self._cond:
            self._cond.notify_all()

    def _pump_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._cond:
                self.err_lines.append(line.rstrip("\n"))
        self.proc.stderr.close()
        self._err_done.set()

    @property
    def stderr(self) -> str:
        """What the broker wrote to stderr so far (all of it once it exited and `stderr_closed()`)."""
        with self._cond:
            return "".join(f"{line}\n" for line in self.err_lines)

    def stderr_closed(self, timeout: float = 5.0) -> str:
        """All of stderr: waits for the broker's end of it (it exited)."""
        self._err_done.wait(timeout)
        return self.stderr

    def wait_for(self, pattern: str, timeout: float = 10.0, since: int | None = None) -> re.Match[str]:
        """The first log line at or after `since` (default: anywhere) matching `pattern`."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        start = 0 if since is None else since
        with self._cond:
            while True:
                for line in self.lines[start:]:
                    found = rx.search(line)
                    if found:
                        return found
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.proc.poll() is not None and not self._more_coming()):
                    tail = "\n".join(self.lines[-30:])
                    raise AssertionError(
                        f"no log line matching {pattern!r}; last lines:\n{tail}\n{self.stderr}"
                    )
                self._cond.wait(min(remaining, 0.2))

    def _more_coming(self) -> bool:
        return self.proc.stdout is not None and not self.proc.stdout.closed and self.proc.poll() is None

    def mark(self) -> int:
        with self._cond:
            return len(self.lines)

    def port(self, script_port: int) -> int:
        return script_port + self.offset

    def connect(self, script_port: int, timeout: float = 5.0, source: str | None = None) -> socket.socket:
        """A client socket; `source`: another loopback address (127.0.0.0/8) standing for another attacker.
        The fixture closes what a test leaves open."""
        address = None if source is None else (source, 0)
        s = socket.create_connection((HOST, self.port(script_port)), timeout=timeout, source_address=address)
        self.sockets.append(s)
        return s

    def session_end(self, conn: str, timeout: float = 10.0) -> re.Match[str]:
        return self.wait_for(rf"conn={conn} .*session end reason=(\S+) .*closed_by=(\S+)", timeout)

    def conn_ids(self, at_least: int = 0, timeout: float = 5.0) -> list[str]:
        """The connection ids logged so far, waiting (up to `timeout`) until there are `at_least`.

        The log is written by a thread in batches: a client can have its bytes before its connect line."""
        deadline = time.monotonic() + timeout
        while True:
            ids = re.findall(r"conn=([0-9a-f]{12}) peer=\S+ connect from", "\n".join(self.lines))
            if len(ids) >= at_least or time.monotonic() > deadline:
                return ids
            time.sleep(0.01)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise


# --- the in-process broker: the real Server in a thread of the test, its log kept ---------------------


FAKE_ZYGOTE = FAKES / "fake_zygote.py"


def rogue_spawner(program: Path, dense: Path | None = None) -> DirectSpawner:
    """Zygotes whose workers are `program` (and `dense` for dense workers): the attacker's programs."""
    return DirectSpawner(program=[sys.executable, str(FAKE_ZYGOTE), str(program), str(dense or program)])


class Lines(io.TextIOBase):
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.lock = threading.Lock()

    def write(self, s: str) -> int:
        with self.lock:
            self.lines.extend(s.splitlines())
        return len(s)

    def text(self) -> str:
        with self.lock:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 10) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = re.search(pattern, self.text())
            if found:
                return found
            time.sleep(0.02)
        raise AssertionError(f"no line matching {pattern!r} in:\n{self.text()[-3000:]}")


def script_text(line: str) -> str | None:
    """A script's own log line's text (text format: `... script: "<text>"`), unquoted; None for others."""
    found = SCRIPT_LINE.match(line)
    return None if found is None else unquote(found.group(2))


def read_until(sock: socket.socket, marker: bytes, limit: int = 1 << 20, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while marker not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
        if len(data) > limit:
            break
    return data


def read_all(sock: socket.socket, timeout: float = 5.0) -> bytes:
    sock.settimeout(timeout)
    data = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk


@pytest.fixture
def make_broker(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    """Start brokers on given scripts ({"25.lua": source} or a folder); each is stopped and checked after."""
    started: list[Broker] = []
    shared: list[Path] = []

    def start(
        scripts: dict[str, str] | Path, *args: str, ready: bool = True, expect_exit: int = 0, **popen: Any
    ) -> Broker:
        if isinstance(scripts, dict):
            if "--user" in args:
                # The broker reads its scripts as --user: pytest's tmp_path sits in a root-only folder.
                folder = Path(tempfile.mkdtemp(prefix="deadend-scripts-", dir="/tmp"))
                folder.chmod(0o755)
                shared.append(folder)
            else:
                folder = tmp_path / f"scripts{len(started)}"
                folder.mkdir()
            for name, source in scripts.items():
                (folder / name).write_text(source)
                (folder / name).chmod(0o644)
        else:
            folder = scripts
        ports = [int(p.name[:-4]) for p in folder.iterdir() if re.fullmatch(r"[1-9][0-9]{0,4}\.lua", p.name)]
        ports = [p for p in ports if p <= 65535]
        for attempt in range(3):
            broker = Broker(folder, list(args), ports, **popen)
            broker.expect_exit = expect_exit
            if not ready:
                break
            try:
                broker.wait_for(r"ready: \d+ script")
                break
            except AssertionError:
                # free_offset's ports were free when probed, but another test process may bind one before
                # this broker does (the suite runs on several): such a start is tried again, elsewhere.
                lost_race = broker.proc.wait(10) == 1 and "Address already in use" in broker.stderr_closed()
                if not lost_race or attempt == 2:
                    started.append(broker)
                    raise
        started.append(broker)
        return broker

    yield start
    try:
        finish(started)
    finally:
        for folder in shared:
            shutil.rmtree(folder, ignore_errors=True)


# A traceback's header, or frame lines alone: traceback.print_stack() and faulthandler write no header.
TRACEBACK = re.compile(r'^Traceback \(most recent call last\)|^\s*File ".*", line \d+', re.M)


def finish(brokers: Sequence[Broker]) -> None:
    """Stop each broker and check what it leaves: no process, the exit status it should have, no traceback
    on stdout or stderr. Every fixture that starts brokers ends with this."""
    problems = []
    for broker in brokers:
        for sock in broker.sockets:
            sock.close()
        alive_before = descendants(broker.proc.pid)
        code = broker.stop()
        leftover = wait_gone(alive_before)
        if leftover:
            problems.append(f"processes left behind by the broker: {leftover}")
        if code != broker.expect_exit:
            problems.append(f"the broker exited {code}, not {broker.expect_exit}")
        err = broker.stderr_closed()
        if any(TRACEBACK.search(text) for text in (err, "\n".join(broker.lines))):
            problems.append(f"the broker wrote a traceback:\n{err[-3000:]}")
    assert not problems, "\n".join(problems)


TIERS = ("unit", "sandbox", "broker", "examples", "sinks")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Each test carries its tier's marker, from its folder: `pytest -m unit` or `pytest tests/unit`."""
    root = Path(__file__).resolve().parent
    for item in items:
        tier = Path(str(item.path)).resolve().relative_to(root).parts[0]
        if tier in TIERS:
            item.add_marker(getattr(pytest.mark, tier))


# A test that needs a program this machine lacks skips, saying which package brings it ("... is not
# installed"). CI installs every one of them (.ci/run), so there such a skip would hide a failure: it fails.
NOT_INSTALLED = "is not installed"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if os.environ.get("CI") and report.skipped and NOT_INSTALLED in str(report.longrepr):
        report.outcome = "failed"


def alive(pid: int) -> bool:
    """True while `pid` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def wait_gone(pids: list[int], timeout: float = 5.0) -> list[int]:
    """Wait until none of `pids` is alive; return the ones still alive at the deadline."""
    deadline = time.monotonic() + timeout
    left = [p for p in pids if alive(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if alive(p)]
    return left
