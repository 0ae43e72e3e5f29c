"""The in-process baseline of bench/run.py: deadend's own server, with each script run in THIS process.

    python bench/inprocess.py --scripts DIR --port-offset N [--host ADDR] [any other `deadend broker` flag]

Benchmark-only, never a mode of the product: no fork, no lockdown, no seccomp, no rlimits, no pipe, no
msgpack, and no wall-clock deadline on a script that computes. It is `broker.server.Server` — listeners,
Doorman, gate, `broker.session.Session`, the pure `broker.monitor.Monitor`, the event log, all imported,
not copied — given a pool (the `Server.pool` field) whose "sandboxes" are fresh lupa Lua 5.4 runtimes
built in this process, per connection, by `sandbox.child.new_runtime()` (the same bootstrap), and driven
the way `sandbox.child.run_session` drives them. Each request the script makes goes straight from Lua to
the same Session/Monitor code the broker runs, instead of over a pipe. So deadend/baseline is the price
of the isolation: the process per session, its start, the pipe and the framing.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Generator
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import lupa.lua54 as lupa  # noqa: E402

from broker.channel import ChildGone  # noqa: E402
from broker.pool import PoolClosed  # noqa: E402
from broker.server import Server, StartupError  # noqa: E402
from deadend import wire  # noqa: E402
from deadend.cli import config_from_args, parse_args  # noqa: E402
from deadend.logs import EventLog  # noqa: E402
from sandbox import child  # noqa: E402

Frames = Generator[list[Any] | None, Any, None]


def _run(lua: Any, start_fn: Any) -> Generator[list[Any] | None, Any, tuple[str, bytes]]:
    """`sandbox.child.run_session` with `pipe.write(x); v = pipe.read()` spelled `v = yield x`.

    A copy of its ~25 lines: run_session reads and writes a blocking pipe in the middle of its loop, so it
    cannot be driven from an event loop as it is. Every helper it uses is the product's.
    """
    start = wire.Start.from_frame((yield None))
    lua.set_max_memory(start.memory)
    result = child._as_tuple(
        start_fn(
            start.source,
            start.chunkname.encode(),
            start.mode.encode(),
            start.seed[0],
            start.seed[1],
            start.instructions,
            start.clock,
        )
    )
    if result[0] == b"compile":
        return "compile", child._text(result[1])
    if result[0] == b"dump":
        yield ["dump", result[1]]
        return "return", b""
    if start.mode == "compile":
        return "return", b""
    step = result[1]
    reply: tuple[Any, ...] = ()
    while True:
        out = child._as_tuple(step(*reply))
        kind = out[0]
        if kind != b"call":
            message = child._text(out[1]) if len(out) > 1 else b""
            return (kind.decode() if isinstance(kind, bytes) else "crash"), message
        op = out[1].decode()
        args = list(out[2 : 2 + wire.ARITY[op]])
        if op == "log":
            args[1] = args[1].decode()
        value = yield [op, *args]
        if value is not None and type(value) not in (bytes, bool):
            return "crash", b"unexpected reply type from broker"
        reply = (value,)


def session_frames(lua: Any, start_fn: Any) -> Frames:
    """Every frame the child would write after "ready", ending with its "done" (as `child.serve`)."""
    try:
        kind, message = yield from _run(lua, start_fn)
    except lupa.LuaMemoryError:
        kind, message = "memory", b"not enough memory"
    except Exception as exc:
        kind, message = "crash", type(exc).__name__.encode()
    yield ["done", kind, message[: wire.LOG_MAX + 1]]


class InProcessChild:
    """Stands in for `broker.zygote.ChildProcess`: there is no process, so nothing to kill or reap."""

    pid = 0

    def __init__(self) -> None:
        self.exited: asyncio.Future[int | None] = asyncio.get_running_loop().create_future()
        self.exited.set_result(0)

    def kill(self) -> None:
        pass


class InProcessChannel:
    """Stands in for `broker.channel.ChildChannel`: `send` runs the script to its next request."""

    def __init__(self) -> None:
        lua, start_fn = child.new_runtime()  # a fresh Lua state with the bootstrap, per connection
        self._frames: Frames | None = session_frames(lua, start_fn)
        next(self._frames)  # to the point where the child waits for its start message
        self._next: list[Any] | None = None

    def send(self, obj: Any) -> None:
        if self._frames is None:
            return
        try:
            self._next = self._frames.send(obj)
        except StopIteration:
            self.close()

    async def frame(self, timeout: float | None) -> Any:
        frame, self._next = self._next, None
        if frame is None:
            raise ChildGone
        return frame

    def close(self) -> None:
        if self._frames is not None:
            self._frames.close()
            self._frames = None  # drops the last reference to the Lua state


class InProcessSandbox:
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

    def release(self, sandbox: InProcessSandbox) -> None:
        self.busy -= 1
        sandbox.channel.close()

    def stop_acquiring(self) -> None:
        self._closed = True

    async def close(self) -> None:
        self._closed = True


def main(argv: list[str]) -> int:
    config = config_from_args(parse_args(["broker", *argv]))
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
