"""Compile a script inside a locked-down sandbox child: untrusted source never reaches the broker's Lua.

Used at start-up (does each script compile?) and by `deadend check` (also: its bytecode, for analysis).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from broker.channel import Deadline, WorkerGone
from broker.pool import Pool
from deadend import wire
from deadend.config import Ceilings
from deadend.scripts import Script

ACQUIRE_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Compiled:
    error: bytes | None  # the compiler's message, or why the sandbox gave no verdict
    bytecode: bytes | None = None  # the main chunk as string.dump writes it (checks only)


async def compile_in_sandbox(pool: Pool, script: Script, ceilings: Ceilings, *, dump: bool) -> Compiled:
    deadline = asyncio.get_running_loop().time() + ACQUIRE_TIMEOUT
    lease = await pool.acquire(script, deadline, beyond_workers=True)
    mode = wire.Mode.CHECK if dump else wire.Mode.COMPILE
    bytecode = None
    try:
        start = wire.Start(
            mode=mode.value,
            source=script.source,
            chunkname=script.name,
            seed=(0, 0),
            memory=ceilings.memory_bytes,
            instructions=ceilings.instructions,
            clock=False,
        )
        channel = lease.channel
        channel.send(start.to_frame())
        req = wire.parse_request(await channel.frame(ceilings.cpu_slice), mode)
        if req.op == "dump":
            bytecode = req.args[0]
            channel.send(None)
            req = wire.parse_request(await channel.frame(ceilings.cpu_slice), mode)
    except (WorkerGone, Deadline, wire.ProtocolViolation) as e:
        return Compiled(f"the sandbox failed while compiling ({type(e).__name__})".encode())
    finally:
        lease.release("done")
    if req.op != "done":
        return Compiled(b"the sandbox answered a compile request with a call")
    kind, message = req.args
    if kind == "return":
        return Compiled(None, bytecode)
    if kind == "compile":
        assert isinstance(message, bytes)
        return Compiled(message)
    return Compiled(f"the sandbox could not compile it ({kind})".encode())


async def compile_error(pool: Pool, script: Script, ceilings: Ceilings) -> bytes | None:
    """The compiler's message if `script` does not compile, else None."""
    return (await compile_in_sandbox(pool, script, ceilings, dump=False)).error
