"""Pools hand sessions their sandboxes. Two siblings implement one protocol (chosen per port by
--sessions-per-worker, broker/sandboxes.py): `ProcessPool` here, one worker per session, and `DensePool`
(broker/dense.py), up to K sessions per worker. Both draw workers from the one WorkerSupply.

The one-per-process pool keeps a few workers pre-forked and locked down, so a connection does not wait
for a fork. Every worker serves one session and is then killed and reaped. Warm workers are prepared for
the scripts connections ask for: a prepared worker has already compiled its script and only waits for the
session's seed, which takes compiling (~0.3-0.8 ms for a 14 KiB script in a fresh worker) off the path to
the first byte. The mix follows demand: each connection asks for a replacement prepared for its script.
A connection takes a worker prepared for its script, else a plain one, else one prepared for another
script (which then builds a fresh Lua state for the start message it gets instead of GO): every warm
worker can serve every script, so preparing never costs capacity.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from broker.channel import Deadline, FrameChannel, WorkerChannel, WorkerGone
from broker.workers import PoolClosed, Waiter, WorkerSupply
from broker.zygote import ZygoteLost
from deadend import wire
from deadend.logs import BROKER, EventLog, sanitize
from deadend.scripts import Script

READY_TIMEOUT = 5.0  # seconds a warm worker may take to compile the script it is prepared for
FORK_BACKOFF = 1.0  # seconds without pre-forking after the zygote could not fork
REFILL_DELAY = 0.003  # seconds

ScriptKey = tuple[int, str]  # a script's port and the sha256 of its bytes: one version of one script


def key_of(script: Script) -> ScriptKey:
    return script.port, script.sha256


class Worker(Protocol):
    """What a session needs of the process behind its sandbox (broker.zygote.WorkerProcess)."""

    @property
    def pid(self) -> int: ...

    exited: asyncio.Future[int | None]  # its wait status once reaped (None: lost with its zygote)

    def kill(self) -> None: ...


@dataclass(eq=False, slots=True)
class Lease:
    """One session's hold on a sandbox, from acquire to release."""

    worker: Worker  # to kill it, and to learn how it exited
    channel: FrameChannel
    mode: wire.Mode  # the request-table mode the session's requests are checked in
    release: Callable[[str], None]  # the session is over, for this reason; called exactly once
    prepared_for: ScriptKey | None = None  # compiled this script already: waits for GO


class Pool(Protocol):
    """What the doorman, the session and the server need of a pool."""

    name: str

    @property
    def capacity(self) -> int:
        """Sessions it can hold at once."""
        ...

    @property
    def busy(self) -> int:
        """Sessions it holds now."""
        ...

    @property
    def warm(self) -> int:
        """Workers ready and idle."""
        ...

    def at_capacity(self, script: Script) -> bool:
        """Would a session of `script` have to queue now?"""
        ...

    async def acquire(self, script: Script, deadline: float, *, beyond_workers: bool = False) -> Lease:
        """A sandbox for one session of `script`; raises QueueFull, TimeoutError, PoolClosed, OSError (no
        worker could be forked) or ZygoteLost. `beyond_workers`: never wait, fork one past --workers if
        need be (compiling a script on reload must not wait for attackers to leave)."""
        ...

    async def close(self) -> None: ...


@dataclass(eq=False, slots=True)
class _Warm:
    channel: WorkerChannel
    prepared_for: ScriptKey | None = None


@dataclass
class ProcessPool:
    """One worker per session."""

    supply: WorkerSupply
    log: EventLog
    request: wire.ForkRequest  # how its workers are forked (address space for the largest --memory)
    warm_target: int
    # Builds the start message a warm worker is prepared with; None: warm workers stay generic.
    preparer: Callable[[Script], wire.Start] | None = None
    name: str = "process"
    _warm: collections.deque[_Warm] = field(default_factory=collections.deque)
    _warming: int = 0
    _busy: int = 0
    _demand: collections.deque[Script] = field(default_factory=collections.deque)
    _refill_pending: bool = False
    _no_prefork_until: float = 0.0
    _closed: bool = False

    def __post_init__(self) -> None:
        self._demand = collections.deque(maxlen=max(1, self.warm_target))
        self.supply.on_change.append(self._refill)
        self.supply.shedders.append(self._shed)

    async def start(self) -> None:
        self._refill()

    @property
    def capacity(self) -> int:
        return self.supply.workers

    @property
    def busy(self) -> int:
        return self._busy

    @property
    def warm(self) -> int:
        return len(self._warm)

    def at_capacity(self, script: Script) -> bool:
        return not self._can_go(script.port)

    def _can_go(self, port: int) -> bool:
        return self.supply.budget.may_assign(port) and bool(self._warm or self.supply.room())

    # --- acquiring -------------------------------------------------------------------------------

    async def acquire(self, script: Script, deadline: float, *, beyond_workers: bool = False) -> Lease:
        if self._closed or self.supply.closed:
            raise PoolClosed
        if beyond_workers:
            return self._lease(await self.supply.spawn(self.request), None)
        if self.preparer is not None:
            self._demand.append(script)  # the next warm worker forked is prepared for it
        port = script.port
        waiter: Waiter | None = None
        try:
            while True:
                if self.supply.budget.may_assign(port):
                    warm = self._take_warm(key_of(script))
                    if warm is not None:
                        self._refill_soon()
                        return self._lease(warm.channel, port, warm.prepared_for)
                    if self.supply.room():
                        self.supply.budget.assign(port)
                        try:
                            channel = await self.supply.spawn(self.request)
                        except BaseException:
                            self.supply.budget.unassign(port)
                            raise
                        self._refill()
                        return self._lease(channel, port, None, assigned=True)
                    self.supply.make_room()
                if waiter is None:
                    waiter = self.supply.enter(lambda: self._can_go(port))
                await self.supply.wait(waiter, deadline)
        finally:
            self.supply.leave(waiter)

    def _lease(
        self,
        channel: WorkerChannel,
        port: int | None,
        prepared_for: ScriptKey | None = None,
        *,
        assigned: bool = False,
    ) -> Lease:
        if port is not None and not assigned:
            self.supply.budget.assign(port)
        self._busy += 1
        released = False

        def release(_reason: str) -> None:
            nonlocal released
            if released:
                return
            released = True
            self._busy -= 1
            if port is not None:
                self.supply.budget.unassign(port)
            self._discard(channel)
            self.supply.wake()  # its port may take another worker now (the slot frees at its exit)

        return Lease(channel.worker, channel, wire.Mode.RUN, release, prepared_for)

    def _take_warm(self, key: ScriptKey) -> _Warm | None:
        """A live warm worker: prepared for `key`, else a plain one, else any."""
        for warm in sorted(self._warm, key=lambda w: (w.prepared_for != key, w.prepared_for is not None)):
            self._warm.remove(warm)
            if not warm.channel.worker.exited.done():
                return warm
            self._discard(warm.channel)
        return None

    # --- releasing -------------------------------------------------------------------------------

    @staticmethod
    def _discard(channel: WorkerChannel) -> None:
        """Kill the worker; its slot frees when the zygote reports it gone."""
        channel.worker.kill()
        channel.close()
        channel.worker.release()

    def _shed(self) -> bool:
        """Another pool needs room: give back one warm worker."""
        if not self._warm:
            return False
        self._discard(self._warm.popleft().channel)
        return True

    # --- warm workers ----------------------------------------------------------------------------

    def _refill_soon(self) -> None:
        # Forking a replacement costs ~2 ms of CPU on a 2-core machine: do it just after the new session's
        # first exchange rather than in competition with it.
        if not self._refill_pending:
            self._refill_pending = True
            asyncio.get_running_loop().call_later(REFILL_DELAY, self._refill_now)

    def _refill_now(self) -> None:
        self._refill_pending = False
        self._refill()

    def _refill(self) -> None:
        if self._closed or self.supply.closed or self.supply.zygote is None:
            return
        if asyncio.get_running_loop().time() < self._no_prefork_until:
            return
        while (
            len(self._warm) + self._warming < self.warm_target
            and self.supply.room()
            and not self.supply.queued
        ):
            self._warming += 1
            self.supply.background.spawn(self._warm_one(), "warm worker")

    async def _prepare(self, channel: WorkerChannel, script: Script) -> None:
        """Have a fresh warm worker compile `script` and wait for its session (raises if it cannot)."""
        assert self.preparer is not None
        channel.send(self.preparer(script).to_frame())
        if await channel.frame(READY_TIMEOUT) != wire.PREPARED:
            raise wire.ProtocolViolation("a warm worker did not prepare its script")

    async def _warm_one(self) -> None:
        script = self._demand.popleft() if self._demand and self.preparer is not None else None
        try:
            channel = await self.supply.spawn(self.request)
            if script is not None:
                try:
                    await self._prepare(channel, script)
                except BaseException:
                    self._discard(channel)
                    raise
        except OSError as e:  # out of processes or memory: stop pre-forking for a while, say so once
            loop = asyncio.get_running_loop()
            if loop.time() >= self._no_prefork_until:
                self.log.warn(
                    BROKER,
                    "broker.warning",
                    f"cannot pre-fork sandboxes: {sanitize(e.strerror or str(e))}; backing off",
                )
            self._no_prefork_until = loop.time() + FORK_BACKOFF
            loop.call_later(FORK_BACKOFF, self._refill)  # try again then, even if nothing else happens
            return
        except (ZygoteLost, WorkerGone, Deadline, wire.ProtocolViolation) as e:
            if not self._closed and not self.supply.closed:
                self.log.warn(BROKER, "broker.warning", f"a sandbox failed to start: {type(e).__name__}")
            return
        finally:
            self._warming -= 1
        if self._closed:
            self._discard(channel)
            return
        self._warm.append(_Warm(channel, None if script is None else key_of(script)))
        self.supply.wake()

    async def close(self) -> None:
        self._closed = True
        while self._warm:
            self._discard(self._warm.popleft().channel)
