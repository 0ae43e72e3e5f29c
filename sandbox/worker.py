"""A sandbox worker: build the Lua environment, lock down, then run a script as a chain of RPCs.

Runs in a process forked by the zygote with fd 0 = pipe from the broker, fd 1 = pipe to the broker,
fd 2 = /dev/null. It speaks the plain dialect of `deadend.wire` (one session), or the dense one.
Everything after `lockdown()` is hostile territory: the script may have found a bug in
Lua. This module therefore keeps no secret and trusts nothing it reads back from Lua beyond its type.
Every path ends in `os._exit`: an interpreter shutdown would make syscalls the filter forbids.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import lupa.lua54 as lupa

from deadend import wire
from sandbox.lockdown import Rlimits, lockdown

# Read by path, not importlib.resources: that pulls zipfile, tempfile, threading and random into the zygote,
# and every page a module takes is one more the zygote copies at each fork (threading's and random's
# after-fork hooks alone cost a worker ~160 page faults).
BOOTSTRAP = Path(__file__).with_name("bootstrap.lua").read_bytes()
STD_SOURCE = Path(__file__).with_name("std.lua").read_bytes()
HOLD_LIMIT = 0.05  # seconds a dense worker may hold finished frames while it works through its input
# The Lua heap cap until the start message says otherwise; set_max_memory needs one at construction.
INITIAL_MEMORY = 64 << 20


def _deny(*_args: Any) -> NoReturn:
    # Defence in depth: no Python object is ever handed to Lua, but if one were, it has no attributes.
    raise AttributeError("access denied")


def _compiled_bootstrap() -> bytes:
    """The bootstrap as a binary chunk, compiled once per process: in the zygote, once for every worker.

    Parsing the bootstrap's text was most of what a fresh state cost (about 270 of 460 us on the 2-core
    VM); loading this chunk takes about 25 us. It is our own text, compiled by this process's own Lua
    before any script exists, so loading it as bytecode trusts nothing new; scripts are only ever loaded
    as text (bootstrap.lua). Stripped of its debug information: 10 KiB less in every Lua state (a dense
    worker holds one per session); an error inside the bootstrap then has no line to point at (it is
    the script's line that errors name).
    """
    lua = lupa.LuaRuntime(encoding=None, register_eval=False, register_builtins=False)
    return bytes(lua.execute(b"return string.dump(assert(load(..., '=bootstrap', 't')), true)", BOOTSTRAP))


BOOTSTRAP_CHUNK = _compiled_bootstrap()
_CONSTANTS = wire.lua_constants()
BOOTSTRAP_ARGS = (  # the bootstrap's `...`, in its order
    *(_CONSTANTS[k] for k in ("RECV_MIN", "RECV_MAX", "SLEEP_MAX", "TARPIT_MAX", "SEND_MAX", "LOG_MAX")),
    *(_CONSTANTS[k] for k in ("REP_MAX", "MOVE_MAX", "FIELDS_MAX", "FIELD_MAX", "FIELD_KEY_MAX", "ALPN_MAX")),
    str(_CONSTANTS["BASE_NAMES"]).encode(),
)


def new_runtime() -> Any:
    """A Lua 5.4 state holding the bootstrap; returns the bootstrap's `start` function."""
    lua = lupa.LuaRuntime(
        encoding=None,  # Lua strings come back as bytes; no Python str is ever pushed into Lua
        register_eval=False,
        register_builtins=False,
        attribute_handlers=(_deny, _deny),
        max_memory=INITIAL_MEMORY,
        unpack_returned_tuples=False,
    )
    start = lua.execute(BOOTSTRAP_CHUNK, *BOOTSTRAP_ARGS, name="=bootstrap", mode="b")
    return lua, start


def _compiled_library() -> tuple[bytes, bytes]:
    """The scripts' standard library, compiled once per process (in the zygote, before any fork): the
    chunk without debug information, and std.quote's table of the characters the log escapes. A state
    gets both only when its script first uses `std` (the bootstrap's internal "std" call)."""
    lua = lupa.LuaRuntime(encoding=None, register_eval=False, register_builtins=False)
    compile = b"local source = ... return string.dump(assert(load(source, '=std', 't')), true)"
    chunk = lua.execute(compile, STD_SOURCE)
    assert isinstance(chunk, bytes)
    return chunk, wire.packed_unsafe_ranges()


LIBRARY = _compiled_library()


def resume(step: Any, *reply: Any) -> tuple[Any, ...]:
    """Resume a script with `reply`; what it asks next. The library it asks for is answered here."""
    out = _as_tuple(step(*reply))
    while out[0] == b"call" and out[1] == b"std":
        out = _as_tuple(step(*LIBRARY))
    return out


def _write_all(packed: bytes, fd: int = 1) -> None:
    data = memoryview(packed)
    while data:
        data = data[os.write(fd, data) :]


def _read_chunk(fd: int = 0) -> bytes:
    chunk = os.read(fd, wire.READ_CHUNK)
    if not chunk:
        raise EOFError
    return chunk


class Pipe:
    """Blocking plain-dialect framing on fds 0 and 1 (others for the zygote's warm-up)."""

    def __init__(self, fd_in: int = 0, fd_out: int = 1) -> None:
        self._unpacker = wire.broker_unpacker()
        self._in, self._out = fd_in, fd_out

    def write(self, obj: Any) -> None:
        _write_all(wire.pack(obj), self._out)

    def read(self) -> Any:
        while True:
            for frame in self._unpacker:
                return frame
            self._unpacker.feed(_read_chunk(self._in))


class DensePipe:
    """Blocking dense-dialect framing on fds 0 and 1: (slot, frame) pairs both ways."""

    def __init__(self) -> None:
        self._reader = wire.SlotReader(wire.broker_unpacker())
        self._frames = iter(self._reader)
        self._queued = bytearray()  # frames written together before the next blocking read
        self._queued_at = 0.0

    def write(self, slot: int, obj: Any) -> None:
        # Held until this worker would block reading: replies the broker sent together are answered with
        # one write (one wake-up of the broker) instead of one each. Never held long, though: the broker's
        # CPU watchdog counts from the last frame it saw.
        if not self._queued:
            self._queued_at = time.monotonic()
        self._queued += wire.pack_slot(slot, obj)
        if time.monotonic() - self._queued_at > HOLD_LIMIT:
            self._flush()

    def _flush(self) -> None:
        _write_all(bytes(self._queued))
        self._queued.clear()

    def read(self, idle: Callable[[], None] | None = None) -> tuple[int, Any]:
        """The next (slot, frame); `idle` runs first whenever nothing is left to read but the pipe."""
        while True:
            for pair in self._frames:
                return pair
            if self._queued:
                self._flush()
            if idle is not None:
                idle()
            self._reader.feed(_read_chunk())
            self._frames = iter(self._reader)


def _as_tuple(result: Any) -> tuple[Any, ...]:
    return result if isinstance(result, tuple) else (result,)


def _text(v: Any) -> bytes:
    return v if isinstance(v, bytes) else b""


Done = tuple[str, bytes]  # the "done" kind and message to report
Outcome = list[Any] | Done  # a request frame to send, or the end of the script


class ScriptRun:
    """One script in one Lua state: the start message in, then one request out per reply in."""

    def __init__(self, lua: Any, start_fn: Any, start: wire.Start) -> None:
        self.lua = lua
        self.start_fn = start_fn
        self.start = start
        self.step: Any = None
        self.go_fn: Any = None  # mode "prepare": compiled, waiting for the session's seed
        self.dumped = False
        self.usage_fn: Any = None  # the bootstrap's (peak heap, instructions) of this session
        self.cpu_started = time.process_time()

    def begin(self) -> Outcome:
        return self._guarded(self._begin)

    def resume(self, value: Any) -> Outcome:
        if self.dumped:
            return "return", b""
        if value is not None and type(value) not in (bytes, bool, int):
            return "crash", b"unexpected reply type from broker"
        return self._guarded(lambda: self._advance((value,)))

    def _begin(self) -> Outcome:
        start = self.start
        self.lua.set_max_memory(start.memory)
        result = _as_tuple(
            self.start_fn(
                start.source,
                start.chunkname.encode(),
                start.mode.encode(),
                start.seed[0],
                start.seed[1],
                start.instructions,
                start.clock,
                start.measure,
            )
        )
        if result[0] == b"compile":
            return "compile", _text(result[1])
        if result[0] == b"dump":
            self.dumped = True
            return ["dump", result[1]]
        if start.mode == "compile":
            return "return", b""
        if result[0] == b"prepared":
            self.go_fn = result[1]
            return list(wire.PREPARED)
        self.step, self.usage_fn = result[1], result[2]
        return self._advance(())

    def usage_frame(self) -> list[Any] | None:
        """The "usage" request of a measured session (`deadend audit`), once it is over; else None."""
        if not self.start.measure or self.usage_fn is None:
            return None
        try:
            peak, instructions = _as_tuple(self.usage_fn())
        except Exception:  # a state that broke (memory) reports nothing rather than crash the worker
            return None
        cpu_us = round((time.process_time() - self.cpu_started) * 1e6)
        if not (type(peak) is int and type(instructions) is int):
            return None
        return ["usage", max(0, peak), max(0, instructions), max(0, cpu_us)]

    def go(self, frame: Any) -> Outcome:
        """A prepared script's session starts: ["go", seed_hi, seed_lo]."""
        if self.go_fn is None or not wire.is_go(frame):
            return "crash", b"expected the session's go message"
        go_fn, self.go_fn = self.go_fn, None
        return self._guarded(lambda: self._started(go_fn(frame[1], frame[2])))

    def _started(self, result: Any) -> Outcome:
        _ready, self.step, self.usage_fn = _as_tuple(result)
        return self._advance(())

    def _advance(self, reply: tuple[Any, ...]) -> Outcome:
        out = resume(self.step, *reply)
        kind = out[0]
        if kind != b"call":
            message = _text(out[1]) if len(out) > 1 else b""
            return (kind.decode() if isinstance(kind, bytes) else "crash"), message
        op = out[1].decode()
        args = list(out[2 : 2 + wire.ROWS[op].arity])
        if op == "log":
            args[1] = args[1].decode()  # the level is a name; everything else stays bytes
            # The fields: a plain array {k1, v1, k2, v2, ...} the bootstrap built (no metatable), read by
            # raw index into a list.
            fields = args[2]
            args[2] = [fields[i] for i in range(1, len(fields) + 1)]
        return [op, *args]

    @staticmethod
    def _guarded(run: Callable[[], Outcome]) -> Outcome:
        try:
            return run()
        except lupa.LuaMemoryError:
            return "memory", b"not enough memory"
        except Exception as exc:  # a bug here must still end as a report, not a traceback
            return "crash", type(exc).__name__.encode()


def _done_frame(done: Done) -> list[Any]:
    kind, message = done
    return ["done", kind, message[: wire.LOG_MAX + 1]]


def serve(rlimits: Rlimits, parent_pid: int, seccomp_filter: Any) -> NoReturn:
    """The worker's whole life: prepare, lock down, say ready, serve one session, exit."""
    status = 1
    try:
        lua, start_fn = new_runtime()
        lockdown(rlimits, parent_pid, seccomp_filter)
        status = session(Pipe(), lua, start_fn)
    finally:
        os._exit(status)


def session(pipe: Pipe, lua: Any, start_fn: Any) -> int:
    """Say ready, serve one session on `pipe` with a fresh state; the exit status. The zygote's warm-up
    runs this too, on pipes of its own: every line a worker runs has then run once before the fork."""
    pipe.write(wire.READY)
    try:
        run = ScriptRun(lua, start_fn, wire.Start.from_frame(pipe.read()))
        outcome = run.begin()
        if outcome == wire.PREPARED:  # a warm worker for one script: compiled, now wait for a session
            pipe.write(outcome)
            frame = pipe.read()
            if isinstance(frame, list) and frame[:1] == [wire.GO]:
                outcome = run.go(frame)
            else:  # a session of another script: a fresh state (building one needs no syscall)
                lua, start_fn = new_runtime()
                run = ScriptRun(lua, start_fn, wire.Start.from_frame(frame))
                outcome = run.begin()
        while isinstance(outcome, list):
            pipe.write(outcome)
            outcome = run.resume(pipe.read())
        usage = run.usage_frame()
        if usage is not None:  # `deadend audit`: one more request, answered with nil
            pipe.write(usage)
            pipe.read()
    except (EOFError, BrokenPipeError):
        return 0  # the broker ended the session; nothing to report to
    except Exception as exc:  # a malformed start message: still a report, not a traceback
        outcome = "crash", type(exc).__name__.encode()
    pipe.write(_done_frame(outcome))
    return 0


def _script_key(start: wire.Start) -> tuple[Any, ...]:
    return start.source, start.chunkname, start.memory, start.instructions, start.clock


class Ahead:
    """What a dense worker does while it has nothing to read (DensePipe.read's idle hook), so that it is
    not on a session's way to its first byte: the next session's Lua state is built and the script it
    served last compiled in it (a session of that script then needs only its seed, as a prepared warm
    worker's does: about 0.35 ms of a session's start), and the states just started have their garbage
    collected (the bootstrap and the compiler leave ~20 KiB that an idle tarpit session would keep for
    hours). One unit of work per call: a pipe that has more waiting is read again soon."""

    def __init__(self, state: tuple[Any, Any]) -> None:
        self.state: tuple[Any, Any] | None = state  # a fresh state, nothing compiled in it
        self.prepared: ScriptRun | None = None  # a state with `last`'s script compiled, waiting for GO
        self.last: wire.Start | None = None  # the script started last
        self.fresh: list[Any] = []  # Lua states started since the last collection

    def start(self, start: wire.Start) -> tuple[ScriptRun, Outcome]:
        """A session begins: its ScriptRun, and what the script did first."""
        prepared, self.prepared = self.prepared, None
        if prepared is not None and self.last is not None and _script_key(self.last) == _script_key(start):
            self.last = start
            return prepared, prepared.go([wire.GO, *start.seed])
        self.last = start  # a state prepared for another script goes with its last reference
        lua, start_fn = self.state if self.state is not None else new_runtime()
        self.state = None
        run = ScriptRun(lua, start_fn, start)
        self.fresh.append(lua)
        return run, run.begin()

    def idle(self) -> None:
        if self.fresh:
            for lua in self.fresh:
                lua.gccollect()
            self.fresh.clear()
        elif self.prepared is None and self.last is not None:
            lua, start_fn = self.state if self.state is not None else new_runtime()
            self.state = None
            run = ScriptRun(lua, start_fn, dataclasses.replace(self.last, mode="prepare", seed=(0, 0)))
            if run.begin() == wire.PREPARED:  # else (it does not compile, say) the next start says so
                self.prepared = run
                self.fresh.append(lua)
        elif self.state is None and self.prepared is None:
            self.state = new_runtime()


def serve_dense(rlimits: Rlimits, parent_pid: int, seccomp_filter: Any, session_cpu: float) -> NoReturn:
    """Dense mode (--sessions-per-worker): many sessions, each in its own Lua state, over one pipe.

    Every frame in either direction is preceded by its session's slot number. The broker starts a
    session by sending a start message to a free slot, answers each request as in the default mode, and
    may end a session with ABORT in place of a reply. This worker meters each session's CPU time itself
    (RLIMIT_CPU is per process); the broker's watchdog bounds any single step.
    """
    status = 1
    try:
        ahead = Ahead(new_runtime())  # the first state is built before lockdown
        lockdown(rlimits, parent_pid, seccomp_filter)
        _write_all(wire.pack(wire.READY))
        pipe = DensePipe()
        runs: dict[int, ScriptRun] = {}
        spent: dict[int, float] = {}
        while True:
            try:
                slot, value = pipe.read(ahead.idle)
            except EOFError:
                os._exit(0)  # retired, or the broker is gone
            run = runs.get(slot)
            began = time.process_time()
            if run is None:
                try:
                    start = wire.Start.from_frame(value)
                except Exception as exc:
                    pipe.write(slot, _done_frame(("crash", type(exc).__name__.encode())))
                    continue
                run, outcome = ahead.start(start)
                runs[slot], spent[slot] = run, 0.0
            elif value == wire.ABORT:
                outcome = "aborted", b""
            else:
                outcome = run.resume(value)
            spent[slot] += time.process_time() - began
            if isinstance(outcome, list) and spent[slot] > session_cpu:
                outcome = "cpu", b"session CPU time exhausted"
            if not isinstance(outcome, list):
                del runs[slot], spent[slot]  # the state goes with its last reference
                outcome = _done_frame(outcome)
            pipe.write(slot, outcome)
    except BrokenPipeError:
        os._exit(0)
    finally:
        os._exit(status)
