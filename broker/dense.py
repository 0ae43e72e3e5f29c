"""Dense mode (`--sessions-per-worker K`): up to K sessions share one sandbox child, each in its own Lua
state with its own memory cap, instruction budget and CPU meter, multiplexed over the same pipe.

The trade (SECURITY.md, README): a child killed for one session — the CPU deadline, a crash, a protocol
violation — takes its other sessions with it; each of them ends with reason `worker-lost`. New sessions
go to the least loaded child, and a child is retired after 4 x K sessions.

Wire: every frame in either direction is preceded by its slot number (a msgpack integer). The broker
starts a session by sending a start message to a free slot, and may end one with ABORT in place of a
reply (the child answers ABORTED). The one-request-in-flight rule holds per slot.

The CPU deadline is the child's, not a session's: the child handles its pipe in order, so whenever the
broker is owed a frame and none arrives for `--cpu-slice` seconds, the child is stuck in the session whose
message it took first — the oldest one owed. That session ends with `cpu-deadline`, the rest `worker-lost`.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any

from broker import monitor as m
from broker.channel import ChildChannel, ChildGone, Deadline, WorkerLost
from broker.pool import PoolClosed, Sandbox, SandboxPool
from broker.privileges import RunAs
from broker.zygote import ChildProcess, retire_after
from deadend import wire
from deadend.config import Ceilings
from deadend.logs import EventLog
from deadend.scripts import Script

# Session ends after which the shared child is killed rather than trusted with more sessions.
KILL_CHILD_REASONS = frozenset({m.END_PROTOCOL, m.END_CRASH, m.END_SECCOMP, m.END_CPU_DEADLINE})


class Slot:
    """One session's view of a shared child: the same frame()/send() a ChildChannel offers."""

    def __init__(self, channel: DenseChannel, number: int) -> None:
        self.channel = channel
        self.number = number
        self.frames: collections.deque[Any] = collections.deque()
        self.waiter: asyncio.Future[Any] | None = None
        self.failure: BaseException | None = None
        self.owed = False  # the child owes this slot a frame (a start message or a reply was sent)
        self.done = False  # the child reported the session's end: its Lua state is gone
        self.aborting = False  # released by the broker before the end: ABORT sent or to be sent
        self.abort_sent = False
        self.on_lost: Callable[[BaseException], None] | None = None  # wakes a session busy elsewhere

    async def frame(self, timeout: float | None) -> Any:
        """The next frame for this session. The timeout is the child's watchdog's, not this call's."""
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

    def close(self) -> None:
        pass  # the pool decides what happens to the slot and the child

    def deliver(self, frame: Any) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(frame)
        else:
            self.frames.append(frame)

    def fail(self, exc: BaseException) -> None:
        if self.failure is not None:
            return
        self.failure = exc
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)
        elif self.on_lost is not None:
            self.on_lost(exc)


class DenseChannel(ChildChannel):
    """The broker's end of a shared child's pipes: slots, routing, the child-wide CPU watchdog."""

    def __init__(self, child: ChildProcess, capacity: int, cpu_slice: float) -> None:
        super().__init__(child)
        # K sessions may each be owed a message while the child computes: replies (a recv's bytes at most)
        # and start messages (a script each) queue up; a child that stops reading is still bounded.
        self.out_limit = 2 * wire.MAX_BROKER_FRAME + capacity * (wire.RECV_MAX + 4096)
        self.capacity = capacity
        self.cpu_slice = cpu_slice
        self.ready = False  # until the child's "ready", the plain channel reads it
        self.slots: dict[int, Slot] = {}
        self.free = list(range(capacity - 1, -1, -1))  # slot numbers, popped from the end
        self.on_free: Callable[[DenseChannel], None] | None = None
        self._owed: dict[int, Slot] = {}  # insertion order is the order the child will answer in
        self._slot_no: int | None = None  # a slot number read, its frame not yet
        self._watchdog: asyncio.TimerHandle | None = None
        self.lost = False  # the child is dead or being killed: no slot is reused
        self._flush_pending = False

    @property
    def open_slots(self) -> int:
        return len(self.slots)

    def open_slot(self) -> Slot:
        slot = Slot(self, self.free.pop())
        self.slots[slot.number] = slot
        return slot

    # --- reading ---------------------------------------------------------------------------------

    def _on_readable(self) -> None:
        if not self.ready:
            super()._on_readable()
            return
        try:
            data = self._read()
        except ChildGone as e:
            self._lose_all(e)
            return
        if not data:
            return
        try:
            self._unpacker.feed(data)
            for obj in self._unpacker:
                if self._slot_no is None:
                    if type(obj) is not int or obj not in self.slots:
                        raise wire.ProtocolViolation("a frame for a session the child does not hold")
                    self._slot_no = obj
                    continue
                self._route(self.slots[self._slot_no], obj)
                self._slot_no = None  # only now: a violation in _route names this slot as the culprit
        except wire.ProtocolViolation as e:
            self._violation(e)
        except Exception as e:  # BufferFull, malformed msgpack, limits exceeded
            self._violation(wire.ProtocolViolation(f"unreadable frame: {type(e).__name__}"))

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
        if self._watchdog is None:
            self._watchdog = self._loop.call_later(self.cpu_slice, self._expire_child)
        self._out += wire.pack(slot.number)
        self.send(obj)

    def _flush(self) -> None:
        # Replies made in one turn of the event loop (timers that fired together) leave in one write:
        # one wake-up of the child instead of one each.
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self._flush_now)

    def _flush_now(self) -> None:
        self._flush_pending = False
        if self.child.to_child >= 0:  # not closed meanwhile
            super()._flush()

    # --- ending sessions ---------------------------------------------------------------------------

    def release(self, slot: Slot) -> None:
        """The session is over on the broker's side; free the slot now, or once the child let it go."""
        if slot.done or slot.failure is not None:
            self._finish(slot)
            return
        slot.aborting = True
        if not slot.owed:  # the child waits for a reply: ABORT is that reply
            slot.abort_sent = True
            self.send_to(slot, wire.ABORT)

    def _finish(self, slot: Slot) -> None:
        if self.slots.pop(slot.number, None) is None:
            return
        if slot.failure is None:
            self.free.append(slot.number)
        if self.on_free is not None:
            self.on_free(self)

    # --- the child dies, and takes its sessions with it --------------------------------------------

    def _rearm(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if self._owed:  # the child made progress: it has a slice again for the next owed frame
            self._watchdog = self._loop.call_later(self.cpu_slice, self._expire_child)

    def _expire_child(self) -> None:
        self._watchdog = None
        self.child.kill()
        self._lose_all(Deadline(), blame_oldest=True)

    def _fail(self, exc: BaseException) -> None:
        # The plain channel's failures once slots are in use (a child that stopped reading its replies).
        if not self.ready:
            super()._fail(exc)
            return
        self.child.kill()
        self._lose_all(exc)

    def _violation(self, e: wire.ProtocolViolation) -> None:
        self.child.kill()
        culprit = self.slots.get(self._slot_no) if self._slot_no is not None else None
        if culprit is not None:
            culprit.fail(e)
        self._lose_all(e, blame_oldest=culprit is None)

    def _lose_all(self, cause: BaseException, *, blame_oldest: bool = True) -> None:
        """Fail every slot: the oldest owed one with `cause`, the others with WorkerLost."""
        self.lost = True
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        self._stop_reading()
        oldest = next(iter(self._owed.values()), None) if blame_oldest else None
        if oldest is not None:
            oldest.fail(cause)
        what = "the CPU deadline" if isinstance(cause, Deadline) else type(cause).__name__
        lost = WorkerLost(
            f"the sandbox it shared (pid {self.child.pid}) was killed: {what} in another session"
        )
        for slot in list(self.slots.values()):
            slot.fail(lost)
        self.free.clear()
        self._owed.clear()

    def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        super().close()


class DensePool(SandboxPool):
    """SandboxPool's children, zygote supervision and queue, with K sessions per child."""

    def __init__(
        self,
        ceilings: Ceilings,
        log: EventLog,
        workers: int,
        warm: int,
        queue_size: int,
        run_as: RunAs | None,
        sessions_per_child: int,
    ) -> None:
        super().__init__(ceilings, log, workers, min(warm, 1), queue_size, run_as, sessions_per_child)
        self.capacity = sessions_per_child
        self.retire_after = retire_after(sessions_per_child)
        self.live: list[Sandbox] = []  # children taking sessions, or finishing them once retired
        self._served: dict[int, int] = {}  # sessions started, by child pid
        self.sessions = 0

    def _channel_for(self, child: ChildProcess) -> ChildChannel:
        channel = DenseChannel(child, self.capacity, self.ceilings.cpu_slice)
        channel.on_free = self._slot_freed_in
        return channel

    def _became_ready(self, channel: ChildChannel) -> None:
        assert isinstance(channel, DenseChannel)
        channel.ready = True

    @property
    def busy(self) -> int:
        return self.sessions

    def at_capacity(self) -> bool:
        return self._pick() is None and not self._warm and self.alive >= self.workers

    def _pick(self) -> Sandbox | None:
        """The least loaded child with a free slot that is not retired."""
        best, load = None, self.capacity
        for sandbox in self.live:
            channel = sandbox.channel
            assert isinstance(channel, DenseChannel)
            if (
                channel.free
                and channel.open_slots < load
                and self._served[sandbox.child.pid] < self.retire_after
            ):
                best, load = sandbox, channel.open_slots
        return best

    async def acquire(
        self, timeout: float, *, beyond_workers: bool = False, script: Script | None = None
    ) -> Sandbox:
        """A slot in the least loaded child; a new child if none has room; else wait in the queue.

        Dense children are not prepared for one script (`script` is not used): each serves many.
        """
        if self._closed:
            raise PoolClosed
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            host = self._pick()
            if host is None and (self._warm or self.alive < self.workers or beyond_workers):
                past_the_cap = not self._warm and self.alive >= self.workers
                sandbox = await super().acquire(timeout, beyond_workers=beyond_workers)  # does not wait
                self.live.append(sandbox)
                # A child forked past --workers (a compile on reload) serves that one session, then retires.
                self._served[sandbox.child.pid] = self.retire_after - 1 if past_the_cap else 0
                continue
            if host is None:
                await self._wait_for_room(deadline)
                continue
            channel = host.channel
            assert isinstance(channel, DenseChannel)
            self._served[host.child.pid] += 1
            self.sessions += 1
            slot = channel.open_slot()
            if channel.free:
                self._wake_one()  # a new child has room for more than this one queued connection
            return Sandbox(host.child, slot)

    async def close(self) -> None:
        self.stop_acquiring()
        while self.live:
            self._discard(self.live.pop())
        await super().close()

    def release(self, sandbox: Sandbox, reason: str = m.END_RETURNED) -> None:
        slot = sandbox.channel
        if not isinstance(slot, Slot):  # a whole child (a warm one discarded at shutdown)
            super().release(sandbox)
            return
        self.sessions -= 1
        if reason in KILL_CHILD_REASONS and slot.failure is None:
            # A session that broke the protocol or crashed its state: its child is not trusted further.
            slot.channel.child.kill()
            cause = wire.ProtocolViolation(reason) if reason == m.END_PROTOCOL else ChildGone(reason)
            slot.channel._lose_all(cause, blame_oldest=False)
        slot.channel.release(slot)

    def _slot_freed_in(self, channel: DenseChannel) -> None:
        pid = channel.child.pid
        host = next((s for s in self.live if s.channel is channel), None)
        if host is None:
            return
        retired = self._served.get(pid, 0) >= self.retire_after
        if channel.open_slots == 0 and (retired or channel.lost):
            self.live.remove(host)
            self._served.pop(pid, None)
            self._discard(host)  # its exit report frees the pool's count of children
        else:
            self._wake_one()

    def _on_child_exit(self, child: ChildProcess) -> None:
        for host in list(self.live):
            if host.child is child:
                self.live.remove(host)
                self._served.pop(child.pid, None)
                channel = host.channel
                assert isinstance(channel, DenseChannel)
                channel._lose_all(ChildGone())
                channel.close()
                child.release()
        super()._on_child_exit(child)
