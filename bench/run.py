"""deadend's benchmark harness: every figure beside two floors measured in the same run.

    python bench/run.py                    # default sizes (five minutes or so)
    python bench/run.py --quick            # a much smaller version of everything (the smoke test)
    python bench/run.py --before DIR       # also the same figures of another checkout (with its .venv)
    python bench/run.py --sessions 4096    # memory at 4,096 held sessions (say --sessions 10000 to try)
    python bench/run.py --dense-sessions 2000   # figure 8 at 2,000 sessions (default 10,000)

Three servers run side by side on loopback, started by this script and stopped (SIGTERM, wait) at the end:

- deadend: `python -m deadend broker` (zygote, one sandboxed child per session, msgpack pipe);
- in-process: `python bench/inprocess.py` -- the same Server, Doorman, Session and Monitor code with the
  same bootstrap, each session's Lua state built per connection in that one process, no subprocess: the
  price of the isolation is deadend / in-process;
- lean: `python bench/lean.py` -- "Lua behind asyncio" as a newcomer writes it: a fresh LuaRuntime per
  connection, a tiny shim of coroutine yields, an asyncio stream handler, no hardening at all. The floor:
  what any design pays; deadend / lean is what ours costs, in-process / lean what the product's own code
  costs without a sandbox.

With `--before DIR`, the deadend and in-process servers of another checkout (DIR, run with DIR/.venv's
Python) are measured too, in the same rounds: a change's before and after on the same machine, same load.

All get the same scripts folder and the same flags (the lean one ignores what it has no use for), and each
figure is measured on all of them in rotating rounds, so that the noise of a shared machine hits them
alike: read the ratios.

1. Time to first byte of examples/25.lua's banner: connect() to the first byte, one client sequential;
   then 16 concurrent clients, each in a loop (connect, read the banner line, close). p50 and p99.
2. Server CPU per short SMTP session (banner, EHLO, QUIT; 16 concurrent clients in a loop), on a copy of
   25.lua with its tarpit set to 0 (else the tarpit's 100-250 ms per read sets the pace, not the server).
   deadend: utime+stime of the broker and the zygote (with its fork server, the init of the sandboxes'
   PID namespace), plus the fork server's cutime+cstime (it reaps the children). Each measured window
   ends only once the broker has logged every session end and the zygote has reaped every child but its
   warm ones, plus a short settle. The warm children alive at the end of a window were forked in it and
   are not counted; those alive at its start were forked before it and are: in steady state it evens out.
   In-process and lean: utime+stime of their one process. Divided by sessions. The same window gives the
   page faults per session: minor faults of the reaped children (the fork server's cminflt), and of the
   zygote's own processes (copy-on-write after each fork lands in the parent too).
3. Sessions per second: the same load, completed sessions over the clients' wall time.
4. Memory per held idle session: N clients connect to a script that sends "x\\n" and sleeps 10 minutes;
   once every client has its line, (PSS total with N held - PSS total idle) / N, where the PSS total is the
   sum of /proc/PID/smaps_rollup Pss over the broker, the zygote and every child (in-process, lean: the
   process), and "idle" is the same server freshly started, its warm pool full. When the machine cannot
   hold N sessions in default isolation (memory, descriptors, processes), the row says so. The held
   children's private memory (Private_Clean + Private_Dirty), median, is reported beside it.
5. One `deadend.*` round trip: connect to first byte of a script making K `deadend.get_ip()` calls and
   then sending a byte, minus the same for one that sends the byte at once, over K (medians of several).
   The servers run with `--call-rate 10000000 --call-rate-total 1e8` so that the call throttles (per
   session and all sessions together) are not what is measured.
6. Sandbox start-to-ready (bench/basics.py's figure, reused): the broker's fork request to the child's
   "ready" (zygote fork, Lua state, lockdown, seccomp), against building the same Lua state in process
   (`sandbox.worker.new_runtime()`), which the in-process server does per connection, and a bare
   `lupa.LuaRuntime()`, which the lean one does.
7. One idle warm child's PSS and USS (bench/basics.py's figure; no floor: there is no child).

Dense mode (`--sessions-per-worker K`: up to K sessions, each its own Lua state, share one child):

- figures 1 (sequential) and 2 again on a broker with K=64, rotating with the same floors. CPU is read
  over the broker, the zygote and every live child (dense children outlive their sessions), plus the
  children the zygote reaped in the window.
8. N tarpit sessions (a folder with one 22.lua-style script: a banner, then 3 bytes every 10 s) held on a
   broker with K=1000 --workers 64, and on the floors: PSS per session as in figure 4, read per process
   (broker, zygote, children), then every server's CPU in cores over one window in which all hold their
   N. The clients are held by helper processes (`--hold-clients`), each under its descriptor limit. N is
   10,000 by default (`--dense-sessions`); should the broker cap connections below N at its descriptor
   limit (broker/gate.py), the row says so and every server holds that many.
9. Every core (`--brokers N`): dense SMTP sessions per second with 2 brokers against 1 on this machine,
   each run on its own, on a load where the broker is the bottleneck (see the method's line).

The issue's targets (ratios to the lean floor, or absolute) are printed after the table, each with the
figure of this run and, with --before, of the other checkout, and whether it is met.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import dataclasses
import datetime
import json
import os
import platform
import random
import re
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import typing
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
sys.path.insert(0, str(REPO))

import lupa  # noqa: E402
import lupa.lua54  # noqa: E402

from broker.gate import FDS_PER_SESSION, FDS_PER_WARM_CHILD, FDS_RESERVED  # noqa: E402
from deadend.config import Config  # noqa: E402
from sandbox import worker as sandbox_worker  # noqa: E402

HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
SETTLE = 0.3  # seconds of quiet after the last session end before a CPU reading
DEFAULTS = {f.name: f.default for f in dataclasses.fields(Config)}
WARM, WORKERS = (
    typing.cast(int, DEFAULTS[k]) for k in ("warm", "workers")
)  # the defaults, passed explicitly

# The scripts every server serves, by port (a --port-offset puts them on free loopback ports).
SMTP_PORT, SMTP_FAST_PORT, BYTE_PORT, CALLS_PORT, IDLE_PORT = 25, 26, 1, 2, 3
IDLE_SCRIPT = 'deadend.send("x\\n")\ndeadend.sleep(600000)  -- milliseconds: 10 minutes\n'

# Dense mode (--sessions-per-worker K). Figure 8 holds N sessions of an endlessh-style tarpit (22.lua's
# manner: a banner, then a line every 10 s until a send fails) in a folder of its own.
TARPIT_PORT = 22
TARPIT_SCRIPT = (
    'deadend.send("SSH-2.0-OpenSSH_9.6\\r\\n") while true do deadend.sleep(10000)'
    ' if not deadend.send("x\\r\\n") then return end end\n'
)
DENSE_K, DENSE_WORKERS = 1000, 64  # figure 8: --sessions-per-worker, --workers
DENSE_LATENCY_K = 64  # figures 1, 2 and 9 in dense mode
DENSE_TARGET = 10_000  # sessions the targets below are set for
FD_CAP = re.compile(r"descriptor limit allows (\d+) concurrent connections")

# Figure 9: a script whose sessions cost the broker far more than the client (K round trips each), so
# that the broker, not the bench's own clients, is what limits the rate.
BUSY_PORT, BUSY_CALLS = 4, 100
BUSY_SCRIPT = f'for _ = 1, {BUSY_CALLS} do deadend.get_ip() end\ndeadend.send("x")\n'

# Server names. The columns of the table: this checkout's broker, the --before checkout's, the floors.
DEADEND, IN_PROCESS, LEAN = "deadend", "in-process", "lean"
BEFORE = "-before"  # the suffix of the --before checkout's servers
DENSE = "-dense"


@dataclass(frozen=True)
class Sizes:
    seq: int  # 1: sequential connections per server
    conc: int  # 1: connections per server, 16 clients at a time
    smtp: int  # 2, 3: sessions per server
    calls: int  # 5: K
    reps: int  # 5: connections per script and server
    starts: int  # 6: children started
    sessions: int  # 4: held sessions
    rounds: int  # rotations between the servers, per figure
    concurrency: int
    dense: int  # 8: held sessions in dense mode
    hold_seconds: float  # 8: the CPU window while they are held
    busy: int  # 9: sessions per broker count


QUICK = Sizes(
    seq=40, conc=64, smtp=64, calls=10000, reps=5, starts=10, sessions=50, rounds=2, concurrency=16,
    dense=200, hold_seconds=3, busy=100,
)  # fmt: skip
FULL = Sizes(
    seq=400, conc=800, smtp=800, calls=20000, reps=7, starts=100, sessions=1000, rounds=4, concurrency=16,
    dense=DENSE_TARGET, hold_seconds=60, busy=3000,
)  # fmt: skip


def sizes_from(args: argparse.Namespace) -> Sizes:
    given = {
        "sessions": args.sessions,
        "calls": args.calls,
        "concurrency": args.concurrency,
        "dense": args.dense_sessions,
    }
    return dataclasses.replace(QUICK if args.quick else FULL, **{k: v for k, v in given.items() if v})


@dataclass(frozen=True)
class Checkout:
    """A deadend source tree and the Python that runs it (this one, or --before's with its .venv)."""

    root: Path
    python: str
    suffix: str  # "" for this checkout, BEFORE for the other


THIS = Checkout(REPO, sys.executable, "")


def before_checkout(path: str) -> Checkout:
    root = Path(path).resolve()
    python = root / ".venv" / "bin" / "python"
    if not (root / "deadend").is_dir() or not python.exists():
        raise SystemExit(f"bench: --before {path}: not a deadend checkout with its own .venv")
    return Checkout(root, str(python), BEFORE)


# --- /proc ------------------------------------------------------------------------------------------


def stat_fields(pid: int) -> list[str]:
    """/proc/PID/stat's fields after the command name (state is [0])."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def cpu_times(pid: int) -> tuple[float, float]:
    """(utime + stime, cutime + cstime) of `pid`, in seconds."""
    utime, stime, cutime, cstime = (int(v) / CLK_TCK for v in stat_fields(pid)[11:15])
    return utime + stime, cutime + cstime


def minor_faults(pid: int) -> tuple[int, int]:
    """(minflt, cminflt) of `pid`: its own minor page faults, and its reaped children's."""
    fields = stat_fields(pid)
    return int(fields[7]), int(fields[8])


@dataclass(frozen=True)
class CpuSnapshot:
    own: dict[int, float]  # pid -> utime + stime, seconds
    reaped: float  # the zygote's cutime + cstime: children it reaped


def cpu_between(a: CpuSnapshot, b: CpuSnapshot) -> float:
    """CPU seconds spent between two snapshots of one server, children that came and went included."""
    spent = b.reaped - a.reaped  # a child reaped in between: its whole life is in the zygote's cutime ...
    spent -= sum(t for pid, t in a.own.items() if pid not in b.own)  # ... less what it had spent before a
    return spent + sum(t - a.own.get(pid, 0.0) for pid, t in b.own.items())


def children_of(pid: int) -> list[int]:
    found: list[int] = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
                found += [int(c) for c in f.read().split()]
    return found


def fork_server_of(zygote: int) -> int:
    """The process that forks and reaps the children: in a PID namespace of its own (sandbox/namespaces.py)
    the zygote's only child, that namespace's init, else the zygote itself."""
    for _ in range(100):
        kids = children_of(zygote)
        if len(kids) == 1 and ns_pid(kids[0]) == 1:
            return kids[0]
        if kids:
            return zygote
        time.sleep(0.05)
    return zygote


def ns_pid(pid: int) -> int:
    """The process's pid in its innermost PID namespace (NSpid's last number)."""
    with contextlib.suppress(OSError), open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("NSpid:"):
                return int(line.split()[-1])
    return 0


def rollup_kib(pid: int) -> dict[str, int]:
    """Rss, Pss and USS (private clean + dirty) of `pid` in KiB; {} if it is gone."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            text = f.read()
    except (FileNotFoundError, ProcessLookupError):
        return {}
    values = {k: int(v) for k, v in re.findall(r"^(\w+):\s+(\d+) kB", text, re.M)}
    return {
        "rss": values.get("Rss", 0),
        "pss": values.get("Pss", 0),
        "uss": values.get("Private_Clean", 0) + values.get("Private_Dirty", 0),
    }


def meminfo_kib(field: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


# --- statistics and formatting ----------------------------------------------------------------------


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


def num(value: float) -> str:
    """Three significant digits, never scientific notation."""
    if value == 0:
        return "0"
    digits = max(0, 2 - int(f"{abs(value):e}".split("e")[1]))
    return f"{value:,.{digits}f}"


Value = float | str  # a figure, or why there is none


def ratio(a: Value | None, b: Value | None) -> str:
    if not isinstance(a, float | int) or not isinstance(b, float | int) or not b:
        return "—"
    return f"{a / b:.2f}x"


@dataclass
class Row:
    key: str
    figure: str
    unit: str
    values: dict[str, Value]  # by column: DEADEND, DEADEND + BEFORE, IN_PROCESS, IN_PROCESS + BEFORE, LEAN

    def shown(self, column: str) -> str:
        v = self.values.get(column, "—")
        return v if isinstance(v, str) else f"{num(v)} {self.unit}".rstrip()

    def cells(self, before: bool) -> list[str]:
        d, b, ip, lean = (self.values.get(c) for c in (DEADEND, DEADEND + BEFORE, IN_PROCESS, LEAN))
        cells = [self.key, self.figure, self.shown(DEADEND)]
        if before:
            cells.append(self.shown(DEADEND + BEFORE))
        cells += [self.shown(IN_PROCESS), self.shown(LEAN), ratio(d, ip), ratio(d, lean)]
        if before:
            cells.append(ratio(b, lean))
        return cells


# --- the servers ------------------------------------------------------------------------------------


class ServerFailed(Exception):
    pass


class Served:
    """One server process (a broker, or a floor) and a thread that reads its JSON log."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        warm: int,
        *,
        isolated: bool,
        dense: bool = False,
        cwd: Path = REPO,
    ) -> None:
        self.name = name
        self.argv = argv
        self.warm = warm  # the broker's --warm: children alive when it is idle
        self.isolated = isolated  # a broker: a zygote and its children; else one process (a floor)
        self.dense = dense  # --sessions-per-worker above 1: children outlive their sessions
        self.cwd = cwd
        self.fd_cap: int | None = None  # the broker capped connections there (its descriptor limit)
        self.ready_event = "broker.ready"  # with --brokers N: "brokers.ready", once all N serve
        self.proc: subprocess.Popen[str] | None = None
        self.offset = 0
        self.zygote = 0  # the process the broker started
        self.server = 0  # the one that forks and reaps the children: the zygote, or its PID namespace's init
        self.ends = 0  # session-end events seen
        self.reasons: collections.Counter[str] = collections.Counter()
        self.tail: collections.deque[str] = collections.deque(maxlen=30)
        self.expected = 0  # connections this bench made that the server accepted
        self._ready = threading.Event()
        self._cond = threading.Condition()
        self._reader: threading.Thread | None = None

    def port(self, script_port: int) -> int:
        return script_port + self.offset

    def start(self, script_ports: list[int]) -> None:
        for _attempt in range(5):
            self.offset = free_offset(script_ports)
            self.proc = subprocess.Popen(
                [*self.argv, "--port-offset", str(self.offset)],
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                errors="replace",
                cwd=self.cwd,
            )
            self._ready.clear()
            self._reader = threading.Thread(target=self._read_log, args=(self.proc,), daemon=True)
            self._reader.start()
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not self._ready.wait(0.05):
                if self.proc.poll() is not None:
                    break
            if self._ready.is_set():
                break
            self.stop()
            if not any("cannot listen" in line for line in self.tail):
                raise ServerFailed(f"{self.name} did not start:\n" + "\n".join(self.tail))
        else:
            raise ServerFailed(f"{self.name}: no free ports after 5 tries")
        if self.isolated:
            self.zygote = self._find_zygote()
            self.server = fork_server_of(self.zygote)
            if not self.dense:
                self.wait_warm()

    def _find_zygote(self) -> int:
        assert self.proc is not None
        for _ in range(100):
            kids = children_of(self.proc.pid)
            if len(kids) == 1:
                return kids[0]
            time.sleep(0.05)
        raise ServerFailed(f"cannot tell the zygote among the broker's children {kids}")

    def _read_log(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.tail.append(line.rstrip()[:300])
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if event.get("event") == self.ready_event:
                self._ready.set()
            elif event.get("event") == "broker.warning" and (cap := FD_CAP.search(event.get("msg", ""))):
                self.fd_cap = int(cap.group(1))
            elif event.get("event") == "session.end":
                with self._cond:
                    self.ends += 1
                    self.reasons[event.get("reason", "?")] += 1
                    self._cond.notify_all()

    def check_alive(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            raise ServerFailed(f"{self.name} exited:\n" + "\n".join(self.tail))

    # --- what a figure reads ---------------------------------------------------------------------

    def processes(self) -> list[int]:
        assert self.proc is not None
        if not self.isolated:
            return [self.proc.pid]
        helpers = [self.zygote] if self.server == self.zygote else [self.zygote, self.server]
        return [self.proc.pid, *helpers, *children_of(self.server)]

    def _check_zygote(self) -> None:
        assert self.proc is not None
        if self.isolated and children_of(self.proc.pid) != [self.zygote]:
            raise ServerFailed("the zygote was restarted: CPU readings would not add up")

    def cpu_seconds(self) -> float:
        """What this server has spent so far: see the module docstring, figure 2."""
        assert self.proc is not None
        own, _ = cpu_times(self.proc.pid)
        if not self.isolated:
            return own
        self._check_zygote()
        zygote = cpu_times(self.zygote)[0] if self.server != self.zygote else 0.0
        server, reaped = cpu_times(self.server)
        return own + zygote + server + reaped

    def faults(self) -> tuple[int, int]:
        """(minor faults of the reaped children, of the zygote's own processes) so far; (0, 0) for a floor."""
        if not self.isolated:
            return 0, 0
        own, reaped = minor_faults(self.server)
        if self.server != self.zygote:
            own += minor_faults(self.zygote)[0]
        return reaped, own

    def cpu_snapshot(self) -> CpuSnapshot:
        """utime+stime of each process of this server now, and what the zygote has reaped (dense rows)."""
        self._check_zygote()
        own: dict[int, float] = {}
        for pid in self.processes():
            with contextlib.suppress(OSError):  # a child that was just reaped
                own[pid] = cpu_times(pid)[0]
        return CpuSnapshot(own, cpu_times(self.server)[1] if self.isolated else 0.0)

    def pss_by_role(self) -> dict[str, tuple[int, int]]:
        """{role: (Pss KiB, processes)}: broker, zygote, children; a floor's one process. Needs root
        for the broker's non-dumpable processes (PermissionError)."""
        assert self.proc is not None
        if not self.isolated:
            return {"process": (rollup_kib(self.proc.pid).get("pss", 0), 1)}
        kids = children_of(self.server)
        helpers = {self.zygote, self.server}
        return {
            "broker": (rollup_kib(self.proc.pid).get("pss", 0), 1),
            "zygote": (sum(rollup_kib(pid).get("pss", 0) for pid in helpers), len(helpers)),
            "children": (sum(rollup_kib(pid).get("pss", 0) for pid in kids), len(kids)),
        }

    def pss_total_kib(self) -> tuple[int, int]:
        """(sum of Pss over every process of this server, number of processes)."""
        pids = self.processes()
        return sum(rollup_kib(pid).get("pss", 0) for pid in pids), len(pids)

    def quiesce(self, timeout: float = 60.0) -> None:
        """Wait until every session the bench started has ended and (deadend) every child is reaped."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.ends < self.expected:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ServerFailed(f"{self.name}: {self.ends} session ends of {self.expected} expected")
                self._cond.wait(min(left, 0.5))
                self.check_alive()
        if self.isolated and not self.dense:
            self.wait_warm(deadline)
        time.sleep(SETTLE)

    def wait_warm(self, deadline: float | None = None) -> None:
        """Until the zygote's children are exactly the warm ones (every used child reaped)."""
        deadline = deadline or time.monotonic() + 30
        while len(children_of(self.server)) != self.warm:
            if time.monotonic() > deadline:
                raise ServerFailed(f"{self.name}: the zygote still has {children_of(self.server)}")
            self.check_alive()
            time.sleep(0.02)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._reader is not None:
            self._reader.join(5)


def free_offset(ports: list[int]) -> int:
    for _ in range(200):
        offset = random.randint(20000, 50000)
        socks = []
        try:
            for p in ports:
                s = socket.socket()
                socks.append(s)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((HOST, p + offset))
            return offset
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise ServerFailed("no free loopback ports")


def server_flags(extra: list[str]) -> list[str]:
    # The API call throttles (per session, and all sessions together) are lifted: they would set the pace.
    # One zygote for a server's whole life: a fresh one after 1,000 forks would be another process, and
    # the CPU readings of figure 2 follow the one the broker started.
    flags = [
        "--host",
        HOST,
        "--log-format",
        "json",
        "--call-rate",
        "10000000",
        "--call-rate-total",
        "1e8",
        "--zygote-forks",
        "1000000000",
        *extra,
    ]
    if os.geteuid() == 0:
        flags.append("--allow-root")  # the broker refuses to run Lua as root without it
    return flags


def broker(
    checkout: Checkout, scripts: Path, extra: list[str], warm: int, k: int = 1, brokers: int = 0
) -> Served:
    """A broker of `checkout`; dense with k above 1; `brokers` N: with --brokers N."""
    dense = [] if k == 1 else ["--sessions-per-worker", str(k)]
    many = [] if not brokers else ["--brokers", str(brokers)]
    flags = ["--scripts", str(scripts), "--warm", str(warm), *server_flags([*extra, *dense, *many])]
    name = DEADEND + (DENSE if k > 1 else "") + checkout.suffix
    argv = [checkout.python, "-m", "deadend", "broker", *flags]
    served = Served(name, argv, warm, isolated=True, dense=k > 1, cwd=checkout.root)
    if brokers > 1:
        served.ready_event = "brokers.ready"
    return served


def in_process(checkout: Checkout, scripts: Path, extra: list[str], warm: int) -> Served:
    flags = ["--scripts", str(scripts), "--warm", str(warm), *server_flags(extra)]
    argv = [checkout.python, str(checkout.root / "bench" / "inprocess.py"), *flags]
    return Served(IN_PROCESS + checkout.suffix, argv, warm=0, isolated=False, cwd=checkout.root)


def lean(scripts: Path, extra: list[str]) -> Served:
    argv = [sys.executable, str(BENCH / "lean.py"), "--scripts", str(scripts), *server_flags(extra)]
    return Served(LEAN, argv, warm=0, isolated=False)


def trio(checkouts: list[Checkout], scripts: Path, extra: list[str], warm: int, k: int = 1) -> list[Served]:
    """The brokers of every checkout, then each checkout's in-process server, then the lean floor."""
    brokers = [broker(c, scripts, extra, warm, k) for c in checkouts]
    return [*brokers, *(in_process(c, scripts, extra, warm) for c in checkouts), lean(scripts, extra)]


def scripts_folder(calls: int, smtp_from: Checkout) -> Path:
    """The scripts of figures 1, 2, 3 and 5, the same for every server: the SMTP script is `smtp_from`'s
    examples/25.lua (with --before, the other checkout's: an older broker may lack what today's uses)."""
    folder = Path(tempfile.mkdtemp(prefix="deadend-bench-"))
    smtp = (smtp_from.root / "examples" / "25.lua").read_text()
    tarpit = "local TARPIT_BASE, TARPIT_JITTER = "
    fast = smtp.replace(tarpit + "100, 150", tarpit + "0, 0")
    if fast == smtp:
        raise SystemExit("bench: examples/25.lua no longer sets its tarpit the way run.py expects")
    (folder / f"{SMTP_PORT}.lua").write_text(smtp)
    (folder / f"{SMTP_FAST_PORT}.lua").write_text(fast)
    (folder / f"{BYTE_PORT}.lua").write_text('deadend.send("x")\n')
    calls_script = f'for _ = 1, {calls} do deadend.get_ip() end\ndeadend.send("x")\n'
    (folder / f"{CALLS_PORT}.lua").write_text(calls_script)
    (folder / f"{IDLE_PORT}.lua").write_text(IDLE_SCRIPT)
    return folder


SCRIPT_PORTS = [SMTP_PORT, SMTP_FAST_PORT, BYTE_PORT, CALLS_PORT, IDLE_PORT]


def one_script_folder(port: int, source: str) -> Path:
    """A folder of its own for figures 4, 8 and 9: no other port takes a share of --workers."""
    folder = Path(tempfile.mkdtemp(prefix="deadend-bench-"))
    (folder / f"{port}.lua").write_text(source)
    return folder


# --- clients ----------------------------------------------------------------------------------------


def ttfb_blocking(port: int) -> float:
    """Seconds from connect() to the first byte; then the rest of the first line, and a clean close."""
    t = time.perf_counter()
    with socket.create_connection((HOST, port), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        data = s.recv(1)
        elapsed = time.perf_counter() - t
        if not data:
            raise ServerFailed(f"port {port}: closed before the first byte")
        while b"\n" not in data and data != b"x":
            chunk = s.recv(4096)
            if not chunk:
                break
            data += chunk
    return elapsed


async def _open(port: int) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setblocking(False)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        await asyncio.get_running_loop().sock_connect(s, (HOST, port))
    except BaseException:
        s.close()
        raise
    return s


async def _read_until(s: socket.socket, data: bytes, done: Callable[[bytes], bool]) -> bytes:
    loop = asyncio.get_running_loop()
    while not done(data):
        chunk = await loop.sock_recv(s, 65536)
        if not chunk:
            raise ServerFailed(f"connection closed early after {data[-200:]!r}")
        data += chunk
    return data


async def ttfb_async(port: int) -> float:
    loop = asyncio.get_running_loop()
    t = time.perf_counter()
    s = await _open(port)
    try:
        data = await loop.sock_recv(s, 1)
        elapsed = time.perf_counter() - t
        if not data:
            raise ServerFailed(f"port {port}: closed before the first byte")
        await _read_until(s, data, lambda d: b"\n" in d)
    finally:
        s.close()
    return elapsed


EHLO_DONE = re.compile(rb"(?:^|\n)250 [^\n]*\n")


async def smtp_session(port: int) -> float:
    """Banner, EHLO, QUIT, until the server closes. Returns the session's wall time."""
    loop = asyncio.get_running_loop()
    t = time.perf_counter()
    s = await _open(port)
    try:
        data = await _read_until(s, b"", lambda d: b"\n" in d)
        if not data.startswith(b"220 "):
            raise ServerFailed(f"no SMTP banner: {data!r}")
        await loop.sock_sendall(s, b"EHLO bench.example\r\n")
        await _read_until(s, b"", lambda d: EHLO_DONE.search(d) is not None)
        await loop.sock_sendall(s, b"QUIT\r\n")
        rest = b""
        while chunk := await loop.sock_recv(s, 65536):
            rest += chunk
        if not rest.startswith(b"221 "):
            raise ServerFailed(f"no reply to QUIT: {rest!r}")
    finally:
        s.close()
    return time.perf_counter() - t


async def first_byte_session(port: int) -> float:
    """Connect, read until the server closes (figure 9's script sends one byte at its end)."""
    loop = asyncio.get_running_loop()
    t = time.perf_counter()
    s = await _open(port)
    try:
        while await loop.sock_recv(s, 4096):
            pass
    finally:
        s.close()
    return time.perf_counter() - t


async def run_clients(
    job: Callable[[int], Awaitable[float]], port: int, clients: int, total: int
) -> tuple[list[float], float]:
    """`clients` loops running `job` until `total` jobs are done; (each job's result, wall seconds)."""
    started = 0
    results: list[float] = []

    async def loop() -> None:
        nonlocal started
        while started < total:
            started += 1
            async with asyncio.timeout(60):
                results.append(await job(port))

    t = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(clients)))
    return results, time.perf_counter() - t


def rotate(servers: list[Served], rounds: int) -> list[Served]:
    """Each round starts one server later (a, b, c; b, c, a; ...): every server gets the early and the late
    slots alike."""
    order: list[Served] = []
    for r in range(rounds):
        k = r % len(servers)
        order += servers[k:] + servers[:k]
    return order


# --- figures 1, 2, 3, 5 -----------------------------------------------------------------------------


@dataclass
class Latency:
    seq: dict[str, list[float]]
    conc: dict[str, list[float]]
    cpu: dict[str, float]  # seconds per session
    faults: dict[str, tuple[float, float]]  # minor faults per session: (reaped children, zygote)
    rate: dict[str, float]  # sessions per second
    sessions: dict[str, int]
    rpc: dict[str, float]  # seconds per call
    rpc_detail: dict[str, tuple[float, float]]  # median seconds with K calls, with none


def measure_latency(servers: list[Served], z: Sizes) -> Latency:
    names = [s.name for s in servers]
    for srv in servers:  # warm-up: imports, caches, the first forks
        for _ in range(10):
            ttfb_blocking(srv.port(SMTP_PORT))
        results, _ = asyncio.run(run_clients(smtp_session, srv.port(SMTP_FAST_PORT), 4, 8))
        srv.expected += 10 + len(results)
        srv.quiesce()

    seq: dict[str, list[float]] = {n: [] for n in names}
    for srv in rotate(servers, z.rounds):
        n = z.seq // z.rounds
        seq[srv.name] += [ttfb_blocking(srv.port(SMTP_PORT)) for _ in range(n)]
        srv.expected += n
    conc: dict[str, list[float]] = {n: [] for n in names}
    for srv in rotate(servers, z.rounds):
        n = z.conc // z.rounds
        results, _ = asyncio.run(run_clients(ttfb_async, srv.port(SMTP_PORT), z.concurrency, n))
        conc[srv.name] += results
        srv.expected += n
    for srv in servers:
        srv.quiesce()

    cpu = dict.fromkeys(names, 0.0)
    wall = dict.fromkeys(names, 0.0)
    done = dict.fromkeys(names, 0)
    faults = {n: [0, 0] for n in names}
    for srv in rotate(servers, z.rounds):
        n = z.smtp // z.rounds
        before, faults_before = srv.cpu_seconds(), srv.faults()
        results, seconds = asyncio.run(run_clients(smtp_session, srv.port(SMTP_FAST_PORT), z.concurrency, n))
        srv.expected += n
        srv.quiesce()
        cpu[srv.name] += srv.cpu_seconds() - before
        for i, (a, b) in enumerate(zip(faults_before, srv.faults(), strict=True)):
            faults[srv.name][i] += b - a
        wall[srv.name] += seconds
        done[srv.name] += len(results)

    with_calls: dict[str, list[float]] = {n: [] for n in names}
    without: dict[str, list[float]] = {n: [] for n in names}
    for srv in rotate(servers, z.reps):
        with_calls[srv.name].append(ttfb_blocking(srv.port(CALLS_PORT)))
        without[srv.name].append(ttfb_blocking(srv.port(BYTE_PORT)))
        srv.expected += 2
    for srv in servers:
        srv.quiesce()
    rpc_detail = {n: (statistics.median(with_calls[n]), statistics.median(without[n])) for n in names}
    return Latency(
        seq=seq,
        conc=conc,
        cpu={n: cpu[n] / done[n] for n in names},
        faults={n: (faults[n][0] / done[n], faults[n][1] / done[n]) for n in names},
        rate={n: done[n] / wall[n] for n in names},
        sessions=done,
        rpc={n: (rpc_detail[n][0] - rpc_detail[n][1]) / z.calls for n in names},
        rpc_detail=rpc_detail,
    )


# --- figure 4: memory -------------------------------------------------------------------------------


@dataclass
class Memory:
    per_session_kib: float | None
    held: int
    idle_kib: int
    loaded_kib: int
    processes: int
    note: str  # why N could not be held, or ""
    warm_child: dict[str, float] | None = None  # figure 7 (brokers only)
    held_child_uss: float | None = None  # a held session's child: Private_Clean + Private_Dirty, median


def raise_fd_limit() -> int:
    """The soft RLIMIT_NOFILE raised to the hard one (as the broker does); children inherit it."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def capacity(n: int, isolated: bool, warm: int) -> str:
    """Why this machine cannot hold N sessions on that server, before trying: descriptors, processes."""
    reasons = []
    limit = raise_fd_limit()
    # The broker: client socket, two pipe ends and a pidfd per session (broker/gate.py), plus its reserve.
    per_session = FDS_PER_SESSION if isolated else 1
    need = max(n + 256, per_session * n + FDS_RESERVED + len(SCRIPT_PORTS) + warm * FDS_PER_WARM_CHILD)
    if limit < need:
        reasons.append(
            f"descriptor limit {limit:,} < {need:,} ({per_session} per session; `ulimit -Hn`)"
            if isolated
            else f"descriptor limit {limit:,} < {need:,} (`ulimit -Hn`)"
        )
    if isolated:
        with open("/proc/sys/kernel/pid_max") as f:
            pid_max = int(f.read())
        nproc, _ = resource.getrlimit(resource.RLIMIT_NPROC)
        if nproc != resource.RLIM_INFINITY:
            pid_max = min(pid_max, nproc)
        room = pid_max - sum(1 for entry in os.listdir("/proc") if entry.isdigit()) - 256
        if room < n:
            reasons.append(f"room for {room:,} more processes (pid_max, RLIMIT_NPROC)")
    return "; ".join(reasons)


async def hold(
    port: int, n: int, probe: Callable[[int], str], concurrency: int = 32
) -> tuple[list[socket.socket], str]:
    """Open up to `n` sessions, each until its first line arrived. Stops early when `probe(held)` objects."""
    held: list[socket.socket] = []
    stop = ""
    todo = n

    async def one() -> None:
        nonlocal stop, todo
        while todo > 0 and not stop:
            todo -= 1
            try:
                async with asyncio.timeout(30):
                    s = await _open(port)
                    try:
                        await _read_until(s, b"", lambda d: b"\n" in d)
                    except BaseException:
                        s.close()
                        raise
            except (OSError, TimeoutError, ServerFailed) as e:
                stop = stop or f"session {len(held) + 1} failed ({type(e).__name__}: {e})"
                return
            held.append(s)
            if len(held) % 16 == 0 and not stop:
                stop = probe(len(held))

    await asyncio.gather(*(one() for _ in range(concurrency)))
    return held, stop


def median_of(kids: list[int], key: str) -> float | None:
    readings = [r[key] for r in (rollup_kib(pid) for pid in kids) if r]
    return statistics.median(readings) if readings else None


def measure_memory(srv: Served, n: int) -> Memory:
    """Figure 4 on one freshly started server (and figure 7 for a broker).

    Holds N sessions if it can. If descriptors or processes cannot go to N, or memory would not last,
    it holds a sample (a twentieth of N, at least 64) to say what N would need, and reports that.
    """
    blocked = capacity(n, srv.isolated, srv.warm)
    room = ["--workers", str(n + 64), "--max-connections", str(n + 64), "--max-per-ip", str(n + 64)]
    srv.argv = [*srv.argv, *room]
    srv.start([IDLE_PORT])
    try:
        time.sleep(1.0)
        if srv.isolated:
            srv.wait_warm()
        try:
            idle, _ = srv.pss_total_kib()
        except PermissionError:
            # broker/privileges.py forbid_tracing and sandbox/lockdown.py make these processes
            # non-dumpable: their smaps_rollup is readable only with CAP_SYS_PTRACE (root).
            return Memory(None, 0, 0, 0, 0, "smaps_rollup of non-dumpable processes needs root")
        warm = None
        warm_kids = set(children_of(srv.server)) if srv.isolated else set()
        if warm_kids:
            kids = [rollup_kib(pid) for pid in warm_kids]
            kids = [k for k in kids if k]
            warm = {k: statistics.median(kid[k] for kid in kids) for k in ("rss", "pss", "uss")}

        reserve = max(1 << 20, meminfo_kib("MemTotal") // 10)  # KiB always left to the rest of the machine
        start_avail = meminfo_kib("MemAvailable")
        sample = min(n, max(64, n // 20))

        def projection(held: int) -> str:
            """'' if N sessions fit in memory, judging by what `held` cost; else why not."""
            avail = meminfo_kib("MemAvailable")
            each = max(0, start_avail - avail) / held
            if each * (n - held) <= avail - reserve:
                return ""
            return (
                f"each session took ~{each / 1024:.1f} MiB of RAM (MemAvailable, over {held:,}), so {n:,} "
                f"need ~{each * n / 2**20:.1f} GiB; {start_avail / 2**20:.1f} GiB was available, of which"
                f" {reserve / 2**20:.1f} GiB stays for the rest of the machine"
            )

        def probe(held: int) -> str:
            if meminfo_kib("MemAvailable") < reserve:
                return f"MemAvailable fell below {reserve >> 10} MiB after {held:,} sessions"
            return projection(held) if sample <= held < n else ""

        socks, stop = asyncio.run(hold(srv.port(IDLE_PORT), sample if blocked else n, probe))
        held_uss = None
        try:
            srv.expected += len(socks)
            time.sleep(1.5)  # the pool refills its warm children; the broker's heap settles
            srv.check_alive()
            loaded, processes = srv.pss_total_kib()
            if srv.isolated:
                held_uss = median_of([p for p in children_of(srv.server) if p not in warm_kids], "uss")
            if blocked and socks:
                stop = "; ".join(r for r in (blocked, stop or projection(len(socks))) if r)
        finally:
            for s in socks:
                s.close()
        if stop.startswith("session") and srv.reasons.keys() - {"done"}:
            stop += f" (the server ended sessions: {dict(srv.reasons)})"
        held = len(socks)
        per = (loaded - idle) / held if held else None
        return Memory(per if not stop else None, held, idle, loaded, processes, stop, warm, held_uss)
    finally:
        srv.stop()
        srv.expected = srv.ends  # the held sessions end at the stop, with reason shutdown


# --- dense mode: figures 1 and 2 with --sessions-per-worker 64 ---------------------------------------


@dataclass
class DenseLatency:
    seq: dict[str, list[float]]
    cpu: dict[str, float]  # seconds per session
    sessions: dict[str, int]


def measure_dense_latency(servers: list[Served], z: Sizes) -> DenseLatency:
    """Figure 1 (sequential) and 2 on the dense brokers, rotating with the floors (already warm)."""
    names = [s.name for s in servers]
    for dense in (srv for srv in servers if srv.dense):
        for _ in range(10):  # warm-up, as measure_latency does
            ttfb_blocking(dense.port(SMTP_PORT))
        results, _ = asyncio.run(run_clients(smtp_session, dense.port(SMTP_FAST_PORT), 4, 8))
        dense.expected += 10 + len(results)
        dense.quiesce()

    seq: dict[str, list[float]] = {n: [] for n in names}
    for srv in rotate(servers, z.rounds):
        n = z.seq // z.rounds
        seq[srv.name] += [ttfb_blocking(srv.port(SMTP_PORT)) for _ in range(n)]
        srv.expected += n
    for srv in servers:
        srv.quiesce()

    cpu = dict.fromkeys(names, 0.0)
    done = dict.fromkeys(names, 0)
    for srv in rotate(servers, z.rounds):
        n = z.smtp // z.rounds
        before = srv.cpu_snapshot()
        results, _ = asyncio.run(run_clients(smtp_session, srv.port(SMTP_FAST_PORT), z.concurrency, n))
        srv.expected += n
        srv.quiesce()
        cpu[srv.name] += cpu_between(before, srv.cpu_snapshot())
        done[srv.name] += len(results)
    return DenseLatency(seq=seq, cpu={n: cpu[n] / done[n] for n in names}, sessions=done)


# --- figure 8: dense mode, N held tarpit sessions -----------------------------------------------------


class HeldClients:
    """`n` client connections to `port`, each held open once its first line arrived, by helper processes
    (this script with --hold-clients), as many as it takes for each to stay under its descriptor limit.
    The clients then read nothing more: the tarpit's 3 bytes every 10 s wait in their receive buffers."""

    def __init__(self, port: int, n: int) -> None:
        per = max(1, raise_fd_limit() - 256)  # a helper inherits this limit; 256 for Python and spares
        counts = [min(per, n - i) for i in range(0, n, per)]
        self.procs = [
            subprocess.Popen(
                [sys.executable, str(Path(__file__).resolve()), "--hold-clients", str(port), str(count)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                cwd=REPO,
            )
            for count in counts
        ]

    def wait(self, timeout: float) -> tuple[int, str]:
        """(connections held, why some could not be: "" if all were)."""
        held, stops = 0, []
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            assert proc.stdout is not None
            ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            line = proc.stdout.readline() if ready else ""
            try:
                report = json.loads(line)
            except ValueError:
                stops.append(f"a client helper did not report (exit status {proc.poll()})")
                continue
            held += report["held"]
            if report["stop"]:
                stops.append(report["stop"])
        return held, "; ".join(stops)

    def close(self) -> None:
        for proc in self.procs:
            with contextlib.suppress(OSError):
                assert proc.stdin is not None
                proc.stdin.close()  # the helper closes its connections and exits
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def hold_clients_main(port: int, n: int) -> int:
    """The helper of HeldClients: hold `n` connections, report on stdout, close them at stdin's EOF."""
    raise_fd_limit()
    socks, stop = asyncio.run(hold(port, n, lambda _held: ""))
    print(json.dumps({"held": len(socks), "stop": stop}), flush=True)
    sys.stdin.read()
    for s in socks:
        s.close()
    return 0


@dataclass
class DenseHold:
    asked: int
    held: int = 0
    helpers: int = 0
    idle: dict[str, tuple[int, int]] | None = None  # role -> (Pss KiB, processes); None: unreadable
    loaded: dict[str, tuple[int, int]] | None = None
    cores: float | None = None
    window: float = 0.0
    capped: int | None = None  # the broker admits no more connections than this, fewer than N
    failed: str = ""  # why not every connection asked for was held
    window_note: str = ""  # sessions that ended during the CPU window

    def per_session(self, role: str | None = None) -> float | None:
        """PSS KiB per held session: all processes, or one role's."""
        if not self.held or self.idle is None or self.loaded is None or self.failed:
            return None
        roles = [role] if role else list(self.loaded)
        loaded = sum(self.loaded[r][0] for r in roles)
        return (loaded - sum(self.idle[r][0] for r in roles)) / self.held


def measure_dense_hold(servers: list[Served], n: int, seconds: float) -> dict[str, DenseHold]:
    """Figure 8: memory, then CPU over one window, of N held tarpit sessions on every server.

    Each server in turn is started while the ones before it hold their N: the Pss reading it compares
    (idle, then N held) is taken with the same other processes alive. Then one window over which all hold
    their N at once, so that all see the same machine; CPU time is per process, the other servers' does
    not land in it.
    """
    holds: dict[str, DenseHold] = {}
    clients: list[HeldClients] = []
    target = n
    try:
        for srv in servers:
            h = holds[srv.name] = DenseHold(asked=target)
            srv.start([TARPIT_PORT])
            time.sleep(1.0)  # the dense pool's first child, the heap after start-up
            with contextlib.suppress(PermissionError):
                h.idle = srv.pss_by_role()
            if srv.fd_cap is not None and srv.fd_cap < target:
                h.capped = target = srv.fd_cap
            c = HeldClients(srv.port(TARPIT_PORT), target)
            clients.append(c)
            h.helpers = len(c.procs)
            h.held, h.failed = c.wait(timeout=60 + target / 100)
            srv.expected += h.held
            if h.held and h.held < target:
                target = h.held  # the servers after it are asked for as many, to compare alike
            time.sleep(1.5)  # let the heaps settle, as figure 4 does
            srv.check_alive()
            with contextlib.suppress(PermissionError):
                h.loaded = srv.pss_by_role()
        ends = {srv.name: srv.ends for srv in servers}
        before = {srv.name: srv.cpu_snapshot() for srv in servers}
        t = time.monotonic()
        time.sleep(seconds)
        after = {srv.name: srv.cpu_snapshot() for srv in servers}
        wall = time.monotonic() - t
        for srv in servers:
            h = holds[srv.name]
            h.cores, h.window = cpu_between(before[srv.name], after[srv.name]) / wall, wall
            if srv.ends != ends[srv.name]:
                h.window_note = f"{srv.ends - ends[srv.name]:,} of its sessions ended during the window"
            srv.check_alive()
    finally:
        stopping = [threading.Thread(target=srv.stop) for srv in servers]  # all at once: they take ~1 s
        for thread in stopping:
            thread.start()
        for thread in stopping:
            thread.join()
        for srv in servers:
            srv.expected = srv.ends  # the held sessions end at the stop, with reason shutdown
        for c in clients:
            c.close()
    return holds


# --- figure 9: every core ---------------------------------------------------------------------------


@dataclass
class Brokers:
    rate: dict[int, float]  # --brokers N -> sessions per second
    cpu: dict[int, float]  # --brokers N -> server CPU seconds per session
    clients: int
    note: str = ""  # why it was not measured


def measure_brokers(folder: Path, z: Sizes, counts: tuple[int, ...] = (1, 2)) -> Brokers:
    """Dense sessions per second of BUSY_SCRIPT with --brokers 1, then 2, each broker started alone."""
    clients = 4 * z.concurrency
    result = Brokers({}, {}, clients)
    rounds = max(1, z.rounds // 2)
    rates: dict[int, list[float]] = {n: [] for n in counts}
    for _ in range(rounds):
        for n in counts:
            srv = broker(THIS, folder, ["--max-per-ip", "100000"], WARM, DENSE_LATENCY_K, brokers=n)
            srv.name = f"{DEADEND}{DENSE} --brokers {n}"
            srv.isolated = False  # its processes are not read: only its rate
            try:
                srv.start([BUSY_PORT])
            except ServerFailed as e:
                result.note = f"--brokers {n} did not start: {str(e).splitlines()[-1][:200]}"
                return result
            try:
                warm, _ = asyncio.run(
                    run_clients(first_byte_session, srv.port(BUSY_PORT), clients, clients * 2)
                )
                srv.expected += len(warm)
                count = z.busy // rounds
                results, seconds = asyncio.run(
                    run_clients(first_byte_session, srv.port(BUSY_PORT), clients, count)
                )
                srv.expected += len(results)
                rates[n].append(len(results) / seconds)
            finally:
                srv.stop()
    result.rate = {n: statistics.median(r) for n, r in rates.items()}
    return result


# --- figure 6: start-to-ready -----------------------------------------------------------------------


def start_to_ready(n: int) -> tuple[list[float], list[float], list[float]]:
    """(deadend child start-to-ready ms, in-process new_runtime() ms, a bare LuaRuntime() ms), N each."""
    sys.path.insert(0, str(BENCH))
    from basics import child_start  # bench/basics.py: the broker's Zygote driven from this process

    ready, _bare = asyncio.run(child_start(n))
    inproc, bare = [], []
    for _ in range(n):
        t = time.perf_counter()
        sandbox_worker.new_runtime()
        inproc.append((time.perf_counter() - t) * 1000)
        t = time.perf_counter()
        lupa.lua54.LuaRuntime(encoding=None)
        bare.append((time.perf_counter() - t) * 1000)
    return ready, inproc, bare


# --- the report -------------------------------------------------------------------------------------


def machine() -> str:
    lua = ".".join(str(v) for v in lupa.lua54.LUA_VERSION)
    return (
        f"{platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
        f"lupa {lupa.__version__} (Lua {lua})"
    )


def print_table(rows: list[Row], before: bool) -> None:
    header = ["key", "figure", "deadend"]
    if before:
        header.append("deadend before")
    header += ["in-process", "lean", "÷ in-process", "÷ lean"]
    if before:
        header.append("before ÷ lean")
    cells = [r.cells(before) for r in rows]
    widths = [max(len(c[i]) for c in [header, *cells]) for i in range(len(header))]
    for line in [header, ["-" * w for w in widths], *cells]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |")


def memory_cell(m: Memory | None, n: int, isolated: bool) -> Value:
    if m is None:
        return "—"
    if m.per_session_kib is not None:
        return m.per_session_kib
    if "needs root" in m.note:
        return "n/a (PSS unreadable without root)"
    what = "in default isolation (one process per session)" if isolated else "in one process"
    return f"n/a (cannot hold {n:,} {what})"


@dataclass
class Results:
    sizes: Sizes
    before: bool  # --before: its servers were measured too
    lat: Latency
    mem: dict[str, Memory]
    ready: list[float]  # ms
    inproc: list[float]  # ms
    bare: list[float]  # ms
    reasons: dict[str, collections.Counter[str]]
    warm: int
    dense_lat: DenseLatency
    dense: dict[str, DenseHold]
    brokers: Brokers


def dense_memory_cell(h: DenseHold | None) -> Value:
    if h is None:
        return "—"
    value = h.per_session()
    if value is not None:
        return value
    if h.idle is None or h.loaded is None:
        return "n/a (PSS unreadable without root)"
    return f"n/a (held {h.held:,} of {h.asked:,}: see method)"


def dense_cpu_cell(h: DenseHold | None) -> Value:
    if h is None:
        return "—"
    if h.cores is None or h.failed or h.window_note:
        return f"n/a ({h.window_note or 'not every session was held'}: see method)"
    return h.cores


def by_column(values: Mapping[str, Value], dense: bool = False) -> dict[str, Value]:
    """Server names -> table columns (the dense brokers go in the deadend columns of dense rows)."""
    out: dict[str, Value] = {}
    for name, value in values.items():
        column = name.replace(DENSE, "") if dense else name
        if DENSE in name and not dense:
            continue
        out[column] = value
    return out


def table_rows(r: Results) -> list[Row]:
    z, lat, dl = r.sizes, r.lat, r.dense_lat
    c, n = z.concurrency, z.sessions

    def at(values: dict[str, list[float]], p: float, dense: bool = False) -> dict[str, Value]:
        return by_column({k: pct(v, p) * 1000 for k, v in values.items()}, dense)

    hd = r.dense.get(DEADEND + DENSE)
    asked = hd.asked if hd else z.dense
    held = f"N={hd.held:,}" if hd else f"N={z.dense:,}"
    if hd and hd.capped:
        held += f" (broker's cap; {z.dense:,} asked)"
    count = len(lat.seq[DEADEND])
    banner = "1. TTFB of the 25.lua banner,"
    dense_k = f"dense (K={DENSE_LATENCY_K})"
    rows = [
        Row("ttfb-seq-p50", f"{banner} 1 client sequential, p50 (N={count})", "ms", at(lat.seq, 50)),
        Row("ttfb-seq-p99", f"{banner} 1 client sequential, p99", "ms", at(lat.seq, 99)),
        Row(
            "ttfb-conc-p50",
            f"{banner} {c} concurrent clients, p50 (N={len(lat.conc[DEADEND])})",
            "ms",
            at(lat.conc, 50),
        ),
        Row("ttfb-conc-p99", f"{banner} {c} concurrent clients, p99", "ms", at(lat.conc, 99)),
        Row(
            "ttfb-seq-dense-p50",
            f"{banner} 1 client sequential, {dense_k}, p50 (N={len(dl.seq[DEADEND + DENSE])})",
            "ms",
            at(dl.seq, 50, dense=True),
        ),
        Row(
            "ttfb-seq-dense-p99", f"{banner} 1 client sequential, {dense_k}, p99", "ms", at(dl.seq, 99, True)
        ),
        Row(
            "cpu-per-session",
            f"2. server CPU per SMTP session (banner, EHLO, QUIT), {c} concurrent"
            f" (N={lat.sessions[DEADEND]})",
            "ms",
            by_column({k: v * 1000 for k, v in lat.cpu.items()}),
        ),
        Row(
            "faults-per-session",
            "2. minor page faults per SMTP session: the children (reaped), same load",
            "",
            by_column({k: v[0] for k, v in lat.faults.items() if DEADEND in k}),
        ),
        Row(
            "zygote-faults-per-session",
            "2. minor page faults per SMTP session: the zygote's own processes (fork, copy-on-write)",
            "",
            by_column({k: v[1] for k, v in lat.faults.items() if DEADEND in k}),
        ),
        Row(
            "cpu-per-session-dense",
            f"2. server CPU per SMTP session, {dense_k}, {c} concurrent (N={dl.sessions[DEADEND + DENSE]})",
            "ms",
            by_column({k: v * 1000 for k, v in dl.cpu.items()}, dense=True),
        ),
        Row("sessions-per-second", "3. SMTP sessions per second, same load", "/s", by_column(lat.rate)),
        Row(
            "memory-per-session",
            f"4. PSS per held idle session, all processes counted, N={n:,}",
            "KiB",
            {k: memory_cell(m, n, k.startswith(DEADEND)) for k, m in r.mem.items()},
        ),
        Row(
            "held-child-uss",
            "4. one held session's child, private memory (Private_Clean + Private_Dirty), median",
            "KiB",
            {
                k: m.held_child_uss if m.held_child_uss is not None else "n/a"
                for k, m in r.mem.items()
                if m.held
            },
        ),
        Row(
            "memory-dense",
            f"8. PSS per held tarpit session, dense (K={DENSE_K:,}), all processes, {held}",
            "KiB",
            by_column({k: dense_memory_cell(h) for k, h in r.dense.items()}, dense=True),
        ),
        Row(
            "cpu-dense-hold",
            f"8. server CPU holding them, over {hd.window if hd else z.hold_seconds:.0f} s (N={asked:,})",
            "cores",
            by_column({k: dense_cpu_cell(h) for k, h in r.dense.items()}, dense=True),
        ),
        Row(
            "rpc-round-trip",
            f"5. one deadend.get_ip() round trip (K={z.calls:,}, {z.reps} runs)",
            "µs",
            by_column({k: v * 1e6 for k, v in lat.rpc.items()}),
        ),
    ]
    ready = "6. sandbox start-to-ready (in-process: new_runtime(); lean: LuaRuntime()),"
    for p in (50, 99):
        values: dict[str, Value] = {
            DEADEND: pct(r.ready, p),
            IN_PROCESS: pct(r.inproc, p),
            LEAN: pct(r.bare, p),
        }
        rows.append(Row(f"start-to-ready-p{p}", f"{ready} p{p} (N={z.starts})", "ms", values))
    idle = "7. one idle warm child (pre-forked, locked down),"
    for key in ("pss", "uss"):
        row = Row(f"idle-warm-child-{key}", f"{idle} {key.upper()}", "KiB", {})
        for name, m in r.mem.items():
            if name.startswith(DEADEND):
                row.values[name] = m.warm_child[key] if m.warm_child else "n/a (not measured)"
        rows.append(row)
    b = r.brokers
    for count in sorted(b.rate):
        rows.append(
            Row(
                f"brokers-{count}",
                f"9. sessions per second, {dense_k}, {BUSY_CALLS} round trips each, --brokers {count},"
                f" {b.clients} clients",
                "/s",
                {DEADEND: b.rate[count]},
            )
        )
    if b.note:
        rows.append(
            Row("brokers-1", "9. sessions per second, --brokers 1", "/s", {DEADEND: f"n/a ({b.note})"})
        )
    return rows


@dataclass(frozen=True)
class Target:
    """One row of the issue's targets: a figure of this run (a ratio to the lean floor, or absolute)."""

    name: str
    row: str  # the table row it is read from
    column: str  # the column, or "ratio" for a ratio of two columns
    limit: float
    at_most: bool = True  # the figure must be at most `limit` (else at least)
    unit: str = "x"
    versus: str = LEAN  # the denominator of a ratio ("" for an absolute figure)


TARGETS = (
    Target("in-process path, CPU per SMTP session", "cpu-per-session", IN_PROCESS, 2.0),
    Target("default mode, CPU per SMTP session (16 clients)", "cpu-per-session", DEADEND, 8.0),
    Target("default mode, TTFB one client back to back, p50", "ttfb-seq-p50", DEADEND, 2.5),
    Target("default mode, TTFB one client back to back, p99", "ttfb-seq-p99", DEADEND, 6.0),
    Target("dense (K=64), CPU per SMTP session", "cpu-per-session-dense", DEADEND, 2.0),
    Target("dense (K=64), TTFB p50", "ttfb-seq-dense-p50", DEADEND, 1.5),
    Target(
        "dense (K=1,000), PSS per held tarpit session", "memory-dense", DEADEND, 48, unit=" KiB", versus=""
    ),
    Target(
        "dense, CPU holding the tarpit sessions", "cpu-dense-hold", DEADEND, 0.08, unit=" core", versus=""
    ),
    Target("one deadend.* round trip", "rpc-round-trip", DEADEND, 40, unit=" µs", versus=""),
    Target(
        "sessions per second, dense, 2 brokers vs 1", "brokers-2", DEADEND, 1.5, at_most=False, versus="1"
    ),
)


def target_value(t: Target, rows: dict[str, Row], suffix: str) -> Value:
    row = rows.get(t.row)
    if row is None:
        return "n/a"
    value = row.values.get(t.column + suffix, "n/a")
    if t.versus == "1":  # the --brokers 1 row of the same figure
        one = rows.get("brokers-1")
        base = one.values.get(t.column + suffix) if one else None
    elif t.versus:
        base = row.values.get(t.versus)
    else:
        return value
    if not isinstance(value, float | int) or not isinstance(base, float | int) or not base:
        return "n/a"
    return value / base


def print_targets(rows: list[Row], before: bool, held: int) -> None:
    by_key = {r.key: r for r in rows}
    header = (
        ["target", "before", "after", "target", "met"] if before else ["target", "this run", "target", "met"]
    )
    lines = []
    for t in TARGETS:
        shown = []
        for suffix in ([BEFORE] if before else []) + [""]:
            v = target_value(t, by_key, suffix)
            shown.append(v if isinstance(v, str) else f"{num(v)}{t.unit}")
        after = target_value(t, by_key, "")
        met = "—" if isinstance(after, str) else ("yes" if (after <= t.limit) == t.at_most else "NO")
        relation = "<=" if t.at_most else ">="
        name = t.name if not t.versus or t.versus == "1" else f"{t.name}, ÷ lean"
        lines.append([name, *shown, f"{relation} {num(t.limit)}{t.unit}", met])
    print(f"\ntargets (the issue's; N={held:,} held for the dense rows):")
    widths = [max(len(c[i]) for c in [header, *lines]) for i in range(len(header))]
    for line in [header, ["-" * w for w in widths], *lines]:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + " |")


def method(r: Results) -> list[str]:
    z, c, n = r.sizes, r.sizes.concurrency, r.sizes.sessions
    lines = [
        f"deadend = `python -m deadend broker {' '.join(server_flags([]))} --port-offset P --warm {r.warm}"
        f" --max-per-ip 100000` (--warm {r.warm} and --workers {WORKERS} are the defaults; figure 4 raises"
        " --workers, --max-connections and --max-per-ip to N+64).",
        "in-process = `python bench/inprocess.py` with the same flags: the product's Server, Doorman, Session"
        " and Monitor, each session's Lua state (sandbox/bootstrap.lua via sandbox.worker.new_runtime) built"
        " per connection in its one process; no fork, lockdown or pipe.",
        "lean = `python bench/lean.py` with the same flags (it ignores all but --scripts, --host and"
        " --port-offset): a fresh lupa LuaRuntime per connection, the script loaded with a shim of"
        " coroutine yields, an asyncio stream handler; no hardening, no monitor, log lines printed as they"
        " come. Clients run in this process; the servers are measured in rotating rounds.",
    ]
    smtp_origin = ""
    if r.before:
        smtp_origin = "the --before checkout's "
        lines.append(
            "deadend before, in-process before: the same servers of the --before checkout (its own code and"
            " .venv), measured in the same rounds; the lean floor is shared. Every server runs the --before"
            " checkout's 25.lua (figures 1-3), which an older broker can serve."
        )
    lines += [
        f"1: connect() to the first byte of {smtp_origin}examples/25.lua's banner: {z.seq} sequential"
        " connections, then"
        f" {z.conc} by {c} clients each in a loop (connect, read the line, close); {z.rounds} rounds each.",
        f"2, 3: {z.smtp} sessions (banner, EHLO, QUIT; 25.lua with its tarpit set to 0) by {c} clients in a"
        " loop. CPU = broker utime+stime + zygote utime+stime + zygote cutime+cstime (its reaped children),"
        f" read once the broker logged every session end and the zygote had reaped every child but the"
        f" {r.warm} warm ones, +{SETTLE}s; floors: their process's utime+stime; over sessions."
        " Sessions/s = completed sessions / the clients' wall time. Page faults: the growth of the fork"
        " server's cminflt (its reaped children), and of the zygote's and fork server's own minflt, over"
        " sessions.",
        f"4: N={n:,} clients connect to `{IDLE_SCRIPT.splitlines()[0]} deadend.sleep(600000)` (the one"
        " script of its folder) and read the line; (sum of smaps_rollup Pss over broker + zygote + every"
        " child with N held - the same sum on the freshly started idle server, warm pool full) / N."
        " Floors: their one process.",
    ]
    for name, m in r.mem.items():
        if m.held:
            each = f"; {(m.loaded_kib - m.idle_kib) / m.held:,.0f} KiB each at {m.held:,}" if m.note else ""
            lines.append(
                f"   {name}: idle {m.idle_kib / 1024:,.1f} MiB; {m.held:,} held:"
                f" {m.loaded_kib / 1024:,.1f} MiB over {m.processes:,} process(es){each}"
            )
        if m.note:
            lines.append(f"   {name} could not hold {n:,}: {m.note}")
    lines.append(
        f"5: (median TTFB of a script making K={z.calls:,} get_ip() calls, then sending a byte - median TTFB"
        f" of one sending it at once) / K; {z.reps} connections each; --call-rate 10000000"
        " --call-rate-total 1e8 on all."
    )
    for name, (k, zero) in r.lat.rpc_detail.items():
        lines.append(f"   {name}: {k * 1000:,.1f} ms with the K calls, {zero * 1000:,.2f} ms without")
    lines.append(
        "6: the broker's Zygote driven from this process (bench/basics.py child_start): the fork request to"
        " the child's ready frame; in-process: sandbox.worker.new_runtime() in this process; lean:"
        " lupa.lua54.LuaRuntime(encoding=None)."
    )
    lines.append("7: smaps_rollup of the idle broker's warm children, median.")
    lines += dense_method(r)
    b = r.brokers
    lines.append(
        f"9: a scripts folder's {BUSY_PORT}.lua = `{BUSY_SCRIPT.strip()}` (the client connects and reads to"
        f" the end: cheap; the broker carries {BUSY_CALLS} round trips per session: dear), served by a broker"
        f" with --sessions-per-worker {DENSE_LATENCY_K} --brokers N, started alone (every other server"
        f" stopped); {z.busy} sessions by {b.clients} clients in a loop per reading, after a warm-up;"
        " the median of the rounds, --brokers 1 and 2 taking turns."
    )
    if len(b.rate) == 2 and b.rate.get(1):
        lines.append(f"   2 brokers / 1: {b.rate[2] / b.rate[1]:.2f}x")
    for name, reasons in r.reasons.items():
        other = {k: v for k, v in reasons.items() if k not in ("done", "shutdown")}
        if other:
            lines.append(f"note: {name} also ended sessions with reason(s) {other}")
    return lines


def dense_method(r: Results) -> list[str]:
    z, k = r.sizes, DENSE_LATENCY_K
    lines = [
        f"dense rows of 1 and 2: the same broker with --sessions-per-worker {k} (so up to {k} sessions per"
        f" child, a child retired after {4 * k} sessions), started once figures 1-3 were done (the floors"
        " still up) and measured in rotating rounds against the same floor processes (their figures in"
        f" these rows are from those rounds): {z.seq} sequential connections; {z.smtp} SMTP sessions by"
        f" {z.concurrency} clients. CPU = utime+stime over the broker, the zygote and every live child, plus"
        " the growth of the zygote's cutime+cstime (children reaped in the window) less what those children"
        " had spent before it, read once the broker logged every session end, +0.3s: dense children outlive"
        " their sessions, so they are read alive.",
        f"8: a folder holding only 22.lua = `{TARPIT_SCRIPT.strip()}`. deadend = the broker with"
        f" --sessions-per-worker {DENSE_K} --workers {DENSE_WORKERS} --max-connections N+100 --max-per-ip"
        f" N+100 (and the flags above; its dense pool keeps min(--warm, 1) child pre-forked); floors ="
        " the same flags (one process: --workers and --sessions-per-worker change nothing there). Started in"
        " turn, each while the ones before hold their N; 1 s after the start, smaps_rollup Pss of each"
        " process; then N clients connect and read the banner line, +1.5 s, Pss again: (held - idle) / N,"
        f" over broker + zygote + every child. Then one window of {z.hold_seconds:.0f} s during which every"
        " server holds its N at once (each session sends 3 bytes every 10 s): CPU in cores ="
        " (utime+stime deltas over broker + zygote + children, reaped ones included as above) / wall time;"
        " floors: their process.",
        "   clients: held by helper processes (bench/run.py --hold-clients PORT N), each keeping at most its"
        " descriptor limit - 256 connections, that read nothing after the banner. RLIMIT_NOFILE is per"
        " process, so the clients' N sockets are not counted against the broker's N (+ 4 per child): "
        + ", ".join(f"{h.helpers} helper(s) for {name}" for name, h in r.dense.items())
        + f" (limit {resource.getrlimit(resource.RLIMIT_NOFILE)[1]:,}).",
    ]
    for name, h in r.dense.items():
        if h.idle is not None and h.loaded is not None and h.held:
            idle = sum(v for v, _ in h.idle.values())
            loaded = sum(v for v, _ in h.loaded.values())
            parts = []
            for role, (kib, count) in h.loaded.items():
                grew = (kib - h.idle[role][0]) / h.held
                procs = f" ({h.idle[role][1]} -> {count} processes)" if role == "children" else ""
                parts.append(
                    f"{role} {h.idle[role][0] / 1024:,.1f} -> {kib / 1024:,.1f} MiB{procs}, {grew:+,.1f}"
                )
            lines.append(
                f"   {name}: idle {idle / 1024:,.1f} MiB, {h.held:,} held {loaded / 1024:,.1f} MiB; by"
                f" process (KiB per session): {'; '.join(parts)}"
            )
        if h.cores is not None:
            lines.append(f"   {name}: {h.cores * h.window:,.2f} CPU s over {h.window:.1f} s")
        for what in (h.failed, h.window_note):
            if what:
                lines.append(f"   {name}: {what}")
        if h.capped:
            lines.append(
                f"   {name} capped its connections at {h.capped:,} (its log: 'the file descriptor limit"
                f" allows {h.capped:,} concurrent connections'), below --max-connections {z.dense + 100:,}"
                " (broker/gate.py connections_fd_allows): the servers after it held as many."
            )
    return lines


def print_report(r: Results, quick: bool, now: datetime.datetime, load_start: str) -> None:
    print(f"deadend bench — {now:%Y-%m-%d %H:%M:%S} UTC{' (--quick)' if quick else ''}")
    print(f"machine: {machine()}")
    print(f"load average (1/5/15 min): {load_start} at the start, {loadavg()} at the end")
    print("÷ in-process, ÷ lean: deadend over that floor, every figure measured in this run\n")
    rows = table_rows(r)
    print_table(rows, r.before)
    hd = r.dense.get(DEADEND + DENSE)
    print_targets(rows, r.before, hd.held if hd else r.sizes.dense)
    print("\nmethod:")
    for line in method(r):
        indent = " " * (len(line) - len(line.lstrip()))
        print(
            textwrap.fill(line.strip(), 108, initial_indent=indent or "- ", subsequent_indent=indent or "  ")
        )


def run(z: Sizes, checkouts: list[Checkout]) -> Results:
    ready, inproc, bare = start_to_ready(z.starts)
    scripts = scripts_folder(z.calls, checkouts[-1])
    tarpits = one_script_folder(TARPIT_PORT, TARPIT_SCRIPT)
    busy = one_script_folder(BUSY_PORT, BUSY_SCRIPT)
    idle = one_script_folder(IDLE_PORT, IDLE_SCRIPT)
    warm = WARM
    servers: list[Served] = []
    one_ip = ["--max-per-ip", "100000"]
    try:
        main = trio(checkouts, scripts, one_ip, warm)
        servers += main
        for srv in main:
            srv.start(SCRIPT_PORTS)
        lat = measure_latency(main, z)
        floors = [srv for srv in main if not srv.isolated]
        dense = [broker(c, scripts, one_ip, warm, DENSE_LATENCY_K) for c in checkouts]
        servers += dense
        for srv in dense:
            srv.start(SCRIPT_PORTS)
        dense_lat = measure_dense_latency([*dense, *floors], z)
        for srv in servers:
            srv.stop()

        # Figure 4 in a folder of its own: no other port holds a reserve of --workers (the fair share).
        mem: dict[str, Memory] = {}
        held_servers = [broker(c, idle, [], warm) for c in checkouts]
        for srv in [*held_servers, in_process(THIS, idle, [], warm), lean(idle, [])]:
            servers.append(srv)
            mem[srv.name] = measure_memory(srv, z.sessions)

        room = str(z.dense + 100)
        extra = ["--workers", str(DENSE_WORKERS), "--max-connections", room, "--max-per-ip", room]
        holders = [broker(c, tarpits, extra, WARM, DENSE_K) for c in checkouts]
        holders += [in_process(THIS, tarpits, extra, WARM), lean(tarpits, extra)]
        servers += holders
        held = measure_dense_hold(holders, z.dense, z.hold_seconds)
        brokers = measure_brokers(busy, z)
    finally:
        for srv in servers:
            srv.stop()
        shutil.rmtree(scripts, ignore_errors=True)
        shutil.rmtree(tarpits, ignore_errors=True)
        shutil.rmtree(busy, ignore_errors=True)
        shutil.rmtree(idle, ignore_errors=True)
    reasons: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for srv in servers:
        reasons[srv.name] += srv.reasons
    return Results(
        z, len(checkouts) > 1, lat, mem, ready, inproc, bare, dict(reasons), warm, dense_lat, held, brokers
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a much smaller version of everything")
    parser.add_argument("--before", metavar="DIR", help="also measure this other checkout (with its .venv)")
    parser.add_argument("--sessions", type=int, help="held sessions for figure 4 (default 1000)")
    parser.add_argument("--calls", type=int, help="K get_ip() calls for figure 5 (default 20000)")
    parser.add_argument("--concurrency", type=int, help="concurrent clients (default 16)")
    parser.add_argument(
        "--dense-sessions",
        type=int,
        metavar="N",
        help="held sessions for figure 8, dense mode (default 10000)",
    )
    parser.add_argument("--hold-clients", nargs=2, type=int, metavar=("PORT", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.hold_clients:
        return hold_clients_main(*args.hold_clients)
    checkouts = [THIS, *([before_checkout(args.before)] if args.before else [])]
    began, load_start = time.monotonic(), loadavg()
    now = datetime.datetime.now(datetime.UTC)
    results = run(sizes_from(args), checkouts)
    print_report(results, args.quick, now, load_start)
    print(f"elapsed: {time.monotonic() - began:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
