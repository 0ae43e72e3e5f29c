"""Compile a script inside a locked-down sandbox child: untrusted source never reaches the broker's Lua.

Used at start-up (does each script compile?) and by `deadend check` (also: its bytecode, for analysis).
"""

from __future__ import annotations

from dataclasses import dataclass

from broker.channel import ChildGone, Deadline
from broker.pool import SandboxPool
from deadend import wire
from deadend.config import Ceilings
from deadend.scripts import Script

ACQUIRE_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Compiled:
    error: bytes | None  # the compiler's message, or why the sandbox gave no verdict
    bytecode: bytes | None = None  # the main chunk as string.dump writes it (checks only)


async def compile_in_sandbox(
    pool: SandboxPool, script: Script, ceilings: Ceilings, *, dump: bool
) -> Compiled:
    sandbox = await pool.acquire(ACQUIRE_TIMEOUT, beyond_workers=True)
    bytecode = None
    try:
        start = wire.Start(
            mode="check" if dump else "compile",
            source=script.source,
            chunkname=script.name,
            seed=(0, 0),
            memory=ceilings.memory_bytes,
            instructions=ceilings.instructions,
            clock=False,
        )
        channel = sandbox.channel
        channel.send(start.to_frame())
        req = wire.parse_request(await channel.frame(ceilings.cpu_slice))
        if dump and req.op == "dump":
            bytecode = req.args[0]
            channel.send(None)
            req = wire.parse_request(await channel.frame(ceilings.cpu_slice))
    except (ChildGone, Deadline, wire.ProtocolViolation) as e:
        return Compiled(f"the sandbox failed while compiling ({type(e).__name__})".encode())
    finally:
        pool.release(sandbox)
    if req.op != "done":
        return Compiled(b"the sandbox answered a compile request with a call")
    kind, message = req.args
    if kind == "return":
        return Compiled(None, bytecode)
    if kind == "compile":
        assert isinstance(message, bytes)
        return Compiled(message)
    return Compiled(f"the sandbox could not compile it ({kind})".encode())


async def compile_error(pool: SandboxPool, script: Script, ceilings: Ceilings) -> bytes | None:
    """The compiler's message if `script` does not compile, else None."""
    return (await compile_in_sandbox(pool, script, ceilings, dump=False)).error
