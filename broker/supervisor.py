"""--brokers N: one supervisor process and N brokers, so that every core serves.

The broker is one Python process: on a host with many cores it is the ceiling long before its sandboxes
are. With --brokers N above 1, `deadend broker` becomes this supervisor. It opens every listening socket
N times, one steered reuseport group per address (broker/steering.py: a client address always reaches the
same broker), starts N brokers (`python -m deadend broker` with the same arguments; each takes its share
of the caps, Config.share, and learns its place from the environment) and hands broker i socket i of
every group, as systemd hands a broker its sockets (broker/supervised.py is the brokers' side).

- Logs. Each broker writes to a pipe; the supervisor writes what comes, whole lines at a time, with its own
  lines: the lines of two brokers never mix. One `brokers.ready` line once every broker serves.
- Signals. SIGTERM or SIGINT: every broker gets SIGTERM and runs its own shutdown; the supervisor exits 0
  once all are gone (SIGKILL for one still there after STOP_TIMEOUT). SIGHUP: the scripts folder is read
  for new ports, their sockets handed out, then every broker reloads. SIGUSR1: forwarded (file sinks).
- Failures. A broker that exits on its own is started again after a delay, doubling from RESTART_DELAY to
  RESTART_DELAY_MAX; it gets the same sockets, so its clients wait in their backlog meanwhile. One that
  exits before it ever served, or more than MAX_RESTARTS times within RESTART_WINDOW seconds, stops them
  all: one line, exit status 1.
- Metrics. --metrics is served here, with the same limits as a broker's (broker/metrics.py); each scrape
  asks every broker for its text and shows their sum. A broker started again counts from zero, as a
  restarted process does.

The supervisor never reads a client's bytes: it copies the brokers' lines as bytes, split at newlines only,
and sums their metrics. Started as root it stays root, for a broker it starts again must switch to --user
itself, as the first did.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Final

import msgpack

from broker.activation import ACTIVATION_VARIABLES
from broker.metrics import BrokerMetrics, LiveState, summed
from broker.net import BindAddress, bind_addresses, ipv6_unavailable
from broker.steering import steered_group
from deadend import wire
from deadend.config import Config
from deadend.logs import BROKER, EventLog, sanitize
from deadend.scripts import PORT_MAX, discover, open_folder

RESTART_DELAY: Final = 0.5  # seconds before a broker that exited is started again; doubles each time ...
RESTART_DELAY_MAX: Final = 10.0  # ... up to this
MAX_RESTARTS: Final = 5  # within RESTART_WINDOW seconds, else the supervisor gives up
RESTART_WINDOW: Final = 60.0
STOP_TIMEOUT: Final = 20.0  # seconds the brokers get to shut down before SIGKILL
METRICS_TIMEOUT: Final = 2.0  # seconds a broker has to answer a scrape
LINE_MAX: Final = 1 << 16  # bytes of a broker's line kept while its end has not come (a line is ~8 KiB)
RELAY_BYTES: Final = 4 << 20  # bytes waiting for a slow stdout; beyond, brokers' lines are dropped


class SupervisorError(Exception):
    """Why the supervisor cannot start, worded for one line."""


@dataclass
class Backoff:
    """When a broker that exited is started again, or that it is not (pure: the caller passes the time)."""

    delay: float = RESTART_DELAY
    exits: collections.deque[float] = field(default_factory=collections.deque)

    def exited(self, now: float) -> float | None:
        """The seconds to wait before starting it again; None past MAX_RESTARTS within RESTART_WINDOW."""
        self.exits.append(now)
        while self.exits and now - self.exits[0] > RESTART_WINDOW:
            self.exits.popleft()
        if len(self.exits) > MAX_RESTARTS:
            return None
        delay, self.delay = self.delay, min(self.delay * 2, RESTART_DELAY_MAX)
        return delay

    def served(self) -> None:
        """A broker served again: the next failure waits the shortest delay."""
        self.delay = RESTART_DELAY


class Stdout(io.TextIOBase):
    """The supervisor's stdout, shared by its event log (its thread) and the brokers' lines (a thread of
    their own, fed from the loop, so that a stopped reader of stdout never stops the loop). Every write
    is whole lines, under one lock: lines never mix."""

    def __init__(self, fd: int = 1) -> None:
        self.fd = fd
        self.lock = threading.Lock()
        self.dropped = 0  # brokers' chunks dropped while stdout was too slow
        self._pending = 0
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._drain, name="deadend-relay", daemon=True)
        self._thread.start()

    def write(self, s: str) -> int:
        self._write(s.encode("utf-8", "backslashreplace"))
        return len(s)

    def relay(self, lines: bytes) -> None:
        """Whole lines of a broker's, written off the loop; dropped (and counted) past RELAY_BYTES."""
        with self.lock:
            if self._pending + len(lines) > RELAY_BYTES:
                self.dropped += lines.count(b"\n")
                return
            self._pending += len(lines)
        self._queue.put(lines)

    def _drain(self) -> None:
        while (lines := self._queue.get()) is not None:
            self._write(lines)
            with self.lock:
                self._pending -= len(lines)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        with self.lock:
            try:
                while view:
                    view = view[os.write(self.fd, view) :]
            except OSError:
                pass  # a closed stdout must not take the supervisor down

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(5)


@dataclass(eq=False)
class Child:
    """One broker process, as the supervisor holds it."""

    index: int
    proc: subprocess.Popen[bytes] | None = None
    control: socket.socket | None = None
    out: int = -1  # the read end of its stdout
    pidfd: int = -1
    ready: bool = False
    served: bool = False  # it became ready once: an exit from now on is a failure to recover from
    partial: bytearray = field(default_factory=bytearray)  # a line read but not yet ended
    metrics: dict[int, tuple[asyncio.Future[bytes], bytearray]] = field(default_factory=dict)


class Supervisor:
    def __init__(self, config: Config, argv: Sequence[str], log: EventLog, out: Stdout) -> None:
        self.config = config
        self.argv = list(argv)
        self.log = log
        self.out = out
        self.count = config.brokers
        self.groups: dict[BindAddress, list[socket.socket]] = {}
        self.children = [Child(i) for i in range(self.count)]
        self.stopping = False
        self.fatal: str | None = None
        self._done: asyncio.Event | None = None
        self._backoff = Backoff()
        self._announced = False
        self._metrics: BrokerMetrics | None = None
        self._next_number = 0

    # --- start ---------------------------------------------------------------------------------

    def check(self) -> None:
        """What --brokers cannot do, said before anything starts."""
        c, n = self.config, self.count
        if os.environ.get("LISTEN_FDS") and os.environ.get("LISTEN_PID") == str(os.getpid()):
            raise SupervisorError(
                "--brokers opens each port once per broker; socket activation passes one socket per port"
            )
        if c.workers < n or c.max_connections < n:
            raise SupervisorError(f"--workers and --max-connections must be at least --brokers ({n})")
        for port, settings in c.ports.items():
            if int(settings.values.get("workers", n)) < n:
                raise SupervisorError(f"port.{port}.workers must be at least --brokers ({n})")

    def open_sockets(self) -> None:
        """Every port of the scripts folder, N sockets per address (still root, when started as root)."""
        for port in self._ports():
            self._open_port(port, starting=True)

    def _ports(self) -> list[int]:
        folder = self.config.scripts
        fd = open_folder(folder)
        try:
            found = discover(folder, fd)
        finally:
            os.close(fd)
        ports = []
        for script in found.scripts:
            port = script.port + self.config.port_offset
            if not 1 <= port <= PORT_MAX:
                raise SupervisorError(
                    f"port offset {self.config.port_offset} puts {script.name} outside 1..65535"
                )
            ports.append(port)
        return ports

    def _open_port(self, port: int, *, starting: bool) -> list[BindAddress]:
        opened = []
        for address in bind_addresses(self.config.host, port):
            if address in self.groups:
                continue
            try:
                self.groups[address] = steered_group(address, self.count)
            except OSError as e:
                if address.optional and ipv6_unavailable(e):
                    continue
                why = f"cannot listen on {address}: {e.strerror or e}"
                if starting:
                    raise SupervisorError(why) from e
                self.log.error(BROKER, "broker.error", sanitize(why))
                continue
            opened.append(address)
        return opened

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._done = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)
        loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(self.reload()))
        loop.add_signal_handler(signal.SIGUSR1, lambda: self._signal_all(signal.SIGUSR1))
        if self.config.metrics is not None:
            await self._serve_metrics(*self.config.metrics)
        for child in self.children:
            self._spawn(child)
        await self._done.wait()
        await self._stop_all()
        if self._metrics is not None:
            await self._metrics.stop()
        for socks in self.groups.values():
            for sock in socks:
                sock.close()
        if self.fatal is not None:
            return 1
        return 0

    # --- the brokers ---------------------------------------------------------------------------

    def _spawn(self, child: Child) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        out_r, out_w = os.pipe()
        place = wire.Supervised(child.index, self.count, theirs.fileno(), os.getpid())
        env = {k: v for k, v in os.environ.items() if k not in ACTIVATION_VARIABLES}
        env[wire.SUPERVISED_ENV] = place.encode()
        try:
            child.proc = subprocess.Popen(
                [sys.executable, "-m", "deadend", *self.argv],
                stdin=subprocess.DEVNULL,
                stdout=out_w,
                pass_fds=[theirs.fileno()],
                env=env,
            )
        except OSError as e:
            ours.close()
            os.close(out_r)
            self._give_up(f"cannot start broker {child.index}: {e.strerror or e}")
            return
        finally:
            theirs.close()
            os.close(out_w)
        child.pidfd = os.pidfd_open(child.proc.pid)
        child.control, child.out, child.ready = ours, out_r, False
        os.set_blocking(out_r, False)
        ours.setblocking(False)
        loop.add_reader(child.pidfd, self._exited, child)
        loop.add_reader(out_r, self._relay, child)
        loop.add_reader(ours.fileno(), self._on_control, child)
        self._hand_out(child, [socks[child.index] for socks in self.groups.values()])

    def _hand_out(self, child: Child, socks: list[socket.socket]) -> None:
        if child.control is None:
            return  # being started again: it gets every socket then
        fds = [sock.fileno() for sock in socks]
        step = wire.SUPERVISOR_FDS_MAX
        batches = [fds[i : i + step] for i in range(0, len(fds), step)] or [[]]
        try:
            for i, batch in enumerate(batches):
                message = wire.pack(["listeners", i + 1 < len(batches)])
                socket.send_fds(child.control, [message], batch)
        except OSError:
            pass  # it is gone: its exit is handled when its pidfd says so

    def _relay(self, child: Child) -> bool:
        """Pass on what the broker wrote, whole lines; False once nothing is left to read now."""
        try:
            data = os.read(child.out, 1 << 16)
        except BlockingIOError:
            return False
        except OSError:
            data = b""
        if not data:
            self._close_out(child)
            return False
        child.partial += data
        end = child.partial.rfind(b"\n") + 1
        if end == 0 and len(child.partial) > LINE_MAX:  # no line is that long: let it out as it is
            end = len(child.partial)
        if end:
            self.out.relay(bytes(child.partial[:end]))
            del child.partial[:end]
        return True

    def _close_out(self, child: Child) -> None:
        if child.out >= 0:
            asyncio.get_running_loop().remove_reader(child.out)
            os.close(child.out)
            child.out = -1
        if child.partial:
            self.out.relay(bytes(child.partial) + b"\n")
            child.partial.clear()

    def _on_control(self, child: Child) -> None:
        while child.control is not None:
            try:
                data = child.control.recv(wire.SUPERVISOR_CHUNK + 1024)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self._close_control(child)
                return
            try:
                msg = msgpack.unpackb(data)
                kind = msg[0]
            except Exception:
                continue  # a broker is trusted; what it cannot say is ignored
            if kind == "ready":
                child.ready = child.served = True
                self._backoff.served()
                if all(c.ready for c in self.children) and not self._announced:
                    self._announced = True
                    self.log.info(BROKER, "brokers.ready", f"ready: {self.count} brokers", brokers=self.count)
            elif kind == "metrics" and len(msg) == 4:
                number, chunk, more = msg[1:]
                waiting = child.metrics.get(number)
                if waiting is not None:
                    waiting[1].extend(chunk)
                    if not more:
                        del child.metrics[number]
                        if not waiting[0].done():
                            waiting[0].set_result(bytes(waiting[1]))

    def _close_control(self, child: Child) -> None:
        if child.control is not None:
            asyncio.get_running_loop().remove_reader(child.control.fileno())
            child.control.close()
            child.control = None
        for future, _text in child.metrics.values():
            if not future.done():
                future.set_exception(ConnectionError("the broker is gone"))
        child.metrics.clear()

    def _exited(self, child: Child) -> None:
        loop = asyncio.get_running_loop()
        assert child.proc is not None
        loop.remove_reader(child.pidfd)
        os.close(child.pidfd)
        child.pidfd = -1
        status = child.proc.wait()
        child.proc = None
        child.ready = False
        self._close_control(child)
        # Its last lines (its shutdown's) may still be in the pipe: they are passed on first. Nothing
        # else holds the pipe (its zygote and launcher write to /dev/null), so the end comes.
        while child.out >= 0 and self._relay(child):
            pass
        self._close_out(child)
        if self.stopping:
            if not any(c.proc for c in self.children) and self._done is not None:
                self._done.set()
            return
        shown = f"signal {-status}" if status < 0 else f"status {status}"
        if not child.served:
            self._give_up(f"broker {child.index} exited ({shown}) before it served")
            return
        delay = self._backoff.exited(loop.time())
        if delay is None:
            self._give_up(f"broker {child.index} keeps exiting ({shown})")
            return
        self._announced = False  # "ready" again once it serves again
        self.log.warn(
            BROKER,
            "brokers.exited",
            f"broker {child.index} exited ({shown}); starting it again in {delay:g}s",
            broker=child.index,
            status=shown,
            restart_in=delay,
        )
        loop.call_later(delay, self._respawn, child)

    def _respawn(self, child: Child) -> None:
        if not self.stopping and child.proc is None:
            self._spawn(child)

    def _give_up(self, why: str) -> None:
        if self.fatal is None:
            self.fatal = why
            self.log.error(BROKER, "broker.error", f"{sanitize(why)}; the supervisor stops")
        self.stop()

    # --- signals ---------------------------------------------------------------------------------

    def stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        self._signal_all(signal.SIGTERM)
        if not any(c.proc for c in self.children) and self._done is not None:
            self._done.set()

    def _signal_all(self, sig: int) -> None:
        for child in self.children:
            if child.pidfd >= 0:
                with contextlib.suppress(ProcessLookupError):
                    signal.pidfd_send_signal(child.pidfd, sig)

    async def _stop_all(self) -> None:
        deadline = asyncio.get_running_loop().time() + STOP_TIMEOUT
        while any(c.proc for c in self.children) and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        self._signal_all(signal.SIGKILL)
        while any(c.proc for c in self.children):
            await asyncio.sleep(0.05)

    async def reload(self) -> None:
        """SIGHUP: sockets for the new ports first, then every broker rescans (ordered on one socket)."""
        try:
            ports = await asyncio.to_thread(self._ports)
        except (OSError, SupervisorError) as e:
            self.log.error(
                BROKER, "broker.error", f"reload: cannot read the scripts folder: {sanitize(str(e))}"
            )
            ports = []
        new: list[BindAddress] = []
        for port in ports:
            new += self._open_port(port, starting=False)
        for child in self.children:
            if new:
                self._hand_out(child, [self.groups[address][child.index] for address in new])
            if child.control is not None:
                with contextlib.suppress(OSError):
                    child.control.send(wire.pack(["reload"]))

    # --- metrics ---------------------------------------------------------------------------------

    async def _serve_metrics(self, host: str, port: int) -> None:
        self._metrics = BrokerMetrics(LiveState)
        self._metrics.gather = self._gather
        try:
            await self._metrics.serve(host, port)
        except OSError as e:
            raise SupervisorError(f"cannot serve --metrics on {host}:{port}: {e.strerror or e}") from e

    async def _gather(self) -> bytes:
        asked = [self._ask(child) for child in self.children if child.ready and child.control is not None]
        async with asyncio.timeout(METRICS_TIMEOUT):
            texts = await asyncio.gather(*asked)
        return summed(list(texts))

    def _ask(self, child: Child) -> asyncio.Future[bytes]:
        future: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self._next_number += 1
        number = self._next_number
        assert child.control is not None
        try:
            child.control.send(wire.pack(["metrics", number]))
        except OSError as e:
            future.set_exception(e)
            return future
        child.metrics[number] = (future, bytearray())
        return future


def run_supervisor(config: Config, argv: Sequence[str], sensor: str) -> int:
    """`deadend broker --brokers N`: the supervisor's whole life; its exit status."""
    out = Stdout()
    log = EventLog(out, level=config.log_level, fmt=config.log_format, sensor=sensor)  # type: ignore[arg-type]
    supervisor = Supervisor(config, argv, log, out)
    try:
        supervisor.check()
        supervisor.open_sockets()
        return asyncio.run(supervisor.run())
    except (SupervisorError, OSError) as e:
        why = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        print(f"deadend: error: {why}", file=sys.stderr)
        return 1
    finally:
        for socks in supervisor.groups.values():
            for sock in socks:
                sock.close()
        log.close()
        out.close()
