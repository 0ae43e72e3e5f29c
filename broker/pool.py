"""The sandbox pool: at most `workers` children alive, a few kept pre-forked and locked down.

A connection takes a warm child (no fork on the path to its first byte), or forks one if there is room,
or waits in a bounded queue for a short time. Every child serves one session and is then killed and
reaped; its slot is freed only when the zygote reports it gone, so `alive` is never an underestimate.

Warm children are prepared for the scripts connections ask for: a prepared child has already compiled
its script and only waits for the session's seed, which takes compiling (~0.3-0.8 ms for a 14 KiB
script in a fresh child) off the path to the first byte. The mix follows demand: each connection asks
for a replacement prepared for its script. A connection takes a child prepared for its script, else a
plain one, else one prepared for another script (which then builds a fresh Lua state for the start
message it gets instead of GO): every warm child can serve every script, so preparing never costs
capacity.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable

from broker import monitor as m
from broker.channel import ChildChannel, ChildGone, Deadline, FrameChannel
from broker.privileges import RunAs
from broker.zygote import ChildProcess, Zygote, ZygoteLost
from deadend import wire
from deadend.config import Ceilings
from deadend.logs import BROKER, EventLog, sanitize
from deadend.scripts import Script
from deadend.wire import ProtocolViolation

READY_TIMEOUT = 5.0
FORK_BACKOFF = 1.0  # seconds without pre-forking after the zygote could not fork
REFILL_DELAY = 0.003  # seconds
MAX_ZYGOTE_RESTARTS = 5  # within ZYGOTE_RESTART_WINDOW seconds, else the pool gives up
ZYGOTE_RESTART_WINDOW = 60.0


class PoolClosed(Exception):
    pass


class Sandbox:
    """A ready, locked-down child and its channel, handed to exactly one session."""

    def __init__(self, child: ChildProcess, channel: FrameChannel) -> None:
        self.child = child
        self.channel = channel
        self.prepared_for: ScriptKey | None = None  # compiled this script; waits for GO


class QueueFull(Exception):
    pass


ScriptKey = tuple[int, str]  # a script's port and the sha256 of its bytes: one version of one script


def key_of(script: Script) -> ScriptKey:
    return script.port, script.sha256


class SandboxPool:
    def __init__(
        self,
        ceilings: Ceilings,
        log: EventLog,
        workers: int,
        warm: int,
        queue_size: int,
        run_as: RunAs | None = None,
        sessions_per_child: int = 1,
    ) -> None:
        self.ceilings = ceilings
        self.log = log
        self.workers = workers
        self.warm_target = min(warm, workers)
        self.queue_size = queue_size
        self.alive = 0  # forked (or being forked) and not yet reported gone
        self._warm: collections.deque[Sandbox] = collections.deque()
        self._warming = 0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._restarts: collections.deque[float] = collections.deque()
        self._refill_pending = False
        self._no_prefork_until = 0.0
        self.started = 0  # children that reached "ready"
        # Builds the start message a warm child is prepared with; None: warm children stay generic.
        self.preparer: Callable[[Script], wire.Start] | None = None
        self._demand: collections.deque[Script] = collections.deque(maxlen=max(1, self.warm_target))
        self.zygote = Zygote(ceilings, log, self._on_child_exit, run_as, sessions_per_child)
        self.failed: asyncio.Future[str] | None = None

    async def start(self) -> None:
        self.failed = asyncio.get_running_loop().create_future()
        await self.zygote.start()
        self._watch_zygote()
        self._refill()

    @property
    def queued(self) -> int:
        return len(self._waiters)

    @property
    def warm(self) -> int:
        return len(self._warm)

    @property
    def busy(self) -> int:
        """Children given to a connection (or being forked for one)."""
        return self.alive - len(self._warm) - self._warming

    def at_capacity(self) -> bool:
        """True when the next acquire would have to wait in the queue."""
        return not self._warm and self.alive >= self.workers

    # --- acquiring -------------------------------------------------------------------------------

    async def acquire(
        self, timeout: float, *, beyond_workers: bool = False, script: Script | None = None
    ) -> Sandbox:
        """A ready sandbox; raises QueueFull, TimeoutError (waited too long) or PoolClosed.

        `script`: the session's; a child prepared for it is taken first (its `prepared_for` is set).
        `beyond_workers`: never wait, fork one past --workers if need be (compiling a script on reload
        must not wait for attackers to leave; compiles run one at a time and last milliseconds).
        """
        if self._closed:
            raise PoolClosed
        if script is not None and self.preparer is not None:
            self._want(script)
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            sandbox = self._take_warm(None if script is None else key_of(script))
            if sandbox is not None:
                self._refill_soon()
                return sandbox
            if self.alive < self.workers or beyond_workers:
                self.alive += 1
                sandbox = await self._spawn()
                self._refill()
                return sandbox
            await self._wait_for_room(deadline)

    async def _wait_for_room(self, deadline: float) -> None:
        """Queue until a child or a slot may be free (woken by `_wake_one`), at most until `deadline`."""
        if len(self._waiters) >= self.queue_size:
            raise QueueFull
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            async with asyncio.timeout_at(deadline):
                await waiter
        finally:
            if waiter in self._waiters:
                self._waiters.remove(waiter)
        if self._closed:
            raise PoolClosed

    def _take_warm(self, key: ScriptKey | None) -> Sandbox | None:
        """A live warm child: prepared for `key`, else a plain one, else any (None: plain ones only)."""
        if key is None:
            choices = [s for s in self._warm if s.prepared_for is None]
        else:
            choices = sorted(self._warm, key=lambda s: (s.prepared_for != key, s.prepared_for is not None))
        for sandbox in choices:
            self._warm.remove(sandbox)
            if not sandbox.child.exited.done():
                return sandbox
            self._discard(sandbox)
        return None

    def _want(self, script: Script) -> None:
        """A connection for `script`: the next warm child forked is prepared for it."""
        self._demand.append(script)

    async def _spawn(self) -> Sandbox:
        """Fork one child (its slot already counted) and wait for its "ready"."""
        try:
            child = await self.zygote.fork()
        except BaseException:
            self._slot_freed()
            raise
        channel = self._channel_for(child)
        try:
            frame = await channel.frame(READY_TIMEOUT)
            if frame != ["ready"]:
                raise ChildGone
            self._became_ready(channel)
        except BaseException:
            child.kill()
            channel.close()
            child.release()
            raise
        self.started += 1
        return Sandbox(child, channel)

    def _channel_for(self, child: ChildProcess) -> ChildChannel:
        return ChildChannel(child)

    def _became_ready(self, channel: ChildChannel) -> None:
        pass  # dense mode switches the channel to slots here

    # --- releasing -------------------------------------------------------------------------------

    def release(self, sandbox: Sandbox, reason: str = m.END_RETURNED) -> None:
        """The session is over (for `reason`): kill the child. Its slot frees when the zygote reports it."""
        self._discard(sandbox)

    def _discard(self, sandbox: Sandbox) -> None:
        sandbox.child.kill()
        sandbox.channel.close()
        sandbox.child.release()

    def _on_child_exit(self, _child: ChildProcess) -> None:
        self._slot_freed()

    def _slot_freed(self) -> None:
        self.alive -= 1
        if not self._wake_one():
            self._refill()

    def _wake_one(self) -> bool:
        """Let the first queued acquirer retry (a slot freed or a warm child is ready)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return True
        return False

    # --- warm children ---------------------------------------------------------------------------

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
        if self._closed or self.zygote.lost is None or self.zygote.lost.done():
            return
        if asyncio.get_running_loop().time() < self._no_prefork_until:
            return
        while (
            len(self._warm) + self._warming < self.warm_target
            and self.alive < self.workers
            and not self._waiters
        ):
            self.alive += 1
            self._warming += 1
            self._track(self._warm_one())

    async def _prepare(self, sandbox: Sandbox, script: Script) -> None:
        """Have a fresh warm child compile `script` and wait for its session (raises if it cannot)."""
        assert self.preparer is not None
        sandbox.channel.send(self.preparer(script).to_frame())
        if await sandbox.channel.frame(READY_TIMEOUT) != wire.PREPARED:
            raise ProtocolViolation("a warm child did not prepare its script")
        sandbox.prepared_for = key_of(script)

    async def _warm_one(self) -> None:
        script = self._demand.popleft() if self._demand and self.preparer is not None else None
        try:
            sandbox = await self._spawn()
            if script is not None:
                try:
                    await self._prepare(sandbox, script)
                except BaseException:
                    self._discard(sandbox)
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
        except (ZygoteLost, ChildGone, Deadline, ProtocolViolation) as e:
            if not self._closed:
                self.log.warn(BROKER, "broker.warning", f"a sandbox failed to start: {type(e).__name__}")
            return
        finally:
            self._warming -= 1
        if self._closed:
            self._discard(sandbox)
        else:
            self._warm.append(sandbox)
            self._wake_one()

    def _track(self, coro: collections.abc.Coroutine[None, None, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- zygote supervision ----------------------------------------------------------------------

    def _watch_zygote(self) -> None:
        self._track(self._supervise())

    async def _supervise(self) -> None:
        assert self.zygote.lost is not None
        await self.zygote.lost
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._restarts.append(now)
        while self._restarts and now - self._restarts[0] > ZYGOTE_RESTART_WINDOW:
            self._restarts.popleft()
        if len(self._restarts) > MAX_ZYGOTE_RESTARTS:
            self.log.error(BROKER, "broker.error", "sandbox zygote keeps dying; giving up")
            if self.failed is not None and not self.failed.done():
                self.failed.set_result("sandbox zygote keeps dying")
            return
        self.log.error(BROKER, "broker.error", "sandbox zygote exited; restarting it")
        while self._warm:  # their children died with the zygote (slots already freed): close their fds
            self._discard(self._warm.popleft())
        await self.zygote.stop()
        try:
            await self.zygote.start()
        except ZygoteLost as e:
            self.log.error(BROKER, "broker.error", sanitize(str(e)))
            if self.failed is not None and not self.failed.done():
                self.failed.set_result(str(e))
            return
        self._watch_zygote()
        self._refill()

    def stop_acquiring(self) -> None:
        """Shutdown, first step: queued and future acquirers get PoolClosed; running sessions go on."""
        self._closed = True
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def close(self) -> None:
        self.stop_acquiring()
        while self._warm:
            self._discard(self._warm.popleft())
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.zygote.stop()
