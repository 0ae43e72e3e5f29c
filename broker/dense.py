"""Dense mode (`--sessions-per-worker K`): up to K sessions share one sandbox worker, each in its own Lua
state with its own memory cap, instruction budget and CPU meter, multiplexed over the same pipe.

The trade (SECURITY.md, README): a worker killed for one session — the CPU deadline, a crash, a protocol
violation — takes its other sessions with it; each of them ends with reason `worker-lost`. New sessions
go to the least loaded worker, and a worker is retired after 4 x K sessions. The ports served with the
global --sessions-per-worker share one dense pool; a port with dense settings of its own in the config
file has a pool of its own (its workers serve that port only). All draw on the one WorkerSupply.

The dialect is DENSE in `deadend.wire`: every frame is preceded by its slot number. The one-request-in-
flight rule holds per slot: the broker accepts a frame for a slot only when that slot is owed one.

The CPU deadline is the worker's, not a session's: the worker handles its pipe in order, so whenever the
broker is owed a frame and none arrives for `--cpu-slice` seconds, the worker is stuck in the session
whose message it took first — the oldest one owed. That session ends with `cpu-deadline`, the rest
`worker-lost`.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack

from broker.channel import Deadline, WorkerChannel, WorkerGone, WorkerLost, WorkerPipe
from broker.pool import Lease
from broker.workers import PoolClosed, Waiter, WorkerSupply
from broker.zygote import WorkerProcess
from deadend import wire
from deadend.logs import EventLog
from deadend.reasons import Reason
from deadend.scripts import Script

# Session ends after which the shared worker is killed rather than trusted with more sessions.
KILL_WORKER_REASONS = frozenset({Reason.PROTOCOL, Reason.CRASH, Reason.SECCOMP, Reason.CPU_DEADLINE})


def retire_after(sessions_per_worker: int) -> int:
    """Sessions a dense worker serves in its life: bounds its heap fragmentation and CPU total."""
    return 4 * sessions_per_worker


class Slot:
    """One session's view of a shared worker: the same serve()/send() a WorkerChannel offers."""

    __slots__ = (
        "abort_sent",
        "aborting",
        "channel",
        "done",
        "failure",
        "frames",
        "number",
        "on_failure",
        "on_frame",
        "owed",
        "waiter",
    )

    def __init__(self, channel: DenseChannel, number: int) -> None:
        self.channel = channel
        self.number = number
        self.frames: collections.deque[Any] = collections.deque()
        self.waiter: asyncio.Future[Any] | None = None
        self.failure: BaseException | None = None
        self.owed = False  # the worker owes this slot a frame (a start message or a reply was sent)
        self.done = False  # the worker reported the session's end: its Lua state is gone
        self.aborting = False  # released by the broker before the end: ABORT sent or to be sent
        self.abort_sent = False
        self.on_frame: Callable[[Any], None] | None = None  # the session's, once it serves
        self.on_failure: Callable[[BaseException], None] | None = None

    def serve(
        self,
        on_frame: Callable[[Any], None],
        on_failure: Callable[[BaseException], None],
        cpu_slice: float,
    ) -> None:
        """The session takes its frames by callback; the CPU deadline is the worker's watchdog's."""
        self.on_frame, self.on_failure = on_frame, on_failure
        if self.failure is not None:
            self._report(self.failure)

    async def frame(self, timeout: float | None) -> Any:
        """The next frame for this slot (outside a session). The timeout is the worker's watchdog's."""
        if self.frames:
            return self.frames.popleft()
        if self.failure is not None:
            raise self.failure
        self.waiter = asyncio.get_running_loop().create_future()
        try:
            return await self.waiter
        finally:
            self.waiter = None

    def send(self, obj: Any) -> None:
        self.channel.send_to(self, obj)

    def deliver(self, frame: Any) -> None:
        if self.on_frame is not None:
            self.on_frame(frame)
        elif self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(frame)
        else:
            self.frames.append(frame)

    def fail(self, exc: BaseException) -> None:
        if self.failure is not None:
            return
        self.failure = exc
        if self.on_failure is not None:
            self._report(exc)
        elif self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def _report(self, exc: BaseException) -> None:
        on_failure, self.on_failure = self.on_failure, None
        if on_failure is not None:
            on_failure(exc)


class DenseChannel:
    """The broker's end of a shared worker's pipes: slots, routing, the worker-wide CPU watchdog."""

    def __init__(
        self,
        worker: WorkerProcess,
        pipe: WorkerPipe,
        unpacker: msgpack.Unpacker,
        capacity: int,
        cpu_slice: float,
    ) -> None:
        self.worker = worker
        self.pipe = pipe
        # Each of the K slots may be owed one message while the worker computes: a start message (a script
        # each, all K may start at once) or a reply (a recv's bytes at most). A worker that stops reading is
        # still bounded: past this, it is killed.
        pipe.out_limit = capacity * (wire.MAX_BROKER_FRAME + wire.SLOT_PREFIX_MAX) + wire.MAX_BROKER_FRAME
        pipe.on_write_failed = self._fail
        self.reader = wire.SlotReader(unpacker)
        self.capacity = capacity
        self.cpu_slice = cpu_slice
        self.slots: dict[int, Slot] = {}
        self.free = list(range(capacity - 1, -1, -1))  # slot numbers, popped from the end
        self.on_free: Callable[[DenseChannel], None] | None = None
        self._owed: dict[int, Slot] = {}  # insertion order is the order the worker will answer in
        self._watchdog: asyncio.TimerHandle | None = None
        self._progress = 0.0  # loop time of the worker's last frame, or of its first owed one
        self.lost = False  # the worker is dead or being killed: no slot is reused
        self._flush_pending = False
        self._reading = False  # a batch of frames is being routed: replies wait for its end
        self._loop = asyncio.get_running_loop()
        pipe.start_reading(self._on_readable)

    @property
    def open_slots(self) -> int:
        return len(self.slots)

    def open_slot(self) -> Slot:
        slot = Slot(self, self.free.pop())
        self.slots[slot.number] = slot
        return slot

    # --- reading ---------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        try:
            data = self.pipe.read()
        except WorkerGone as e:
            self.lose(e)
            return
        if not data:
            return
        self._reading = True
        try:
            self.reader.feed(data)
            # A session answered at once (broker/session.py) is owed its next frame again within this
            # batch; but a frame read in the same batch was written before that answer: ahead of it.
            seen: set[int] = set()
            for number, frame in self.reader:
                slot = self.slots.get(number)
                if slot is None:
                    raise wire.ProtocolViolation("a frame for a session the worker does not hold")
                if number in seen:
                    raise wire.ProtocolViolation("a second request before the first was answered")
                seen.add(number)
                self._route(slot, frame)
        except wire.ProtocolViolation as e:
            self._violation(e)
        except Exception as e:  # BufferFull, malformed msgpack, limits exceeded
            self._violation(wire.ProtocolViolation(f"unreadable frame: {type(e).__name__}"))
        finally:
            self._reading = False
        if self._flush_pending and not self.lost:
            # The replies this batch made at once leave now, together, not one loop turn later (that
            # turn was a fifth of a round trip).
            self._flush_now()

    def _route(self, slot: Slot, frame: Any) -> None:
        if not slot.owed:
            raise wire.ProtocolViolation("a second request before the first was answered")
        slot.owed = False
        del self._owed[slot.number]
        self._rearm()
        finished = isinstance(frame, list) and frame[:1] == ["done"]
        if slot.aborting:
            if finished:
                self._finish(slot)
            elif not slot.abort_sent:
                slot.abort_sent = True
                self.send_to(slot, wire.ABORT)
            else:
                raise wire.ProtocolViolation("a request after ABORT")
            return
        if finished:
            slot.done = True
        slot.deliver(frame)

    # --- writing ---------------------------------------------------------------------------------

    def send_to(self, slot: Slot, obj: Any) -> None:
        if slot.failure is not None or slot.owed:
            return
        slot.owed = True
        self._owed[slot.number] = slot
        if len(self._owed) == 1:  # it owed nothing: its slice starts now
            self._progress = self._loop.time()
        if self._watchdog is None:
            self._watchdog = self._loop.call_at(self._progress + self.cpu_slice, self._expire_worker)
        self.pipe.queue(wire.pack_slot(slot.number, obj))
        # Replies made in one turn of the event loop (timers that fired together) leave in one write:
        # one wake-up of the worker instead of one each. Those made while a batch of frames is read go
        # at the batch's end (_on_readable).
        if not self._flush_pending:
            self._flush_pending = True
            if not self._reading:
                self._loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        if self._flush_pending:
            self._flush_pending = False
            self.pipe.flush()

    # --- ending sessions ---------------------------------------------------------------------------

    def release(self, slot: Slot) -> None:
        """The session is over on the broker's side; free the slot now, or once the worker let it go."""
        if slot.done or slot.failure is not None:
            self._finish(slot)
            return
        slot.aborting = True
        if not slot.owed:  # the worker waits for a reply: ABORT is that reply
            slot.abort_sent = True
            self.send_to(slot, wire.ABORT)

    def _finish(self, slot: Slot) -> None:
        if self.slots.pop(slot.number, None) is None:
            return
        if slot.failure is None:
            self.free.append(slot.number)
        if self.on_free is not None:
            self.on_free(self)

    # --- the worker dies, and takes its sessions with it -------------------------------------------

    def _rearm(self) -> None:
        # The worker made progress: it has a slice again for the next owed frame. One timer, moved on
        # lazily (_expire_worker), as WorkerChannel's: a timer cancelled and made per frame was a
        # measurable part of a dense round trip.
        self._progress = self._loop.time()

    def _expire_worker(self) -> None:
        self._watchdog = None
        if not self._owed or self.lost:
            return  # nothing owed: the next send arms it again
        due = self._progress + self.cpu_slice
        if self._loop.time() < due:
            self._watchdog = self._loop.call_at(due, self._expire_worker)
            return
        self.worker.kill()
        self.lose(Deadline(), blame_oldest=True)

    def _fail(self, exc: BaseException) -> None:
        # The pipe's failures: a worker that stopped reading its replies, or a write that failed.
        self.worker.kill()
        self.lose(exc)

    def _violation(self, e: wire.ProtocolViolation) -> None:
        self.worker.kill()
        number = self.reader.pending_slot
        culprit = self.slots.get(number) if number is not None else None
        if culprit is not None:
            culprit.fail(e)
        self.lose(e, blame_oldest=culprit is None)

    def lose(self, cause: BaseException, *, blame_oldest: bool = True) -> None:
        """Fail every slot: the oldest owed one with `cause`, the others with WorkerLost."""
        self.lost = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self.pipe.stop_reading()
        oldest = next(iter(self._owed.values()), None) if blame_oldest else None
        if oldest is not None:
            oldest.fail(cause)
        what = "the CPU deadline" if isinstance(cause, Deadline) else type(cause).__name__
        lost = WorkerLost(
            f"the sandbox it shared (pid {self.worker.pid}) was killed: {what} in another session"
        )
        for slot in list(self.slots.values()):
            slot.fail(lost)
        self.free.clear()
        self._owed.clear()

    def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self.pipe.close()


@dataclass(eq=False, slots=True)
class _Host:
    channel: DenseChannel
    served: int = 0  # sessions started in it


@dataclass
class DensePool:
    """Up to K sessions of one port per worker."""

    supply: WorkerSupply
    log: EventLog
    request: wire.ForkRequest
    name: str  # its tenant in the budget, and its scope for the per-IP cap
    sessions_per_worker: int
    cpu_slice: float
    live: list[_Host] = field(default_factory=list)  # workers taking sessions, or finishing them once retired
    sessions: int = 0
    _spawning: int = 0  # workers being forked for this pool
    _spawned: asyncio.Event = field(
        default_factory=asyncio.Event
    )  # set when one of them is ready (or failed)
    _closed: bool = False

    @property
    def retire_after(self) -> int:
        return retire_after(self.sessions_per_worker)

    @property
    def capacity(self) -> int:
        return self.supply.budget.cap(self.name) * self.sessions_per_worker

    @property
    def busy(self) -> int:
        return self.sessions

    @property
    def warm(self) -> int:
        return 0

    def at_capacity(self, script: Script) -> bool:
        return not self._can_go()

    def _can_go(self) -> bool:
        return self._pick() is not None or (self.supply.budget.may_assign(self.name) and self.supply.room())

    def _pick(self) -> _Host | None:
        """The least loaded worker with a free slot that is not retired."""
        best, load = None, self.sessions_per_worker
        for host in self.live:
            channel = host.channel
            if channel.free and channel.open_slots < load and host.served < self.retire_after:
                best, load = host, channel.open_slots
        return best

    async def acquire(self, script: Script, deadline: float, *, beyond_workers: bool = False) -> Lease:
        """A slot in the least loaded worker; a new worker if none has room; else wait in the queue."""
        waiter: Waiter | None = None
        try:
            while True:
                if self._closed or self.supply.closed:
                    raise PoolClosed
                host = self._pick()
                if host is not None:
                    return self._open(host)
                if self._spawning:
                    # A worker on its way has room for this session too: wait for it rather than fork more.
                    self._spawned.clear()
                    async with asyncio.timeout_at(deadline):
                        await self._spawned.wait()
                    continue
                if self.supply.budget.may_assign(self.name):
                    if self.supply.room():
                        await self._spawn()
                        continue
                    self.supply.make_room()
                if waiter is None:
                    waiter = self.supply.enter(self._can_go)
                await self.supply.wait(waiter, deadline)
        finally:
            self.supply.leave(waiter)

    async def _spawn(self) -> None:
        self.supply.budget.assign(self.name)
        self._spawning += 1
        try:
            plain = await self.supply.spawn(self.request)
        except BaseException:
            self.supply.budget.unassign(self.name)
            raise
        finally:
            self._spawning -= 1
            self._spawned.set()
        self._adopt(plain)

    def _adopt(self, plain: WorkerChannel) -> None:
        """A new worker said "ready" in the plain dialect; from now on it speaks the dense one."""
        pipe, unpacker = plain.detach()
        channel = DenseChannel(plain.worker, pipe, unpacker, self.sessions_per_worker, self.cpu_slice)
        channel.on_free = self._slot_freed_in
        host = _Host(channel)
        self.live.append(host)
        plain.worker.exited.add_done_callback(lambda _: self._worker_exited(host))
        if self._closed:
            self._discard(host)

    def _open(self, host: _Host) -> Lease:
        host.served += 1
        self.sessions += 1
        slot = host.channel.open_slot()
        if host.channel.free:
            self.supply.wake()  # a worker with room for more than this one queued connection
        released = False

        def release(reason: str) -> None:
            nonlocal released
            if released:
                return
            released = True
            self.sessions -= 1
            if reason in KILL_WORKER_REASONS and slot.failure is None:
                # A session that broke the protocol or crashed its state: its worker is not trusted further.
                host.channel.worker.kill()
                cause = wire.ProtocolViolation(reason) if reason == Reason.PROTOCOL else WorkerGone(reason)
                host.channel.lose(cause, blame_oldest=False)
            host.channel.release(slot)

        return Lease(host.channel.worker, slot, wire.Mode.DENSE, release)

    def _slot_freed_in(self, channel: DenseChannel) -> None:
        host = next((h for h in self.live if h.channel is channel), None)
        if host is None:
            return
        if channel.open_slots == 0 and (host.served >= self.retire_after or channel.lost):
            self.live.remove(host)
            self._discard(host)  # its exit report frees the slot in the supply and the port's budget
        else:
            self.supply.wake()

    @staticmethod
    def _discard(host: _Host) -> None:
        host.channel.worker.kill()

    def _worker_exited(self, host: _Host) -> None:
        if host in self.live:
            self.live.remove(host)
        host.channel.lose(WorkerGone())
        host.channel.close()
        host.channel.worker.release()
        self.supply.budget.unassign(self.name)
        self.supply.wake()

    async def close(self) -> None:
        self._closed = True
        for host in list(self.live):
            self._discard(host)
