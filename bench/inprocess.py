"""The in-process baseline of bench/run.py: deadend's own server, with each script run in THIS process.

    python bench/inprocess.py --scripts DIR --port-offset N [--host ADDR] [any other `deadend broker` flag]

Benchmark-only, never a mode of the product: no fork, no lockdown, no seccomp, no rlimits, no pipe, no
msgpack, and no wall-clock deadline on a script that computes. It is `broker.server.Server` — listeners,
Doorman, gate, `broker.session.Session`, the pure `broker.monitor.Monitor`, the event log, all imported,
not copied — given sandboxes (the `Server.sandboxes` field) that are fresh lupa Lua 5.4 runtimes built
in this process, per connection, by `sandbox.worker.new_runtime()` (the same bootstrap), and driven by
the product's `sandbox.worker.ScriptRun`, as `sandbox.worker.serve` drives it. Each request the script
makes goes straight from Lua to the same Session/Monitor code the broker runs, instead of over a pipe.
So deadend/baseline is the price of the isolation: a process per session, its start, the pipe and the
framing.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from broker import gate  # noqa: E402
from broker.channel import WorkerGone  # noqa: E402
from broker.pool import Lease, Pool  # noqa: E402
from broker.server import Server, StartupError  # noqa: E402
from broker.workers import PoolClosed  # noqa: E402
from deadend import wire  # noqa: E402
from deadend.cli import config_from_args, parse_args  # noqa: E402
from deadend.logs import EventLog  # noqa: E402
from deadend.scripts import Script  # noqa: E402
from sandbox import worker  # noqa: E402


class InProcessWorker:
    """Stands in for `broker.zygote.WorkerProcess`: there is no process, so nothing to kill or reap."""

    pid = 0

    def __init__(self) -> None:
        self.exited: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self.exited.set_result(0)

    def kill(self) -> None:
        pass


class InProcessChannel:
    """Stands in for `broker.channel.WorkerChannel`: `send` runs the script to its next request.

    The other end is the product's own driver, `sandbox.worker.ScriptRun`, exactly as `worker.session`
    uses it between its pipe reads and writes. The request reaches the session one turn of the event
    loop later, as a frame from a pipe would.
    """

    def __init__(self) -> None:
        self._lua, self._start_fn = worker.new_runtime()  # a fresh Lua state with the bootstrap
        self._run: worker.ScriptRun | None = None
        self._next: list[Any] | None = None
        self._on_frame: Callable[[Any], None] | None = None
        self._on_failure: Callable[[BaseException], None] | None = None
        self._loop = asyncio.get_running_loop()

    def serve(
        self,
        on_frame: Callable[[Any], None],
        on_failure: Callable[[BaseException], None],
        cpu_slice: float,
    ) -> None:
        self._on_frame, self._on_failure = on_frame, on_failure

    def send(self, obj: Any) -> None:
        self._next = self._advance(obj)
        if self._on_frame is not None:
            self._loop.call_soon(self._deliver)

    def _advance(self, obj: Any) -> list[Any]:
        if self._run is None:  # the start message, as worker.session reads it first
            try:
                self._run = worker.ScriptRun(self._lua, self._start_fn, wire.Start.from_frame(obj))
            except Exception as exc:
                return worker._done_frame(("crash", type(exc).__name__.encode()))
            outcome = self._run.begin()
        else:
            outcome = self._run.resume(obj)
        return outcome if isinstance(outcome, list) else worker._done_frame(outcome)

    def _deliver(self) -> None:
        frame, self._next = self._next, None
        if self._on_frame is not None and frame is not None:
            self._on_frame(frame)

    async def frame(self, timeout: float | None) -> Any:
        frame, self._next = self._next, None
        if frame is None:
            raise WorkerGone
        return frame

    def close(self) -> None:
        self._on_frame = self._on_failure = None
        self._run = self._lua = self._start_fn = None  # drops the last references to the Lua state


class InProcessPool:
    """A `broker.pool.Pool` whose sandboxes are Lua states in this process."""

    name = "inprocess"

    def __init__(self) -> None:
        self.started = 0
        self._busy = 0
        self._closed = False

    @property
    def capacity(self) -> int:
        return 1 << 30  # no process, no --workers to respect

    @property
    def busy(self) -> int:
        return self._busy

    @property
    def warm(self) -> int:
        return 0

    def at_capacity(self, script: Script) -> bool:
        return False

    async def acquire(self, script: Script, deadline: float, *, beyond_workers: bool = False) -> Lease:
        if self._closed:
            raise PoolClosed
        channel = InProcessChannel()
        self.started += 1
        self._busy += 1

        def release(_reason: str) -> None:
            self._busy -= 1
            channel.close()

        return Lease(InProcessWorker(), channel, wire.Mode.RUN, release)

    async def close(self) -> None:
        self._closed = True


class InProcessSandboxes:
    """A `broker.sandboxes.SandboxSet` of one in-process pool, for every port."""

    def __init__(self) -> None:
        self.pool = InProcessPool()
        self._failed: asyncio.Future[str] | None = None

    async def start(self) -> None:
        self._failed = asyncio.get_running_loop().create_future()

    def serve(self, scripts: Iterable[Script]) -> None:
        pass

    def pool_for(self, script: Script) -> Pool:
        return self.pool

    @property
    def compiler(self) -> Pool:
        return self.pool

    @property
    def failed(self) -> asyncio.Future[str] | None:
        return self._failed

    @property
    def queued(self) -> int:
        return 0

    @property
    def started(self) -> int:
        return self.pool.started

    @property
    def busy(self) -> int:
        return self.pool.busy

    @property
    def warm(self) -> int:
        return 0

    def stop_acquiring(self) -> None:
        self.pool._closed = True

    async def close(self) -> None:
        await self.pool.close()


def main(argv: list[str]) -> int:
    config = config_from_args(parse_args(["broker", *argv]))
    # Server._make_gate caps connections at what the descriptor limit allows, counting a client socket,
    # two pipe ends and a pidfd per session. Here a session holds its client socket only.
    gate.FDS_PER_SESSION = 1  # type: ignore[misc]
    os.environ["TZ"] = "UTC"  # as the zygote does before any Lua state exists (SPEC.md, clock option)
    time.tzset()
    log = EventLog(level=config.log_level, fmt=config.log_format)
    server = Server(config, log, sandboxes=InProcessSandboxes())
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
