"""The in-process baseline of bench/run.py: deadend's own server, with each script run in THIS process.

    python bench/inprocess.py --scripts DIR --port-offset N [--host ADDR] [any other `deadend broker` flag]

Benchmark-only, never a mode of the product: no fork, no lockdown, no seccomp, no rlimits, no pipe, no
msgpack, and no wall-clock deadline on a script that computes. It is `broker.server.Server` — listeners,
Doorman, gate, `broker.session.Session`, the pure `broker.monitor.Monitor`, the event log, all imported,
not copied — given a pool (the `Server.pool` field) whose "sandboxes" are fresh lupa Lua 5.4 runtimes
built in this process, per connection, by `sandbox.child.new_runtime()` (the same bootstrap), and driven
by the product's `sandbox.child.ScriptRun`, as `sandbox.child.serve` drives it. Each request the script
makes goes straight from Lua to the same Session/Monitor code the broker runs, instead of over a pipe.
So deadend/baseline is the price of the isolation: a process per session, its start, the pipe and the
framing.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from broker import gate  # noqa: E402
from broker.channel import ChildGone  # noqa: E402
from broker.pool import PoolClosed  # noqa: E402
from broker.server import Server, StartupError  # noqa: E402
from deadend import wire  # noqa: E402
from deadend.cli import config_from_args, parse_args  # noqa: E402
from deadend.logs import EventLog  # noqa: E402
from sandbox import child  # noqa: E402


class InProcessChild:
    """Stands in for `broker.zygote.ChildProcess`: there is no process, so nothing to kill or reap."""

    pid = 0

    def __init__(self) -> None:
        self.exited: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self.exited.set_result(0)

    def kill(self) -> None:
        pass


class InProcessChannel:
    """Stands in for `broker.channel.ChildChannel`: `send` runs the script to its next request.

    The other end is the product's own driver, `sandbox.child.ScriptRun`, exactly as `child.serve` uses it
    between its pipe reads and writes.
    """

    def __init__(self) -> None:
        self._lua, self._start_fn = child.new_runtime()  # a fresh Lua state with the bootstrap
        self._run: child.ScriptRun | None = None
        self._next: list[Any] | None = None

    def send(self, obj: Any) -> None:
        if self._run is None:  # the start message, as child.serve reads it first
            try:
                self._run = child.ScriptRun(self._lua, self._start_fn, wire.Start.from_frame(obj))
            except Exception as exc:
                self._next = child._done_frame(("crash", type(exc).__name__.encode()))
                return
            outcome = self._run.begin()
        else:
            outcome = self._run.resume(obj)
        self._next = outcome if isinstance(outcome, list) else child._done_frame(outcome)

    async def frame(self, timeout: float | None) -> Any:
        frame, self._next = self._next, None
        if frame is None:
            raise ChildGone
        return frame

    def close(self) -> None:
        self._run = self._lua = self._start_fn = None  # drops the last references to the Lua state


class InProcessSandbox:
    prepared_for = None  # broker.pool.Sandbox's: never a warm child compiled ahead, so Session sends "run"

    def __init__(self) -> None:
        self.child = InProcessChild()
        self.channel = InProcessChannel()


class InProcessPool:
    """The part of `broker.pool.SandboxPool` that Server, Doorman, Session and compile use."""

    def __init__(self) -> None:
        self.failed: asyncio.Future[str] | None = None
        self.started = 0
        self.busy = 0
        self.warm = 0
        self.queued = 0
        self._closed = False

    async def start(self) -> None:
        self.failed = asyncio.get_running_loop().create_future()

    def at_capacity(self) -> bool:
        return False

    async def acquire(self, timeout: float, **_options: object) -> InProcessSandbox:
        # No process, no --workers to respect: options such as `beyond_workers` change nothing here.
        if self._closed:
            raise PoolClosed
        sandbox = InProcessSandbox()
        self.started += 1
        self.busy += 1
        return sandbox

    def release(self, sandbox: InProcessSandbox, *_reason: object) -> None:
        self.busy -= 1
        sandbox.channel.close()

    def stop_acquiring(self) -> None:
        self._closed = True

    async def close(self) -> None:
        self._closed = True


def main(argv: list[str]) -> int:
    config = config_from_args(parse_args(["broker", *argv]))
    # Server._make_gate caps connections at what the descriptor limit allows, counting a client socket,
    # two pipe ends and a pidfd per session. Here a session holds its client socket only.
    gate.FDS_PER_SESSION = 1  # type: ignore[misc]
    os.environ["TZ"] = "UTC"  # as the zygote does before any Lua state exists (SPEC.md, clock option)
    time.tzset()
    log = EventLog(level=config.log_level, fmt=config.log_format)
    server = Server(config, log, pool=InProcessPool())  # type: ignore[arg-type]
    try:
        asyncio.run(server.serve())
    except StartupError as e:
        print(f"inprocess: error: {e}", file=sys.stderr)
        return 1
    finally:
        log.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
