"""Compile a script inside a locked-down sandbox child: untrusted source never reaches the broker's Lua."""

from __future__ import annotations

from broker.channel import ChildGone, Deadline
from broker.pool import SandboxPool
from deadend import wire
from deadend.config import Ceilings
from deadend.scripts import Script

ACQUIRE_TIMEOUT = 10.0


async def compile_error(pool: SandboxPool, script: Script, ceilings: Ceilings) -> bytes | None:
    """The compiler's message if `script` does not compile, else None."""
    sandbox = await pool.acquire(ACQUIRE_TIMEOUT)
    try:
        start = wire.Start(
            mode="compile",
            source=script.source,
            chunkname=script.name,
            seed=(0, 0),
            memory=ceilings.memory_bytes,
            instructions=ceilings.instructions,
            clock=False,
        )
        sandbox.channel.send(start.to_frame())
        req = wire.parse_request(await sandbox.channel.frame(ceilings.cpu_slice))
    except (ChildGone, Deadline, wire.ProtocolViolation) as e:
        return f"the sandbox failed while compiling ({type(e).__name__})".encode()
    finally:
        pool.release(sandbox)
    if req.op != "done":
        return b"the sandbox answered a compile request with a call"
    kind, message = req.args
    if kind == "return":
        return None
    if kind == "compile":
        assert isinstance(message, bytes)
        return message
    return f"the sandbox could not compile it ({kind})".encode()
