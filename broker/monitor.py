"""The monitor: one session's state, answering the fixed table of requests of `deadend.wire`.

Pure logic in the manner of h11: no sockets, no processes, no clock of its own (the caller passes `now`).
It turns each validated request into one action for the I/O layer (`broker.session`) and is told the
outcome. Recv limits, the tarpit delay, close, the log rate and the linger ceiling are decided here.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Final

from deadend.config import Ceilings
from deadend.wire import LOG_MAX, ProtocolViolation, Request

# Why a connection was closed while the script may still run (reported on the session-end line).
CLOSED_BY_PEER: Final = "peer"
CLOSED_BY_SCRIPT: Final = "script"
CLOSED_BY_LIMIT: Final = "limit"
CLOSED_BY_SHUTDOWN: Final = "shutdown"

# How a session ended (the `reason=` of the session-end line). One home for the vocabulary; each is one
# token so that `key=value` log lines stay trivially parseable.
END_RETURNED: Final = "done"
END_SCRIPT_ERROR: Final = "script-error"
END_COMPILE_ERROR: Final = "compile-error"
END_INSTRUCTIONS: Final = "instruction-limit"
END_MEMORY: Final = "memory-limit"
END_CPU_DEADLINE: Final = "cpu-deadline"
END_CPU_LIMIT: Final = "cpu-limit"
END_SECCOMP: Final = "seccomp"
END_CRASH: Final = "sandbox-crash"
END_PROTOCOL: Final = "protocol-violation"
END_LINGER: Final = "linger"
END_SESSION_TIME: Final = "session-time"
END_SHUTDOWN: Final = "shutdown"
END_CAPACITY: Final = "capacity"
END_QUEUE_FULL: Final = "queue-full"
END_CONN_LIMIT: Final = "conn-limit"
END_PER_IP_LIMIT: Final = "per-ip-limit"
END_PROXY_HEADER: Final = "proxy-header"  # --proxy-protocol: the header was missing or malformed
END_WORKER_LOST: Final = "worker-lost"  # dense mode: the child it shared was killed for another session
END_IGNORED: Final = "ignored"  # --ignore-action refuse (never logged: seen only by the metrics)

# The ceiling behind each limit reason, by its flag name: the session-end line's `limit` field.
LIMIT_OF_REASON: Final = {
    END_INSTRUCTIONS: "instructions",
    END_MEMORY: "memory",
    END_CPU_DEADLINE: "cpu-slice",
    END_CPU_LIMIT: "session-cpu",
    END_SESSION_TIME: "session-time",
    END_LINGER: "linger",
}

DONE_REASONS: Final = {
    "return": END_RETURNED,
    "error": END_SCRIPT_ERROR,
    "compile": END_COMPILE_ERROR,
    "instructions": END_INSTRUCTIONS,
    "memory": END_MEMORY,
    "crash": END_CRASH,
    "cpu": END_CPU_LIMIT,  # dense mode: the child meters each session's CPU time
}


# --- actions for the I/O layer --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    value: bytes | bool | None


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


@dataclass(frozen=True, slots=True)
class End:
    reason: str
    detail: bytes = b""


Action = Reply | Send | Recv | Sleep | Log | End


class Monitor:
    def __init__(self, peer_ip: str, ceilings: Ceilings, rng: random.Random, now: float) -> None:
        self.peer_ip = peer_ip.encode()
        self.ceilings = ceilings
        self.rng = rng
        self.open = True
        self.eof = False  # the peer finished sending (it may still read: a half-close)
        self.closed_by: str | None = None
        self.closed_at: float | None = None
        self.recv_calls = 0  # successful recv calls (counted from the connection's start)
        self.bytes_in = 0
        self.bytes_out = 0
        self.calls_limit = 0
        self.bytes_limit = 0
        self.tarpit_base = 0
        self.tarpit_jitter = 0
        self.calls_after_close = 0
        self.logs_dropped = 0
        self._log_tokens = float(ceilings.log_burst)
        self._log_stamp = now
        self._call_tokens = float(ceilings.call_burst)
        self._call_stamp = now
        self._busy = False  # a request is being carried out; a second one is a violation

    # --- the request table -----------------------------------------------------------------------

    def handle(self, req: Request, now: float) -> Action:
        if self._busy:
            raise ProtocolViolation(f"{req.op!r} before the previous request was answered")
        op, a = req.op, req.args
        if op == "done":
            return End(DONE_REASONS[a[0]], a[1])
        if op == "dump":
            raise ProtocolViolation("'dump' is only for a check, not in a session")
        if (op in ("send", "recv") and not self.open) or (op == "recv" and self.eof):
            self.calls_after_close += 1
            if self.calls_after_close > self.ceilings.linger_calls:
                return End(END_LINGER, b"kept calling send/recv after the peer was done")
        action = self._dispatch(op, a, now)
        self._busy = not isinstance(action, (Reply, End))
        return action

    def _dispatch(self, op: str, a: tuple[object, ...], now: float) -> Action:
        if op == "send":
            data = a[0]
            assert isinstance(data, bytes)
            if not self.open:
                return Reply(False)
            if not data:
                return Reply(True)
            return Send(data)
        if op == "recv":
            assert isinstance(a[0], int)
            if not self.open or self.eof:
                return Reply(None)
            if self.calls_limit and self.recv_calls >= self.calls_limit:
                self.close(CLOSED_BY_LIMIT, now)
                return Reply(None)
            return Recv(a[0])
        if op == "sleep":
            assert isinstance(a[0], int)
            return Sleep(a[0] / 1000)
        if op == "get_ip":
            return Reply(self.peer_ip)
        if op == "log":
            message, level = a
            assert isinstance(message, bytes) and isinstance(level, str)
            if not self._log_allowed(now):
                self.logs_dropped += 1
                return Reply(None)
            return Log(level, message[:LOG_MAX], len(message) > LOG_MAX)
        if op == "set_tarpit":
            base, jitter = a
            assert isinstance(base, int) and isinstance(jitter, int)
            self.tarpit_base, self.tarpit_jitter = base, jitter
            return Reply(None)
        if op == "set_limits":
            calls, nbytes = a
            assert isinstance(calls, int) and isinstance(nbytes, int)
            self.calls_limit, self.bytes_limit = calls, nbytes
            return Reply(None)
        if op == "close":
            self.close(CLOSED_BY_SCRIPT, now)
            return Reply(None)
        raise ProtocolViolation(f"no handler for {op!r}")  # unreachable: wire checked the table

    # --- outcomes of I/O -------------------------------------------------------------------------

    def sent(self, ok: bool, n: int, now: float) -> Reply:
        self._busy = False
        if ok and self.open:
            self.bytes_out += n
            return Reply(True)
        self.close(CLOSED_BY_PEER, now)
        return Reply(False)

    def received(self, data: bytes | None, now: float) -> tuple[Reply, float]:
        """The reply to a recv (`None`: the read failed, `b""`: end of input) and the tarpit delay."""
        self._busy = False
        if data is None or not self.open:
            self.close(CLOSED_BY_PEER, now)
            return Reply(None), 0.0
        if not data:
            # The peer finished sending. It may still be reading (a half-close), so the connection stays
            # open for send until a send fails; recv returns nil from now on.
            self.eof = True
            self.closed_by = self.closed_by or CLOSED_BY_PEER
            return Reply(None), 0.0
        if self.bytes_limit and self.bytes_in + len(data) > self.bytes_limit:
            self.close(CLOSED_BY_LIMIT, now)
            return Reply(None), 0.0
        self.recv_calls += 1
        self.bytes_in += len(data)
        return Reply(data), self.tarpit_delay()

    def carried_out(self) -> Reply:
        """A sleep or a log line is done: the (empty) reply to it."""
        self._busy = False
        return Reply(None)

    def tarpit_delay(self) -> float:
        if not self.tarpit_base and not self.tarpit_jitter:
            return 0.0
        jitter = self.rng.randint(0, self.tarpit_jitter) if self.tarpit_jitter else 0
        return (self.tarpit_base + jitter) / 1000

    # --- state -----------------------------------------------------------------------------------

    def close(self, by: str, now: float) -> bool:
        """Mark the connection closed; True if it was open (the I/O layer then closes the socket)."""
        if not self.open:
            return False
        self.open = False
        if not self.eof or by != CLOSED_BY_PEER:
            self.closed_by = by
        self.closed_at = now
        return True

    def call_delay(self, now: float) -> float:
        """Seconds to hold this call back so the session stays within its API call rate.

        A script spinning on cheap calls (`while true do deadend.get_ip() end`) would otherwise cost the
        broker as much CPU as it likes; throttled, it only wastes its own CPU budget.
        """
        rate, burst = self.ceilings.call_rate, self.ceilings.call_burst
        self._call_tokens = min(float(burst), self._call_tokens + (now - self._call_stamp) * rate)
        self._call_stamp = now
        self._call_tokens -= 1.0
        return 0.0 if self._call_tokens >= 0 else -self._call_tokens / rate

    def _log_allowed(self, now: float) -> bool:
        rate, burst = self.ceilings.log_rate, self.ceilings.log_burst
        self._log_tokens = min(float(burst), self._log_tokens + (now - self._log_stamp) * rate)
        self._log_stamp = now
        if self._log_tokens >= 1.0:
            self._log_tokens -= 1.0
            return True
        return False

    def take_dropped_logs(self) -> int:
        n, self.logs_dropped = self.logs_dropped, 0
        return n
