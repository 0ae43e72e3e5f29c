"""The wire protocol between the broker and a sandbox child: the one home of the contract.

Every frame is one msgpack array on a pipe. The child (untrusted after lockdown) speaks first:

    child -> broker   ["ready"]                       once, after lockdown
    broker -> child   ["start", {START fields}]       once, per session
    child -> broker   [op, arg...]                    one request, then it waits for the reply
    broker -> child   value                           exactly one reply per request
    child -> broker   ["done", kind, message]         last frame; the child then exits

Requests are the `deadend.*` calls of SPEC.md. Their argument ranges live here and nowhere else: the Lua
bootstrap receives them from `lua_constants()` so that the argument errors a script sees and the checks
the broker applies to a (possibly compromised) child are the same numbers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import msgpack

# --- ranges of the script API (SPEC.md) -------------------------------------------------------------

RECV_MIN: Final = 1
RECV_MAX: Final = 65535
SLEEP_MAX_MS: Final = 3_600_000
TARPIT_MAX_MS: Final = 60_000
SEND_MAX: Final = 1 << 20  # bytes per send() call (decided)
LIMIT_MAX: Final = (1 << 63) - 1  # set_limits takes any non-negative Lua integer
LOG_MAX: Final = 4096  # a log message is cut here, with a marker
LOG_LEVELS: Final = ("debug", "info", "warn", "error")

# Caps on C loops that never reach the Lua hook (research/sandbox.md, "hook-proof C loops").
REP_MAX: Final = 1 << 26  # string.rep: result bytes, or iterations when the result is empty
MOVE_MAX: Final = 1 << 22  # table.move: elements per call

# The base functions a script's environment holds (SPEC.md). The bootstrap builds the environment from
# this list; `deadend check` judges scripts against it.
BASE_FUNCTIONS: Final = (
    "assert",
    "error",
    "getmetatable",
    "ipairs",
    "next",
    "pairs",
    "pcall",
    "rawequal",
    "rawget",
    "rawlen",
    "rawset",
    "select",
    "setmetatable",
    "tonumber",
    "tostring",
    "type",
    "xpcall",
    "_VERSION",
)
LIBRARIES: Final = ("string", "table", "math", "utf8", "deadend")
API_FUNCTIONS: Final = ("send", "recv", "sleep", "get_ip", "log", "set_tarpit", "set_limits", "close")
CLOCK_FUNCTIONS: Final = ("time", "date", "clock", "difftime")  # os.*, with the operator's clock option

# --- framing ---------------------------------------------------------------------------------------

# The largest frame a child may send: a full send() plus envelope. Anything larger is a violation.
MAX_CHILD_FRAME: Final = SEND_MAX + 1024
# The start message carries the script; scripts larger than this are refused at discovery.
MAX_SCRIPT_BYTES: Final = 256 * 1024
MAX_BROKER_FRAME: Final = MAX_SCRIPT_BYTES + 4096

# How a session ended, as the child reports it in its "done" frame.
DONE_KINDS: Final = ("return", "error", "instructions", "memory", "compile", "crash", "cpu")

# A child prepared for one script (mode "prepare") answers PREPARED and starts the session at GO.
PREPARED: Final = ["prepared"]
GO: Final = "go"  # ["go", seed_hi, seed_lo]

# Dense mode (--sessions-per-worker): the broker's "end this session now" in place of a reply; the child
# drops that session's Lua state and answers ABORTED.
ABORT: Final = ["abort"]
ABORTED: Final = ["done", "aborted", b""]


class ProtocolViolation(Exception):
    """A frame from a child that breaks the contract. The broker ends that child; nothing else."""


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def _flat_list(items: list[Any]) -> list[Any]:
    # Requests carry scalars only. Refusing nested arrays as soon as the innermost one is built keeps a
    # 1 MiB frame of nested empty arrays from inflating into tens of MiB of Python lists first.
    for item in items:
        if isinstance(item, list):
            raise ValueError("nested array in a request")
    return items


def child_unpacker() -> msgpack.Unpacker:
    """The broker's bounded reader for frames from a child (hostile input)."""
    return msgpack.Unpacker(
        list_hook=_flat_list,
        raw=False,
        max_buffer_size=MAX_CHILD_FRAME,
        max_bin_len=SEND_MAX,
        max_str_len=64,
        max_array_len=4,
        max_map_len=0,
        max_ext_len=0,
        strict_map_key=True,
    )


def broker_unpacker() -> msgpack.Unpacker:
    """The child's reader for frames from the broker (trusted, still bounded)."""
    return msgpack.Unpacker(raw=False, max_buffer_size=MAX_BROKER_FRAME, strict_map_key=True)


# --- start message --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Start:
    """What a child needs to run one session. It never opens anything itself."""

    # "run" a session; "compile" only; "check": compile and send the chunk's bytecode; "prepare": compile,
    # say PREPARED, and run when GO arrives with the session's seed (a warm child ready for one script)
    mode: str
    source: bytes
    chunkname: str  # e.g. "25.lua", used in Lua error messages
    seed: tuple[int, int]  # for math.randomseed; forked children would otherwise share the PRNG
    memory: int  # bytes of Lua heap
    instructions: int  # VM instructions allowed between two API calls
    clock: bool  # expose the read-only os clock subset

    def to_frame(self) -> list[Any]:
        return [
            "start",
            {
                "mode": self.mode,
                "source": self.source,
                "chunkname": self.chunkname,
                "seed": list(self.seed),
                "memory": self.memory,
                "instructions": self.instructions,
                "clock": self.clock,
            },
        ]

    @classmethod
    def from_frame(cls, frame: Any) -> Start:
        if not (isinstance(frame, list) and len(frame) == 2 and frame[0] == "start"):
            raise ValueError("expected a start frame")
        f = frame[1]
        seed = f["seed"]
        start = cls(
            mode=f["mode"],
            source=f["source"],
            chunkname=f["chunkname"],
            seed=(int(seed[0]), int(seed[1])),
            memory=f["memory"],
            instructions=f["instructions"],
            clock=f["clock"],
        )
        if (
            start.mode not in ("run", "compile", "check", "prepare")
            or not isinstance(start.source, bytes)
            or not isinstance(start.chunkname, str)
            or not isinstance(start.memory, int)
            or not isinstance(start.instructions, int)
            or not isinstance(start.clock, bool)
        ):
            raise ValueError("malformed start frame")
        return start


# --- requests from the child ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Request:
    op: str
    args: tuple[Any, ...]


def _is_int(v: Any) -> bool:
    # bool is an int subclass in Python; msgpack keeps them apart, so must we.
    return type(v) is int


def _int_in(v: Any, lo: int, hi: int) -> bool:
    return _is_int(v) and lo <= v <= hi


def _check_send(a: tuple[Any, ...]) -> bool:
    return len(a) == 1 and type(a[0]) is bytes and len(a[0]) <= SEND_MAX


def _check_recv(a: tuple[Any, ...]) -> bool:
    return len(a) == 1 and _int_in(a[0], RECV_MIN, RECV_MAX)


def _check_sleep(a: tuple[Any, ...]) -> bool:
    return len(a) == 1 and _int_in(a[0], 0, SLEEP_MAX_MS)


def _check_none(a: tuple[Any, ...]) -> bool:
    return len(a) == 0


def _check_log(a: tuple[Any, ...]) -> bool:
    # The child sends at most LOG_MAX + 1 bytes so the broker can tell a cut message from a full one.
    return len(a) == 2 and type(a[0]) is bytes and len(a[0]) <= LOG_MAX + 1 and a[1] in LOG_LEVELS


def _check_tarpit(a: tuple[Any, ...]) -> bool:
    return len(a) == 2 and all(_int_in(v, 0, TARPIT_MAX_MS) for v in a)


def _check_limits(a: tuple[Any, ...]) -> bool:
    return len(a) == 2 and all(_int_in(v, 0, LIMIT_MAX) for v in a)


def _check_dump(a: tuple[Any, ...]) -> bool:
    return len(a) == 1 and type(a[0]) is bytes


def _check_done(a: tuple[Any, ...]) -> bool:
    return len(a) == 2 and a[0] in DONE_KINDS and type(a[1]) is bytes and len(a[1]) <= LOG_MAX + 1


# The fixed table of requests a child may make (OpenSSH monitor style): name -> argument check.
REQUESTS: Final = {
    "send": _check_send,
    "recv": _check_recv,
    "sleep": _check_sleep,
    "get_ip": _check_none,
    "log": _check_log,
    "set_tarpit": _check_tarpit,
    "set_limits": _check_limits,
    "close": _check_none,
    "dump": _check_dump,  # only in a "check": the compiled chunk, for the static analysis of `deadend check`
    "done": _check_done,
}


# How many arguments each request carries (the child trims Lua's trailing nils with it).
ARITY: Final = {
    "send": 1,
    "recv": 1,
    "sleep": 1,
    "get_ip": 0,
    "log": 2,
    "set_tarpit": 2,
    "set_limits": 2,
    "close": 0,
    "dump": 1,
    "done": 2,
}


def parse_request(frame: Any) -> Request:
    """Validate one frame from a child against the request table, or raise ProtocolViolation."""
    if not isinstance(frame, list) or not frame:
        raise ProtocolViolation(f"frame is not a request array ({type(frame).__name__})")
    op = frame[0]
    check = REQUESTS.get(op) if isinstance(op, str) else None
    if check is None:
        raise ProtocolViolation(f"unknown request {str(op)[:32]!r}")
    args = tuple(frame[1:])
    if not check(args):
        raise ProtocolViolation(f"bad arguments to {op!r}")
    return Request(op, args)


def lua_constants() -> dict[str, int | str]:
    """What the Lua bootstrap needs from here, as plain integers and strings (no Python object)."""
    return {
        "RECV_MIN": RECV_MIN,
        "RECV_MAX": RECV_MAX,
        "SLEEP_MAX": SLEEP_MAX_MS,
        "TARPIT_MAX": TARPIT_MAX_MS,
        "SEND_MAX": SEND_MAX,
        "LOG_MAX": LOG_MAX,
        "REP_MAX": REP_MAX,
        "MOVE_MAX": MOVE_MAX,
        # "_G" and "print" are built by the bootstrap itself; the rest are copied from the real state
        "BASE_NAMES": ",".join(name for name in BASE_FUNCTIONS if name not in ("setmetatable", "xpcall")),
    }
