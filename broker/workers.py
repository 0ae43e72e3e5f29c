"""The machinery every pool shares: the zygote, forking a worker until it is ready, the count of workers
alive against --workers, the fair share between ports, and the one queue of connections waiting.

- Zygote supervision. A zygote killed by anyone (the OOM killer, an operator, a crash) is replaced at
  once; one that keeps dying (more than MAX_ZYGOTE_RESTARTS within a minute), or that cannot be started
  again, is fatal: one log line and a non-zero exit, for systemd or any supervisor to restart the broker.
- Fresh layouts. Workers are forked from the zygote and share its address-space layout, so it is replaced
  by a freshly exec'd one after --zygote-forks forks and at least every ZYGOTE_MAX_AGE seconds. The new
  one starts in the background; forks go to the old one until it is ready; the old one is stopped once
  its last worker has exited. No connection waits for it.
- Capacity. `alive` counts every worker forked and not yet reported gone (warm, busy, or being forked),
  never an underestimate: a slot frees only when the zygote reports the worker's exit.
- The queue. Connections that find no room wait in one bounded FIFO with a deadline, whichever pool they
  need; whenever room may have appeared, the first waiter that can now go is woken.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from dataclasses import dataclass, field

from broker import isolation
from broker.capacity import Budget
from broker.channel import WorkerChannel, WorkerGone
from broker.privileges import RunAs
from broker.tasks import Background
from broker.zygote import Spawner, WorkerProcess, Zygote, ZygoteLost
from deadend import wire
from deadend.logs import BROKER, EventLog, sanitize

READY_TIMEOUT = 5.0
MAX_ZYGOTE_RESTARTS = 5  # within ZYGOTE_RESTART_WINDOW seconds, else the broker gives up
ZYGOTE_RESTART_WINDOW = 60.0
ZYGOTE_MAX_AGE = 600.0  # seconds a zygote serves before a fresh one replaces it
RENEW_RETRY = 30.0  # seconds before trying again when a fresh zygote could not be started


class PoolClosed(Exception):
    pass


class QueueFull(Exception):
    pass


@dataclass(eq=False, slots=True)
class Waiter:
    can_go: Callable[[], bool]  # would the waiting acquire succeed now?
    future: asyncio.Future[None] | None = None
    woken: bool = field(default=False)


class WorkerSupply:
    def __init__(
        self,
        log: EventLog,
        spawner: Spawner,
        background: Background,
        *,
        workers: int,
        queue_size: int,
        zygote_forks: int,
        run_as: RunAs | None = None,
    ) -> None:
        self.log = log
        self.spawner = spawner
        self.background = background
        self.workers = workers
        self.queue_size = queue_size
        self.zygote_forks = zygote_forks
        self.run_as = run_as
        self.budget = Budget(workers)
        self.alive = 0
        self.started = 0  # workers that reached "ready"
        self.zygote: Zygote | None = None
        self.retiring: set[Zygote] = set()  # replaced, still holding workers
        self.closed = False
        self.failed: asyncio.Future[str] | None = None  # set once the supply cannot recover
        self.on_change: list[Callable[[], None]] = []  # room may have appeared (pools refill on it)
        self.shedders: list[Callable[[], bool]] = []  # pools that can give back an idle worker
        self._waiters: list[Waiter] = []
        self._restarts: collections.deque[float] = collections.deque()
        self._renewing = False
        self._age_timer: asyncio.TimerHandle | None = None
        self._layers: list[wire.Layer] | None = None  # the isolation the last zygote reported

    # --- the zygote ------------------------------------------------------------------------------

    async def start(self) -> None:
        self.failed = asyncio.get_running_loop().create_future()
        self.zygote = await self._start_zygote()

    async def _start_zygote(self) -> Zygote:
        zygote = Zygote(self.spawner, self.log, lambda w: self._worker_exited(zygote, w), self.run_as)
        await zygote.start()
        isolation.report(self.log, zygote.layers, again=zygote.layers == self._layers)
        self._layers = zygote.layers
        self.background.spawn(self._supervise(zygote), "zygote supervision")
        loop = asyncio.get_running_loop()
        if self._age_timer is not None:
            self._age_timer.cancel()
        self._age_timer = loop.call_later(ZYGOTE_MAX_AGE, self._renew_if_due)
        return zygote

    def _fatal(self, why: str) -> None:
        self.log.error(BROKER, "broker.error", f"{why}; the broker cannot serve and stops")
        if self.failed is not None and not self.failed.done():
            self.failed.set_result(why)

    async def _supervise(self, zygote: Zygote) -> None:
        assert zygote.lost is not None
        await asyncio.shield(zygote.lost)  # cancelling this task must not cancel the zygote's own future
        if self.closed:
            return
        if zygote is not self.zygote:  # a retiring one: its workers were accounted for when it went
            self.retiring.discard(zygote)
            await zygote.stop()
            return
        now = asyncio.get_running_loop().time()
        self._restarts.append(now)
        while self._restarts and now - self._restarts[0] > ZYGOTE_RESTART_WINDOW:
            self._restarts.popleft()
        if len(self._restarts) > MAX_ZYGOTE_RESTARTS:
            self._fatal("the sandbox zygote keeps dying")
            return
        # A warning: the broker recovers (one more line, an error, if it cannot).
        self.log.warn(BROKER, "broker.warning", "sandbox zygote exited; restarting it")
        await zygote.stop()
        try:
            self.zygote = await self._start_zygote()
        except (ZygoteLost, OSError) as e:
            self._fatal(f"no sandbox zygote can be started: {sanitize(str(e))}")
            return
        self._changed()

    def _renew_if_due(self) -> None:
        zygote = self.zygote
        if self._renewing or self.closed or zygote is None:
            return
        age = asyncio.get_running_loop().time() - zygote.started_at
        if zygote.forks >= self.zygote_forks or age >= ZYGOTE_MAX_AGE:
            self._renewing = True
            self.background.spawn(self._renew(), "zygote renewal")

    async def _renew(self) -> None:
        """Replace the zygote by a freshly exec'd one (a fresh address-space layout for new workers)."""
        try:
            fresh = await self._start_zygote()
        except (ZygoteLost, OSError) as e:
            self.log.warn(
                BROKER,
                "broker.warning",
                f"a fresh sandbox zygote could not be started ({sanitize(str(e))}); keeping the current one",
            )
            asyncio.get_running_loop().call_later(RENEW_RETRY, self._renew_if_due)
            return
        finally:
            self._renewing = False
        if self.closed:
            await fresh.stop()
            return
        old, self.zygote = self.zygote, fresh
        if old is not None:
            if old.workers:
                self.retiring.add(old)  # stopped once its last worker exits
            else:
                await old.stop()

    def _worker_exited(self, zygote: Zygote, _worker: WorkerProcess) -> None:
        self.alive -= 1
        if zygote in self.retiring and not zygote.workers:
            self.retiring.discard(zygote)
            self.background.spawn(zygote.stop(), "retired zygote stop")
        self._changed()

    # --- workers ---------------------------------------------------------------------------------

    def room(self) -> bool:
        """Is there room to fork one more worker under --workers?"""
        return self.alive < self.workers

    def make_room(self) -> bool:
        """No room: ask a pool to give back an idle worker (its exit frees a slot). True if one will."""
        return any(shed() for shed in self.shedders)

    async def spawn(self, request: wire.ForkRequest) -> WorkerChannel:
        """Fork one worker (its slot counted here) and wait for its "ready"; raises OSError (out of
        processes or memory), ZygoteLost, or WorkerGone/Deadline/ProtocolViolation (it never got ready)."""
        self.alive += 1
        zygote = self.zygote
        try:
            if zygote is None:
                raise ZygoteLost("zygote is not running")
            worker = await zygote.fork(request)
        except BaseException:
            self.alive -= 1
            self._changed()
            raise
        self._renew_if_due()
        channel = WorkerChannel(worker)
        try:
            frame = await channel.frame(READY_TIMEOUT)
            if frame != wire.READY:
                raise WorkerGone
        except BaseException:
            worker.kill()
            channel.close()
            worker.release()
            raise
        self.started += 1
        return channel

    # --- the queue -------------------------------------------------------------------------------

    @property
    def queued(self) -> int:
        return len(self._waiters)

    def enter(self, can_go: Callable[[], bool]) -> Waiter:
        """Join the queue (raises QueueFull); leave it with `leave` whatever happens."""
        if len(self._waiters) >= self.queue_size:
            raise QueueFull
        waiter = Waiter(can_go)
        self._waiters.append(waiter)
        return waiter

    async def wait(self, waiter: Waiter, deadline: float) -> None:
        """Until woken (room may have appeared) or the deadline (TimeoutError); PoolClosed at shutdown.

        A waiter woken for room it could not take waits again in its place and passes the turn on.
        """
        passed_on = waiter.woken
        waiter.future = asyncio.get_running_loop().create_future()
        waiter.woken = False
        if passed_on:
            self.wake()
        async with asyncio.timeout_at(deadline):
            await waiter.future
        if self.closed:
            raise PoolClosed

    def leave(self, waiter: Waiter | None) -> None:
        if waiter is not None and waiter in self._waiters:
            self._waiters.remove(waiter)
        if waiter is not None and waiter.woken:
            self.wake()  # it was woken for room it did not take: pass it on

    def wake(self) -> None:
        """Wake the first waiter that can go now (in arrival order); it passes the turn on when it leaves."""
        for waiter in self._waiters:
            if waiter.future is not None and not waiter.future.done() and waiter.can_go():
                waiter.woken = True
                waiter.future.set_result(None)
                return

    def _changed(self) -> None:
        for callback in list(self.on_change):
            callback()
        self.wake()

    # --- shutdown --------------------------------------------------------------------------------

    def stop_acquiring(self) -> None:
        """Shutdown, first step: queued and future acquirers get PoolClosed; running sessions go on."""
        self.closed = True
        for waiter in self._waiters:
            if waiter.future is not None and not waiter.future.done():
                waiter.future.set_result(None)

    async def close(self) -> None:
        self.stop_acquiring()
        if self._age_timer is not None:
            self._age_timer.cancel()
        for zygote in [*self.retiring, *([self.zygote] if self.zygote else [])]:
            await zygote.stop()
        self.retiring.clear()
        await self.spawner.close()
