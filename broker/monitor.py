"""The monitor: one session's state, answering the request table of `deadend.wire`.

Pure logic in the manner of h11: no sockets, no processes, no clock of its own (the caller passes `now`).
It turns each validated request into one action for the I/O layer (`broker.session`) and is told the
outcomes, and what happens to the connection meanwhile (the peer left, a recv waited too long). Recv
limits, the tarpit delay, close, the log rate, the API call rate, the linger ceiling and what TLS allows
(one handshake, tls_info only once it completed) are decided here.
Every request of the table permitted in a session has exactly one handler (`_on_<name>`); the table, not
an if-chain, says which requests exist and where they are permitted.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from broker.ratelimit import TokenBucket
from deadend import wire
from deadend.config import Ceilings
from deadend.reasons import OF_DONE_KIND, ClosedBy, Reason
from deadend.tlsinfo import TlsInfo


class Rng(Protocol):
    def randint(self, a: int, b: int) -> int: ...


class Jitter:
    """The tarpit's jitter for one session: splitmix64 from the session's seed, so that a replayed session
    is paced as it was. One integer of state, where a `random.Random` holds 2.5 KiB (times the 10,000
    sessions a dense broker holds); it is timing noise, not a secret."""

    __slots__ = ("_state",)
    _MASK = (1 << 64) - 1

    def __init__(self, seed: int) -> None:
        self._state = seed & self._MASK

    def randint(self, a: int, b: int) -> int:
        mask = self._MASK
        self._state = z = (self._state + 0x9E3779B97F4A7C15) & mask
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return a + (z ^ (z >> 31)) % (b - a + 1)


# --- actions for the I/O layer --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    value: bytes | bool | int | None


@dataclass(frozen=True, slots=True)
class Send:
    data: bytes


@dataclass(frozen=True, slots=True)
class Recv:
    n: int


@dataclass(frozen=True, slots=True)
class Sleep:
    seconds: float


@dataclass(frozen=True, slots=True)
class Log:
    level: str
    message: bytes
    cut: bool
    fields: tuple[tuple[str, bytes | int | bool], ...] = ()  # in key order; strings cut when shown


@dataclass(frozen=True, slots=True)
class StartTls:
    alpn: bytes  # the protocols the server may select (deadend.wire.check_alpn)


@dataclass(frozen=True, slots=True)
class End:
    reason: Reason
    detail: bytes = b""


Action = Reply | Send | Recv | Sleep | Log | StartTls | End
Handler = Callable[["Monitor", tuple[object, ...], float], Action]

# The request-table modes a session runs in (its requests are checked in one of them).
SESSION_MODES = wire.SESSION


class Monitor:
    __slots__ = (
        "_busy",
        "_calls",
        "_logs",
        "bytes_in",
        "bytes_limit",
        "bytes_out",
        "calls",
        "calls_after_close",
        "calls_limit",
        "ceilings",
        "closed_by",
        "eof",
        "gone_at",
        "idled",
        "log_bytes",
        "log_lines",
        "logs_dropped",
        "open",
        "peer_gone",
        "peer_ip",
        "recv_calls",
        "rng",
        "tarpit_base",
        "tarpit_jitter",
        "tls",
        "tls_failed",
        "tls_up",
        "usage",
    )

    def __init__(self, peer_ip: str, ceilings: Ceilings, rng: Rng, now: float) -> None:
        self.peer_ip = peer_ip.encode()
        self.ceilings = ceilings
        self.rng = rng
        self.open = True  # the script may still send
        self.eof = False  # the peer finished sending (it may still read: a half-close)
        self.closed_by: ClosedBy | None = None
        self.peer_gone = False  # the peer sent FIN or RST, whether or not the script has seen it yet
        self.gone_at: float | None = None  # when the connection closed or the peer finished: linger from here
        self.idled = False  # a recv or a send waited --idle-timeout for the client: the session ends `idle`
        self.recv_calls = 0  # successful recv calls (counted from the connection's start)
        self.bytes_in = 0
        self.bytes_out = 0
        self.calls_limit = 0
        self.bytes_limit = 0
        self.tarpit_base = 0
        self.tarpit_jitter = 0
        self.calls_after_close = 0
        self.logs_dropped = 0
        # What the script did, for `deadend audit`: API calls by name, log lines and bytes it asked for
        # (dropped ones too), and the usage its worker reported at the end (peak heap, instructions, CPU).
        self.calls: dict[str, int] = {}
        self.log_lines = 0
        self.log_bytes = 0
        self.usage: tuple[int, int, int] | None = None
        self.tls: TlsInfo | None = None  # the client's ClientHello was read (and more, if TLS completed)
        self.tls_up = False  # TLS carries the connection
        self.tls_failed = False  # a handshake failed: the session ends `tls-handshake` if nothing else
        self._logs = TokenBucket(ceilings.log_rate, ceilings.log_burst, now)
        self._calls = TokenBucket(ceilings.call_rate, ceilings.call_burst, now)
        self._busy = False  # a request is being carried out; a second one is a violation

    # --- the request table -----------------------------------------------------------------------

    def handle(self, req: wire.Request, now: float) -> Action:
        """One request (already checked against the table for this session's mode): the action to take."""
        if self._busy:
            raise wire.ProtocolViolation(f"{req.op!r} before the previous request was answered")
        handler = HANDLERS.get(req.op)
        if handler is None:  # a row permitted only outside sessions (`dump`): parse_request refused it
            raise wire.ProtocolViolation(f"{req.op!r} is not permitted in a session")
        self.calls[req.op] = self.calls.get(req.op, 0) + 1
        if req.op in IO_REQUESTS and not self._connection_usable(req.op):
            self.calls_after_close += 1
            if self.calls_after_close > self.ceilings.linger_calls:
                return End(Reason.LINGER, b"kept calling send/recv after the peer was done")
        action = handler(self, req.args, now)
        self._busy = not isinstance(action, Reply | End)
        return action

    def _connection_usable(self, op: str) -> bool:
        # starttls needs the client's bytes as much as recv does
        return self.open and not (op in ("recv", "starttls") and self.eof)

    def _on_done(self, a: tuple[object, ...], now: float) -> Action:
        kind, message = a
        assert isinstance(kind, str) and isinstance(message, bytes)
        return End(OF_DONE_KIND[kind], message)

    def _on_send(self, a: tuple[object, ...], now: float) -> Action:
        data = a[0]
        assert isinstance(data, bytes)
        if not self.open:
            return Reply(False)
        if not data:
            return Reply(True)
        return Send(data)

    def _on_recv(self, a: tuple[object, ...], now: float) -> Action:
        assert isinstance(a[0], int)
        if not self._connection_usable("recv"):
            return Reply(None)
        if self.calls_limit and self.recv_calls >= self.calls_limit:
            self.close(ClosedBy.LIMIT, now)
            return Reply(None)
        return Recv(a[0])

    def _on_sleep(self, a: tuple[object, ...], now: float) -> Action:
        assert isinstance(a[0], int)
        return Sleep(a[0] / 1000)

    def _on_get_ip(self, a: tuple[object, ...], now: float) -> Action:
        return Reply(self.peer_ip)

    def _on_log(self, a: tuple[object, ...], now: float) -> Action:
        message, level, pairs = a
        assert isinstance(message, bytes) and isinstance(level, str) and isinstance(pairs, list)
        self.log_lines += 1
        self.log_bytes += len(message)
        if not self._logs.take(now):
            self.logs_dropped += 1
            return Reply(None)
        fields = tuple(
            (key.decode("ascii"), value) for key, value in zip(pairs[0::2], pairs[1::2], strict=True)
        )
        return Log(level, message[: wire.LOG_MAX], len(message) > wire.LOG_MAX, fields)

    def _on_set_tarpit(self, a: tuple[object, ...], now: float) -> Action:
        base, jitter = a
        assert isinstance(base, int) and isinstance(jitter, int)
        self.tarpit_base, self.tarpit_jitter = base, jitter
        return Reply(None)

    def _on_set_limits(self, a: tuple[object, ...], now: float) -> Action:
        calls, nbytes = a
        assert isinstance(calls, int) and isinstance(nbytes, int)
        self.calls_limit, self.bytes_limit = calls, nbytes
        return Reply(None)

    def _on_usage(self, a: tuple[object, ...], now: float) -> Action:
        peak, instructions, cpu_us = a
        assert isinstance(peak, int) and isinstance(instructions, int) and isinstance(cpu_us, int)
        self.usage = peak, instructions, cpu_us
        return Reply(None)

    def _on_close(self, a: tuple[object, ...], now: float) -> Action:
        self.close(ClosedBy.SCRIPT, now)
        return Reply(None)

    def _on_starttls(self, a: tuple[object, ...], now: float) -> Action:
        alpn = a[0]
        assert isinstance(alpn, bytes)
        if self.tls_up:  # the bootstrap raises an argument error instead of asking twice
            raise wire.ProtocolViolation("'starttls' on a connection that already speaks TLS")
        if not self._connection_usable("starttls"):
            return Reply(None)
        return StartTls(alpn)

    def _on_tls_info(self, a: tuple[object, ...], now: float) -> Action:
        return Reply(self.tls.to_wire() if self.tls_up and self.tls is not None else None)

    # --- outcomes of I/O -------------------------------------------------------------------------

    def sent(self, ok: bool, n: int, now: float) -> Reply:
        self._busy = False
        if ok and self.open:
            self.bytes_out += n
            return Reply(True)
        self.close(ClosedBy.PEER, now)
        return Reply(False)

    def received(self, data: bytes | None, now: float) -> tuple[Reply, float]:
        """The reply to a recv (`None`: the read failed, `b""`: end of input) and the tarpit delay."""
        self._busy = False
        if data is None or not self.open:
            self.close(ClosedBy.PEER, now)
            return Reply(None), 0.0
        if not data:
            self.peer_finished(now)
            return Reply(None), 0.0
        if self.bytes_limit and self.bytes_in + len(data) > self.bytes_limit:
            self.close(ClosedBy.LIMIT, now)
            return Reply(None), 0.0
        self.recv_calls += 1
        self.bytes_in += len(data)
        return Reply(data), self.tarpit_delay()

    def tls_started(self, info: TlsInfo | None, error: str, timed_out: bool, now: float) -> Reply:
        """The handshake's outcome: true, or nil with the connection closed, as after the peer's close (a
        timeout counts as a limit's). `info`: the ClientHello, whether or not TLS completed."""
        self._busy = False
        self.tls = info
        if not error and self.open:
            self.tls_up = True
            return Reply(True)
        self.tls_failed = True
        self.close(ClosedBy.LIMIT if timed_out else ClosedBy.PEER, now)
        return Reply(None)

    def idle(self, now: float) -> Reply:
        """A recv got no byte, or a send's bytes were not taken, within --idle-timeout: the call fails (nil,
        or false), the connection closes, and the session ends `idle` (unless a ceiling ends it first)."""
        self._busy = False
        self.idled = True
        self.close(ClosedBy.LIMIT, now)
        return Reply(None)

    def carried_out(self) -> Reply:
        """A log line is written: the (empty) reply to it."""
        self._busy = False
        return Reply(None)

    def slept(self, ms: int, cut: bool = False) -> Reply:
        """A sleep is over, after `ms` milliseconds. `cut`: it ended early (or at once) because the peer
        had left: the script is told so by the short sleep, as by a recv that returns nil, so a close it
        makes next does not take the credit."""
        self._busy = False
        if cut and self.closed_by is None:
            self.closed_by = ClosedBy.PEER
        return Reply(ms)

    def tarpit_on(self) -> bool:
        """Is a tarpit set (every successful recv then waits before its reply)?"""
        return bool(self.tarpit_base or self.tarpit_jitter)

    def tarpit_delay(self) -> float:
        if not self.tarpit_base and not self.tarpit_jitter:
            return 0.0
        jitter = self.rng.randint(0, self.tarpit_jitter) if self.tarpit_jitter else 0
        return (self.tarpit_base + jitter) / 1000

    # --- the connection, whatever the script is doing ----------------------------------------------

    def peer_left(self, now: float) -> None:
        """The peer sent FIN or RST (seen while the script did anything at all): the script has --linger
        from now, as after a close. What the peer sent before is still the script's to read, and who
        closed is what the script saw (a script that closes before it read the end closed first)."""
        self.peer_gone = True
        if self.gone_at is None:
            self.gone_at = now

    def peer_finished(self, now: float) -> None:
        """A recv reached the end of input: recv returns nil from now on, send keeps working (it may be a
        half-close)."""
        self.eof = True
        if self.closed_by is None:
            self.closed_by = ClosedBy.PEER
        self.peer_left(now)

    def final_closed_by(self) -> ClosedBy:
        """Who closed, for the session-end event: a peer that left unnoticed by the script still left."""
        if self.closed_by is not None:
            return self.closed_by
        return ClosedBy.PEER if self.peer_gone else ClosedBy.NONE

    def close(self, by: ClosedBy, now: float) -> bool:
        """Mark the connection closed; True if it was open (the I/O layer then closes the socket).

        `closed_by` names whoever closed first: a script that closes after its peer left (FIN or RST)
        does not take the credit, nor does a limit or the shutdown.
        """
        if not self.open:
            return False
        self.open = False
        if self.closed_by is None:
            self.closed_by = by
        if self.gone_at is None:
            self.gone_at = now
        return True

    def final_reason(self, reason: Reason) -> Reason:
        """The session-end reason: a script that returned after its recv idled out ended `idle`, and one
        that returned after its TLS handshake failed, `tls-handshake`."""
        if reason != Reason.DONE:
            return reason
        if self.idled:
            return Reason.IDLE
        return Reason.TLS_HANDSHAKE if self.tls_failed else reason

    def call_delay(self, now: float) -> float:
        """Seconds to hold this call back so the session stays within its API call rate.

        A script spinning on cheap calls (`while true do deadend.get_ip() end`) would otherwise cost the
        broker as much CPU as it likes; throttled, it only wastes its own CPU budget.
        """
        return self._calls.delay(now)

    def take_dropped_logs(self) -> int:
        n, self.logs_dropped = self.logs_dropped, 0
        return n


# Each request permitted in a session, to its handler: made once, from the table (not per session).
HANDLERS: dict[str, Handler] = {
    row.name: getattr(Monitor, f"_on_{row.name}") for row in wire.REQUESTS if row.modes & SESSION_MODES
}
IO_REQUESTS = frozenset(row.name for row in wire.REQUESTS if row.io)
