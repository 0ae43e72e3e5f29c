"""The sandbox child: build the Lua environment, lock down, then run one script as a chain of RPCs.

Runs in a process forked by the zygote with fd 0 = pipe from the broker, fd 1 = pipe to the broker,
fd 2 = /dev/null. Everything after `lockdown()` is hostile territory: the script may have found a bug in
Lua. This module therefore keeps no secret and trusts nothing it reads back from Lua beyond its type.
Every path ends in `os._exit`: an interpreter shutdown would make syscalls the filter forbids.
"""

from __future__ import annotations

import os
from importlib import resources
from typing import Any, NoReturn

import lupa.lua54 as lupa

from deadend import wire
from sandbox.lockdown import Rlimits, lockdown

BOOTSTRAP = resources.files("sandbox").joinpath("bootstrap.lua").read_bytes()
# The Lua heap cap until the start message says otherwise; set_max_memory needs one at construction.
INITIAL_MEMORY = 64 << 20


def _deny(*_args: Any) -> NoReturn:
    # Defence in depth: no Python object is ever handed to Lua, but if one were, it has no attributes.
    raise AttributeError("access denied")


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
    constants = wire.lua_constants()
    order = ("RECV_MIN", "RECV_MAX", "SLEEP_MAX", "TARPIT_MAX", "SEND_MAX", "LOG_MAX", "REP_MAX", "MOVE_MAX")
    args = [constants[k] for k in order] + [str(constants["BASE_NAMES"]).encode()]
    start = lua.execute(BOOTSTRAP, *args, name="=bootstrap", mode="t")
    return lua, start


class Pipe:
    """Blocking msgpack framing on fds 0 and 1."""

    def __init__(self) -> None:
        self._unpacker = wire.broker_unpacker()

    def write(self, obj: Any) -> None:
        data = memoryview(wire.pack(obj))
        while data:
            data = data[os.write(1, data) :]

    def read(self) -> Any:
        while True:
            for frame in self._unpacker:
                return frame
            chunk = os.read(0, 1 << 16)
            if not chunk:
                raise EOFError
            self._unpacker.feed(chunk)


def _as_tuple(result: Any) -> tuple[Any, ...]:
    return result if isinstance(result, tuple) else (result,)


def _text(v: Any) -> bytes:
    return v if isinstance(v, bytes) else b""


def run_session(lua: Any, start_fn: Any, pipe: Pipe) -> tuple[str, bytes]:
    """Run the script to its end; return the ("done" kind, message) to report."""
    start = wire.Start.from_frame(pipe.read())
    lua.set_max_memory(start.memory)
    result = _as_tuple(
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
        return "compile", _text(result[1])
    if result[0] == b"dump":
        pipe.write(["dump", result[1]])
        pipe.read()
        return "return", b""
    if start.mode == "compile":
        return "return", b""
    step = result[1]
    reply: tuple[Any, ...] = ()
    while True:
        out = _as_tuple(step(*reply))
        kind = out[0]
        if kind != b"call":
            message = _text(out[1]) if len(out) > 1 else b""
            return (kind.decode() if isinstance(kind, bytes) else "crash"), message
        op = out[1].decode()
        args = list(out[2 : 2 + wire.ARITY[op]])
        if op == "log":
            args[1] = args[1].decode()  # the level is a name; everything else stays bytes
        pipe.write([op, *args])
        value = pipe.read()
        if value is not None and type(value) not in (bytes, bool):
            return "crash", b"unexpected reply type from broker"
        reply = (value,)


def serve(rlimits: Rlimits, parent_pid: int, seccomp_filter: Any) -> NoReturn:
    """The child's whole life: prepare, lock down, say ready, serve one session, exit."""
    status = 1
    try:
        lua, start_fn = new_runtime()
        lockdown(rlimits, parent_pid, seccomp_filter)
        pipe = Pipe()
        pipe.write(["ready"])
        try:
            kind, message = run_session(lua, start_fn, pipe)
        except lupa.LuaMemoryError:
            kind, message = "memory", b"not enough memory"
        except (EOFError, BrokenPipeError):
            os._exit(0)  # the broker ended the session; nothing to report to
        except Exception as exc:  # a bug here must still end as a report, not a traceback
            kind, message = "crash", type(exc).__name__.encode()
        pipe.write(["done", kind, message[: wire.LOG_MAX + 1]])
        status = 0
    finally:
        os._exit(status)
