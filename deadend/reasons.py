"""Why a session ended, and who closed its connection: the one home of that vocabulary.

Every accepted connection gets exactly one `session.end` event carrying a Reason; the event schema, the
metrics labels and the README's table all come from here (a test keeps the README equal to it). Each value
is one token, so that `key=value` text lines stay trivially parseable.
"""

from __future__ import annotations

import enum
from typing import Final


class Reason(enum.StrEnum):
    """The `reason` of a session's end (MEANING says each one's meaning for the operator)."""

    DONE = "done"
    SCRIPT_ERROR = "script-error"
    COMPILE_ERROR = "compile-error"
    INSTRUCTIONS = "instruction-limit"
    MEMORY = "memory-limit"
    CPU_DEADLINE = "cpu-deadline"
    CPU_LIMIT = "cpu-limit"
    SECCOMP = "seccomp"
    CRASH = "sandbox-crash"
    PROTOCOL = "protocol-violation"
    LINGER = "linger"
    IDLE = "idle"
    SESSION_TIME = "session-time"
    SHUTDOWN = "shutdown"
    CAPACITY = "capacity"
    QUEUE_FULL = "queue-full"
    CONN_LIMIT = "conn-limit"
    PER_IP_LIMIT = "per-ip-limit"
    PROXY_HEADER = "proxy-header"
    WORKER_LOST = "worker-lost"
    TLS_HANDSHAKE = "tls-handshake"
    IGNORED = "ignored"  # --ignore-action refuse: never logged, seen only by the metrics


MEANING: Final[dict[Reason, str]] = {
    Reason.DONE: "the script returned",
    Reason.SCRIPT_ERROR: "the script raised an error it did not catch",
    Reason.COMPILE_ERROR: "the script did not compile",
    Reason.INSTRUCTIONS: "the script ran more than `--instructions` Lua instructions between two API calls",
    Reason.MEMORY: "the script's Lua heap reached `--memory`",
    Reason.CPU_DEADLINE: "the sandbox computed longer than `--cpu-slice` without an API call and was killed",
    Reason.CPU_LIMIT: "the session used `--session-cpu` seconds of CPU",
    Reason.SECCOMP: "the sandbox made a forbidden system call and was killed",
    Reason.CRASH: "the sandbox process died, or none could be started",
    Reason.PROTOCOL: "the sandbox broke the wire protocol (a compromised sandbox) and was killed",
    Reason.LINGER: "the script went on past `--linger` (or `--linger-calls`) after its peer left",
    Reason.IDLE: "the client sent nothing to a `recv`, or took nothing of a `send`, for `--idle-timeout`",
    Reason.SESSION_TIME: "the session lasted `--session-time`",
    Reason.SHUTDOWN: "the broker was shutting down",
    Reason.CAPACITY: "no sandbox was free within `--queue-timeout`",
    Reason.QUEUE_FULL: "every sandbox was busy and the queue was full",
    Reason.CONN_LIMIT: "`--max-connections` were open",
    Reason.PER_IP_LIMIT: "the address (or IPv6 /64) had `--max-per-ip` connections open",
    Reason.PROXY_HEADER: "`--proxy-protocol`: the PROXY header was missing or malformed",
    Reason.WORKER_LOST: "dense mode: the sandbox it shared was killed because of another session",
    Reason.TLS_HANDSHAKE: "`deadend.starttls()` failed (no ClientHello, a malformed one, a handshake OpenSSL "
    "refused, or none within `--tls-handshake-timeout`) and the script then returned",
    Reason.IGNORED: "`--ignore-action refuse`: a peer in an --ignore network (counted, never logged)",
}

# The ceiling behind each limit reason, by its flag name: the session-end event's `limit` field.
LIMIT_OF: Final[dict[Reason, str]] = {
    Reason.INSTRUCTIONS: "instructions",
    Reason.MEMORY: "memory",
    Reason.CPU_DEADLINE: "cpu-slice",
    Reason.CPU_LIMIT: "session-cpu",
    Reason.SESSION_TIME: "session-time",
    Reason.LINGER: "linger",
    Reason.IDLE: "idle-timeout",
}

# Connections that never reached a script (the metrics count them as refused).
REFUSED: Final = frozenset(
    {Reason.CONN_LIMIT, Reason.PER_IP_LIMIT, Reason.CAPACITY, Reason.QUEUE_FULL, Reason.PROXY_HEADER}
)

# How a worker reports the end of its script ("done" frames, `deadend.wire.DONE_KINDS`).
OF_DONE_KIND: Final[dict[str, Reason]] = {
    "return": Reason.DONE,
    "error": Reason.SCRIPT_ERROR,
    "compile": Reason.COMPILE_ERROR,
    "instructions": Reason.INSTRUCTIONS,
    "memory": Reason.MEMORY,
    "crash": Reason.CRASH,
    "cpu": Reason.CPU_LIMIT,  # dense mode: the worker meters each session's CPU time
}


class ClosedBy(enum.StrEnum):
    """Who closed the connection (the session-end event's `closed_by`)."""

    PEER = "peer"
    SCRIPT = "script"
    LIMIT = "limit"
    SHUTDOWN = "shutdown"
    NONE = "-"  # it never reached a script
