"""The lean floor of bench/run.py: "Lua behind asyncio" as a newcomer would write it, and nothing more.

    python bench/lean.py --scripts DIR --port-offset N [--host ADDR] [any other flag, ignored]

Benchmark-only, never a mode of the product, and unsafe by design: no sandbox, no process, no limit, no
escaping, no monitor. Each connection gets a fresh `lupa.LuaRuntime` holding the script, loaded with a
`deadend` table whose functions yield to Python (a tiny shim), and an asyncio stream handler carries each
yield out: `send` writes and drains, `recv` reads, `sleep` sleeps, `log` prints a line, `get_ip` answers
the peer, `set_tarpit` delays every later read, `close` closes; `set_limits` is accepted and ignored.
Every call, `get_ip` included, goes from Lua to Python and back, as a host API does. The scripts' `std`
library (sandbox/std.lua, which the examples use) is there as the product has it: compiled once per
process, loaded into a state at its first use.

The distance from deadend to this is what deadend's design costs (its isolation, its monitor, its logs);
the distance from the in-process baseline (bench/inprocess.py) to this is what the product's own code
costs without a sandbox. For bench/run.py it writes `broker.ready` and one `session.end` per connection
as JSON lines, the two events the harness counts.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lupa.lua54 as lupa

from deadend.wire import packed_unsafe_ranges

SCRIPT_NAME = re.compile(r"[1-9][0-9]{0,4}\.lua")

# std.lua, compiled once per process (as the product's zygote does): a binary chunk a state loads.
STD_SOURCE = (Path(__file__).resolve().parent.parent / "sandbox" / "std.lua").read_bytes()

# The shim: the script in a private environment over the standard library, every API call a yield.
SHIM = b"""
local source, chunkname, std_chunk, unsafe = ...
local yield = coroutine.yield
local deadend = {
  send = function(data) return yield("send", data) end,
  recv = function(n) return yield("recv", n) end,
  sleep = function(ms) return yield("sleep", ms) end,
  log = function(message, level) return yield("log", message, level) end,
  get_ip = function() return yield("get_ip", nil) end,
  set_tarpit = function(base, jitter) return yield("set_tarpit", base, jitter or 0) end,
  set_limits = function() end,
  close = function() return yield("close", nil) end,
}
local std = setmetatable({}, { __index = function(t, name)
  local lib = load(std_chunk, "=std", "b", setmetatable({ UNSAFE = unsafe }, { __index = _G }))()(deadend)
  for k, v in pairs(lib) do rawset(t, k, v) end
  setmetatable(t, nil)
  return rawget(t, name)
end })
local env = setmetatable({ deadend = deadend, std = std }, { __index = _G })
return assert(load(source, "=" .. chunkname, "t", env))
"""


@dataclass(frozen=True, slots=True)
class Script:
    name: str
    source: bytes


class Lean:
    def __init__(self) -> None:
        # One buffered writer, flushed at each session end (the harness waits for those lines).
        self.out = open(sys.stdout.fileno(), "w", buffering=1 << 16, closefd=False)  # noqa: SIM115
        self.tasks: set[asyncio.Task[None]] = set()
        lua = lupa.LuaRuntime(encoding=None)
        self.std = bytes(lua.execute(b"return string.dump(assert(load(..., '=std', 't')), true)", STD_SOURCE))
        self.unsafe = packed_unsafe_ranges()

    def event(self, **fields: Any) -> None:
        self.out.write(json.dumps(fields) + "\n")
        self.out.flush()

    async def session(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, script: Script
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        peer = writer.get_extra_info("peername")[0].encode()
        lua = lupa.LuaRuntime(encoding=None)
        reason, base, jitter = "done", 0, 0
        reply: bytes | bool | None = None
        try:
            co = lua.execute(SHIM, script.source, script.name.encode(), self.std, self.unsafe).coroutine()
            while True:
                call = co.send(reply)
                if not isinstance(call, tuple):
                    break  # the script returned
                op, arg = call[0], call[1]
                reply = None
                if op == b"send":
                    writer.write(arg)
                    try:
                        await writer.drain()
                        reply = True
                    except OSError:
                        reply = False
                elif op == b"recv":
                    try:
                        reply = await reader.read(arg) or None
                    except OSError:
                        reply = None
                    if reply and (base or jitter):
                        await asyncio.sleep((base + random.randint(0, jitter)) / 1000)
                elif op == b"sleep":
                    await asyncio.sleep(arg / 1000)
                elif op == b"log":
                    level = call[2].decode() if len(call) > 2 and call[2] else "info"
                    self.out.write(f"{level} {script.name} {arg.decode(errors='replace')}\n")
                elif op == b"get_ip":
                    reply = peer
                elif op == b"set_tarpit":
                    base, jitter = arg, call[2]
                elif op == b"close":
                    writer.close()
        except StopIteration:
            pass
        except lupa.LuaError:
            reason = "script-error"
        except asyncio.CancelledError:
            reason = "shutdown"
        finally:
            writer.close()
            self.event(event="session.end", reason=reason)
            self.tasks.discard(task)

    async def serve(self, scripts: list[Script], hosts: list[str], offset: int) -> None:
        servers = []
        for script in scripts:
            port = int(script.name[:-4]) + offset

            async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter, s: Script = script) -> None:
                await self.session(r, w, s)

            servers.append(await asyncio.start_server(handle, hosts or None, port, backlog=1024))
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        self.event(event="broker.ready", scripts=len(scripts))
        await stop.wait()
        for server in servers:
            server.close()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scripts", type=Path, required=True)
    parser.add_argument("--host", action="append", default=[])
    parser.add_argument("--port-offset", type=int, default=0)
    args, _ignored = parser.parse_known_args(argv)  # the broker's other flags: nothing to limit here
    scripts = [
        Script(path.name, path.read_bytes())
        for path in sorted(args.scripts.iterdir())
        if SCRIPT_NAME.fullmatch(path.name)
    ]
    asyncio.run(Lean().serve(scripts, args.host, args.port_offset))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
