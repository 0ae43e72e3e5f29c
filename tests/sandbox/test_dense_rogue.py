"""A compromised dense-mode child: the real Server, Doorman, Session, Monitor, DensePool, DenseChannel and
Slot in this process, with a zygote whose children are `dense_rogue_child.py` — a stand-in for a child in
which one script gained native code execution and now writes whatever it likes on the shared pipe.

Every misbehaviour must end that child (killed) and all of its sessions — the offending one with its own
reason, the others `worker-lost` — and nothing else: a session on another child goes on, the broker keeps
serving, no descriptor or process is left behind.

Layout of each case (K = 2, two children): connections 1 (good) and 2 (the rogue) share child A — forked
for the first — and connections 3 and 4 (good) go to child B. Each session sends
"hi <pid>\\n" first, so the test knows which child holds it. The rogue misbehaves when its client sends its
first line (or when the broker aborts it); the good ones echo one line and return.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from broker.sandboxes import Sandboxes
from broker.server import Server
from broker.zygote import WorkerProcess, Zygote
from deadend.config import Ceilings, Config
from deadend.logs import EventLog
from tests.conftest import FAKES, HOST, Lines, descendants, free_offset, read_all, read_until, rogue_spawner

ROGUE = FAKES / "dense_rogue_child.py"
PLAIN_ROGUE = FAKES / "rogue_child.py"
K = 2
CPU_SLICE = 0.5
CEILINGS = Ceilings(cpu_slice=CPU_SLICE, linger=0.2, linger_calls=3)
GOOD_PORT, BAD_PORT = 1001, 1002
PV, WL = "protocol-violation", "worker-lost"


# --- the harness: the real broker in this process, with a zygote that forks the attacker's program ------


@dataclass
class Broker:
    server: Server
    out: Lines
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    offset: int
    loop_errors: list[str]
    statuses: dict[int, int | None]  # how each worker exited, by pid, as the zygote reported it
    clients: list[Client] = field(default_factory=list)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run `fn` in the broker's loop (its state is not thread-safe) and return its result."""

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self.loop).result(5)

    def live_children(self) -> set[int]:
        """The dense workers alive (the start-up compiles ran in one-session workers, gone by now)."""
        return set(self.call(lambda: list(zygote_of(self.server).workers)))

    def fds_less_children(self) -> int:
        """The broker process's open descriptors, less the three each live child holds (pipes, pidfd)."""
        return len(os.listdir("/proc/self/fd")) - 3 * len(self.live_children())

    def wait_gone(self, pid: int, timeout: float = 5) -> int | None:
        deadline = time.monotonic() + timeout
        while pid in self.live_children():
            assert time.monotonic() < deadline, f"child {pid} was not ended"
            time.sleep(0.01)
        return self.statuses[pid]

    def connect(self, port: int) -> Client:
        client = Client(self, port)
        self.clients.append(client)
        return client

    def settle(self) -> None:
        """Every session has ended and every client has its one session-end line."""
        deadline = time.monotonic() + 10
        while self.call(lambda: len(self.server.sessions)):
            assert time.monotonic() < deadline, "sessions left running"
            time.sleep(0.01)
        text = self.out.text()
        for client in self.clients:
            ends = re.findall(rf"conn={client.conn} .*session end reason=", text)
            assert len(ends) == 1, f"{client.conn}: {len(ends)} session-end lines"
        assert text.count("session end reason=") == len(self.clients)


class Client:
    def __init__(self, b: Broker, port: int) -> None:
        self.b = b
        self.sock = socket.create_connection((HOST, port + b.offset), timeout=10)
        local = self.sock.getsockname()[1]
        self.conn = b.out.wait_for(rf"conn=(\S+) peer=\S+ connect from \S+ port {local} ").group(1)
        hello = read_until(self.sock, b"\n")
        found = re.fullmatch(rb"hi (\d+)\n", hello)
        assert found, hello
        self.pid = int(found.group(1))

    def end(self, timeout: float = 10) -> str:
        return self.b.out.wait_for(rf"conn={self.conn} .*session end reason=(\S+)", timeout).group(1)

    def problem(self, reason: str) -> str:
        """The explanation line of this session's end."""
        return self.b.out.wait_for(rf"conn={self.conn} .*{reason}: (.*)").group(1)

    def echo(self, line: bytes = b"ping\n") -> None:
        self.sock.sendall(line)
        assert read_all(self.sock, timeout=10) == b"echo:" + line
        assert self.end() == "done"

    def closed(self) -> bytes:
        """What the client gets until the broker closes the connection."""
        with contextlib.suppress(ConnectionResetError):
            return read_all(self.sock, timeout=10)
        return b""


def start_broker(tmp_path: Path, behaviour: str, ceilings: Ceilings = CEILINGS, workers: int = 2) -> Broker:
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / f"{GOOD_PORT}.lua").write_text("good")
    (scripts / f"{BAD_PORT}.lua").write_text(behaviour)
    offset = free_offset([GOOD_PORT, BAD_PORT])
    config = Config(
        scripts=scripts,
        host=(HOST,),
        port_offset=offset,
        workers=workers,
        sessions_per_worker=K,
        warm=0,
        ceilings=ceilings,
        allow_root=True,
        max_per_ip=1000,
        queue_size=16,
    )
    out = Lines()
    log = EventLog(out)  # type: ignore[arg-type]
    # One-session workers (the start-up compiles) are plain rogue children that compile honestly.
    server = Server(config, log, spawner=rogue_spawner(PLAIN_ROGUE, ROGUE), handle_signals=False)
    loop = asyncio.new_event_loop()
    loop_errors: list[str] = []
    loop.set_exception_handler(
        lambda _loop, ctx: loop_errors.append(f"{ctx.get('message')}: {ctx.get('exception')!r}")
    )
    thread = threading.Thread(target=loop.run_until_complete, args=(server.serve(),), daemon=True)
    thread.start()
    out.wait_for(r"ready: ")
    b = Broker(server, out, loop, thread, offset, loop_errors, {})

    def record_exits() -> None:
        zygote = zygote_of(server)
        reported = zygote.on_exit

        def on_exit(worker: WorkerProcess) -> None:
            b.statuses[worker.pid] = worker.exited.result()
            reported(worker)

        zygote.on_exit = on_exit

    b.call(record_exits)
    return b


def zygote_of(server: Server) -> Zygote:
    assert isinstance(server.sandboxes, Sandboxes) and server.sandboxes.supply.zygote is not None
    return server.sandboxes.supply.zygote


@pytest.fixture
def broker_for(tmp_path: Path) -> Iterator[Callable[..., Broker]]:
    started: list[Broker] = []

    def start(behaviour: str, ceilings: Ceilings = CEILINGS) -> Broker:
        b = start_broker(tmp_path, behaviour, ceilings)
        started.append(b)
        return b

    yield start
    for b in started:
        for client in b.clients:
            client.sock.close()
        b.loop.call_soon_threadsafe(b.server.request_stop)
        b.thread.join(15)
        assert not b.thread.is_alive(), "the broker did not stop"
        b.loop.close()
        assert isinstance(b.server.sandboxes, Sandboxes)
        assert not b.server.sandboxes.supply.alive, "workers outlived the broker"
        assert not b.loop_errors, b.loop_errors
    assert not [p for p in descendants(os.getpid()) if _alive(p)], "processes left behind"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


# --- the table of misbehaviours --------------------------------------------------------------------------

NOT_HELD = "a frame for a session the worker does not hold"
NO_SLOT = "a dense frame without its slot number"
AHEAD = "a second request before the first was answered"
KILLED = signal.SIGKILL


@dataclass(frozen=True)
class Case:
    rogue: set[str]  # the rogue session's possible reasons
    detail: str | None = None  # regex: its explanation line
    lost_by: str = "ProtocolViolation"  # what the siblings' worker-lost line says killed the child
    killed: bool = True  # False: the child is not to blame, it goes on serving
    status: int | None = KILLED  # how the child ended: a signal, or an exit status (negative)
    either: bool = False  # the broker cannot tell which of the two sessions the frame was for
    ceilings: Ceilings = CEILINGS
    marks: tuple[Any, ...] = ()


CASES: dict[str, Case] = {
    # frames for a slot the child does not hold: the session owed a frame is the one blamed
    "unknown-slot": Case({PV}, NOT_HELD),
    "slot-negative": Case({PV}, NOT_HELD),
    "slot-huge": Case({PV}, NOT_HELD),
    # not an integer where a slot number belongs
    "slot-str": Case({PV}, NO_SLOT),
    "slot-list": Case({PV}, NO_SLOT),
    "slot-bool": Case({PV}, NO_SLOT),
    "slot-float": Case({PV}, NO_SLOT),
    "slot-nil": Case({PV}, NO_SLOT),
    # frames for a slot that is not owed one
    "two-requests": Case({PV}, AHEAD),
    "ahead-of-reply": Case({PV}, AHEAD),  # the culprit sleeps in the broker
    "sibling-slot": Case({PV}, AHEAD, either=True),  # the sibling is in recv
    # unreadable msgpack, oversized frames
    "garbage": Case({PV}, "unreadable frame: "),
    "garbage-after-slot": Case({PV}, "unreadable frame: "),
    # two bins of 1 MiB: each is within the decoder's bounds (it holds at most 4 x 1 MiB of one frame),
    # the request is not
    "oversized": Case({PV}, re.escape("bad arguments to 'send'")),
    "send-huge": Case({PV}, "unreadable frame: "),
    # well-framed for its own slot, but not a request (deadend.wire.parse_request, in the Session)
    "bad-args": Case({PV}, re.escape("bad arguments to 'get_ip'"), lost_by="ProtocolViolation"),
    "unknown-op": Case({PV}, re.escape("unknown request 'exec'"), lost_by="ProtocolViolation"),
    # after the broker ended the session (ABORT): anything but the answer to ABORT
    "linger-calls-request": Case({"linger"}),
    "linger-time-request": Case({"linger"}),
    "linger-time-ignored": Case({"linger"}, lost_by="the CPU deadline"),
    # ended while the child owes a frame (it answers 0.6 s late): ABORT follows that frame
    "linger-owed-request": Case({"linger"}, ceilings=Ceilings(cpu_slice=1.5, linger=0.2, linger_calls=3)),
    "done-then-frame": Case({"done"}),
    # the child dies, closes its pipe, or stops reading
    "exit": Case({"sandbox-crash"}, "exit status 3", lost_by="WorkerGone", status=-3),
    "close-pipe": Case({"sandbox-crash"}, "SIGKILL", lost_by="WorkerGone"),
    "silent": Case(
        {"cpu-deadline"}, re.escape(f"no API call within {CPU_SLICE}s"), lost_by="the CPU deadline"
    ),
    "noread-stream": Case({PV}, "worker stopped reading its replies"),  # the write buffer limit
    # controls: nothing to blame the child for
    "good": Case({"done"}, killed=False),
    "linger-time-ok": Case({"linger"}, killed=False),
    "linger-calls-ok": Case({"linger"}, killed=False),
}


def _stream(sock: socket.socket, nbytes: int) -> threading.Thread:
    def run() -> None:
        with contextlib.suppress(OSError):  # reset once the broker closes a connection it stopped reading
            sock.sendall(b"go\n" + b"B" * nbytes)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.mark.parametrize("name", [pytest.param(n, marks=c.marks) for n, c in CASES.items()])
def test_misbehaviour_ends_its_child_only(broker_for: Callable[..., Broker], name: str) -> None:
    case = CASES[name]
    b = broker_for(name, case.ceilings)
    fds_before = b.fds_less_children()

    sibling = b.connect(GOOD_PORT)
    child_a = sibling.pid  # forked for the first session; the next one goes to it too (K = 2)
    rogue = b.connect(BAD_PORT)
    assert rogue.pid == child_a
    others = [b.connect(GOOD_PORT), b.connect(GOOD_PORT)]
    child_b = others[0].pid
    assert others[1].pid == child_b != child_a
    assert b.live_children() == {child_a, child_b}

    streamer = None
    if name == "noread-stream":
        streamer = _stream(rogue.sock, 8 << 20)
    else:
        rogue.sock.sendall(b"go\n")
    if name == "good":
        assert read_all(rogue.sock) == b"echo:go\n"
    assert rogue.closed() in (b"", b"echo:go\n")
    if streamer is not None:
        streamer.join(15)
    reason = rogue.end()

    if case.killed:
        status = b.wait_gone(child_a)
        if case.status is not None and case.status < 0:
            assert status is not None and os.WIFEXITED(status) and os.WEXITSTATUS(status) == -case.status
        else:
            assert status is not None and os.WIFSIGNALED(status) and os.WTERMSIG(status) == case.status
        sibling_reason = sibling.end()
        assert sibling.closed() == b""
        if case.either:  # one of the two is blamed, the other lost its child
            assert sorted([reason, sibling_reason]) == sorted([*case.rogue, WL]), (reason, sibling_reason)
        else:
            assert reason in case.rogue, reason
            assert sibling_reason == WL, sibling_reason
        lost = sibling if sibling_reason == WL else rogue
        assert re.fullmatch(
            rf"the sandbox it shared \(pid {child_a}\) was killed: {case.lost_by} in another session",
            lost.problem(WL),
        ), lost.problem(WL)
        if case.detail is not None and not case.either:
            assert re.match(case.detail, rogue.problem(reason)), rogue.problem(reason)
    else:
        assert reason in case.rogue, reason
        sibling.echo()  # the shared child was not to blame: its other session goes on
        assert child_a in b.live_children()

    # the other child's sessions never noticed
    for client in others:
        client.echo()
    assert child_b in b.live_children()
    # and the broker goes on serving
    b.connect(GOOD_PORT).echo()
    b.settle()
    assert not re.search(r"conn=(?!-)\S+ .*session end reason=(capacity|queue-full)", b.out.text())
    for client in b.clients:
        client.sock.close()
    assert b.fds_less_children() == fds_before, "descriptors leaked"
    assert b.thread.is_alive()
    assert not b.loop_errors, b.loop_errors


# --- a flood of frames for random slots ----------------------------------------------------------------


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        found = re.search(r"VmRSS:\s+(\d+)", f.read())
    assert found
    return int(found.group(1))


def test_flood_of_frames_for_random_slots(broker_for: Callable[..., Broker]) -> None:
    b = broker_for("flood")
    fds_before = b.fds_less_children()
    b.connect(GOOD_PORT)  # on the first child, with the first rogue
    before = _rss_kib()
    killed: list[int] = []
    for round_ in range(4):
        if round_:
            b.connect(GOOD_PORT)  # the rogue's sibling on the new child
        rogue = b.connect(BAD_PORT)
        started = time.monotonic()
        rogue.sock.sendall(b"go %d\n" % round_)  # answered by 8 MiB of frames for random slots, one write
        assert rogue.closed() == b""
        assert rogue.end() in (PV, WL)
        status = b.wait_gone(rogue.pid)
        assert status is not None and os.WIFSIGNALED(status) and os.WTERMSIG(status) == KILLED
        assert time.monotonic() - started < 3, "the child was not ended at its first bad frame"
        killed.append(rogue.pid)
    # every session of a flooding child ended, one of them for the violation, the rest worker-lost
    text = b.out.text()
    for pid in killed:
        held = [c for c in b.clients if c.pid == pid]
        assert len(held) == 2
        reasons = [c.end() for c in held]
        # the session owed a frame when the bad one came is blamed; if none was owed, none is
        assert reasons.count(WL) >= 1 and set(reasons) <= {PV, WL}, (pid, reasons)
        lost = next(c for c in held if c.end() == WL)
        assert f"(pid {pid}) was killed: ProtocolViolation in another session" in lost.problem(WL)
    assert text.count("protocol-violation: ") <= len(killed)
    grown = _rss_kib() - before
    print(f"\nflood: RSS grew by {grown} KiB over {len(killed)} floods of 8 MiB")
    assert grown < 32 * 1024, "broker memory grew with the flood"
    b.connect(GOOD_PORT).echo()  # still serving
    b.settle()
    for client in b.clients:
        client.sock.close()
    assert b.fds_less_children() == fds_before, "descriptors leaked"
    assert not b.loop_errors, b.loop_errors
