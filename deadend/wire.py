"""The wire: every message between the broker, the zygote and the sandbox workers (and, with --brokers,
the supervisor). The contract's one home.

Four channels, five dialects, all msgpack:

    broker ──control socket (SOCK_SEQPACKET, one message per datagram)──▶ zygote        [ZYGOTE CONTROL]
      ["fork", {ForkRequest}]              ──▶  ◀── ["hello", pid, [[layer, why skipped]...]]  once, ready
      ["kill", pid]                        ──▶  ◀── ["child", pid] + fds (to_worker, from_worker, pidfd)
                                                ◀── ["fork-failed", errno]
                                                ◀── ["exit", pid, wait_status]

    broker ◀──pipe pair──▶ worker, one session per worker                                  [PLAIN]
      ◀── ["ready"]                                  once, after lockdown
      ──▶ ["start", {Start}]                          mode "run": the session begins at once
      ──▶ ["start", {Start, mode "prepare"}]  ◀── ["prepared"]  ──▶ ["go", seed_hi, seed_lo]   [PREPARE/GO]
      ◀── [op, arg...]  ──▶ reply                     one request, then the worker waits for its reply
      ◀── ["usage", peak, instructions, cpu_us]  ──▶ nil    Start with measure (`deadend audit`) only
      ◀── ["done", kind, message]                    the last frame; the worker then exits

    broker ◀──pipe pair──▶ dense worker, up to K sessions (--sessions-per-worker)            [DENSE]
      ◀── ["ready"]                                  once, unprefixed
      ──▶ slot, ["start", {Start}]                    every later frame both ways is preceded by its
      ◀── slot, [op, arg...]  ──▶ slot, reply          session's slot number (a msgpack integer)
      ──▶ slot, ["abort"]   ◀── slot, ["done", "aborted", b""]   the broker ends a session early

    supervisor ──control socket (SOCK_SEQPACKET)──▶ broker i of N (--brokers)          [SUPERVISOR]
      ["listeners", more] + fds            ──▶  sockets to serve (several messages while `more`)
      ["reload"]                           ──▶  rescan the scripts (after any new port's listeners)
      ["metrics", n]                       ──▶  ◀── ["metrics", n, chunk, more]  its exposition text
                                                ◀── ["ready"]  serving (after its broker.ready event)

The zygote itself is started with a ZygoteConfig (one JSON argument). Requests are the `deadend.*` calls
of SPEC.md: REQUESTS below is the one table of them (name, arity, argument check, the modes that permit
it, whether it is refused once the connection closed); the broker's monitor dispatches through it, the
worker trims Lua's trailing nils with it, and the Lua bootstrap gets the argument ranges from
`lua_constants()`, so the argument errors a script sees and the checks the broker applies to a (possibly
compromised) worker are the same numbers.
"""

from __future__ import annotations

import array
import dataclasses
import enum
import functools
import itertools
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any, Final, NamedTuple

import msgpack

# --- ranges of the script API (SPEC.md) -------------------------------------------------------------

RECV_MIN: Final = 1
RECV_MAX: Final = 65535
SLEEP_MAX_MS: Final = 3_600_000
TARPIT_MAX_MS: Final = 60_000
SEND_MAX: Final = 1 << 20  # bytes per send() call (decided)
LIMIT_MAX: Final = (1 << 63) - 1  # set_limits takes any non-negative Lua integer
SEED_MAX: Final = (1 << 63) - 1  # each half of a session's PRNG seed (math.randomseed takes Lua integers)
LOG_MAX: Final = 4096  # a log message is cut here (after escaping), with a marker
LOG_LEVELS: Final = ("debug", "info", "warn", "error")
# deadend.log's optional third argument (decided): what the attacker did, as named values a SIEM can
# query. Keys are lower-case dotted names; values strings (cut at FIELD_MAX bytes after escaping, like a
# message), integers or booleans.
FIELDS_MAX: Final = 16
FIELD_MAX: Final = 1024
FIELD_KEY_MAX: Final = 32
FIELD_KEY: Final = re.compile(rb"[a-z][a-z0-9_.]{0,31}")
# starttls(alpn): the ALPN protocols the server may select, comma-separated in its order of preference
# ("h2,http/1.1"); each 1..255 bytes of printable ASCII but the comma (RFC 7301 names are opaque, but
# every registered one is such text), all of it at most ALPN_MAX bytes.
ALPN_MAX: Final = 255

# Caps on C loops that never reach the Lua hook: string.rep with an empty result and table.move loop in C
# without executing a VM instruction, so their size is checked before the call.
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
LIBRARIES: Final = ("string", "table", "math", "utf8", "deadend", "std")  # std: sandbox/std.lua
CLOCK_FUNCTIONS: Final = ("time", "date", "clock", "difftime")  # os.*, with the operator's clock option

# --- what a log line shows as an escape --------------------------------------------------------------
# The broker's log (deadend.logs.sanitize) and the sandbox's `std.quote` escape the same characters, so a
# script can quote a value exactly as the log would show it. Characters are escaped by Unicode category:
# control (Cc), format (Cf: bidi controls, zero-width characters, the tag block), surrogate (Cs),
# private-use (Co), unassigned (Cn), line and paragraph separators (Zl, Zp) and spaces other than the ASCII
# space (Zs); and the ranges below.
UNSAFE_CATEGORIES: Final = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp", "Zs"})
# Default_Ignorable_Code_Point (Unicode's DerivedCoreProperties.txt) outside UNSAFE_CATEGORIES: characters
# that render as nothing, so they could hide text (Hangul fillers, variation selectors, the combining
# grapheme joiner, Khmer inherent vowels, Mongolian free variation selectors).
IGNORABLE_RANGES: Final = (
    (0x034F, 0x034F),
    (0x115F, 0x1160),
    (0x17B4, 0x17B5),
    (0x180B, 0x180D),
    (0x180F, 0x180F),
    (0x3164, 0x3164),
    (0xFE00, 0xFE0F),
    (0xFFA0, 0xFFA0),
    (0xE0000, 0xE0FFF),  # the tag block and its neighbours, whatever their category in this Python
)


@functools.cache
def unsafe_ranges() -> tuple[tuple[int, int], ...]:
    """Every non-ASCII code point the log escapes, as (first, last) ranges, by this Python's Unicode data.

    `str.isprintable()` is false exactly for UNSAFE_CATEGORIES (Python's own definition of printable; a test
    checks it code point by code point), which makes this a scan at C speed: about 0.1 s, once per process
    (the zygote's, before its first fork).
    """
    text = array.array("I", range(0x80, 0x110000)).tobytes().decode("utf-32-le", "surrogatepass")
    ranges: list[tuple[int, int]] = []
    code = 0x80
    for printable, run in itertools.groupby(map(str.isprintable, text)):
        n = sum(1 for _ in run)
        if not printable:
            ranges.append((code, code + n - 1))
        code += n
    for lo, hi in IGNORABLE_RANGES:
        ranges.append((lo, hi))
    merged: list[tuple[int, int]] = []
    for lo, hi in sorted(ranges):
        if merged and lo <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
        else:
            merged.append((lo, hi))
    return tuple(merged)


@functools.cache
def packed_unsafe_ranges() -> bytes:
    """unsafe_ranges() for Lua: each range as two 3-byte little-endian code points (string.unpack "<I3I3")."""
    return b"".join(lo.to_bytes(3, "little") + hi.to_bytes(3, "little") for lo, hi in unsafe_ranges())


# --- framing limits --------------------------------------------------------------------------------

# The largest frame a worker may send: a full send() plus envelope. Anything larger is a violation.
MAX_WORKER_FRAME: Final = SEND_MAX + 1024
# The start message carries the script; scripts larger than this are refused at discovery.
MAX_SCRIPT_BYTES: Final = 256 * 1024
MAX_BROKER_FRAME: Final = MAX_SCRIPT_BYTES + 4096
# One read from a pipe. A decoder holds at most one incomplete frame plus one read, so its buffer is
# sized for the largest frame PLUS a read: a read that completes one frame may carry the start of the
# next (dense workers batch frames of several sessions into one write).
READ_CHUNK: Final = 1 << 16
SLOT_PREFIX_MAX: Final = 9  # a msgpack integer's largest encoding
MAX_ARRAY: Final = 2 * FIELDS_MAX  # the longest array in a request: log's fields, a key and a value each


class ProtocolViolation(Exception):
    """A frame from a worker that breaks the contract. The broker ends that worker; nothing else."""


# One encoder for the process (msgpack.packb builds a Packer per call, 7 times the cost of a small frame's
# encoding). Packer.pack holds the GIL from start to end, and the broker packs on its one event loop.
_PACKER = msgpack.Packer(use_bin_type=True)


def pack(obj: Any) -> bytes:
    return _PACKER.pack(obj)


def _flat_list(items: list[Any]) -> list[Any]:
    # Requests carry scalars, and at most one level of arrays of scalars (deadend.log's fields). Refusing
    # deeper nesting as soon as an array is built, with every array at most MAX_ARRAY long, keeps a 1 MiB
    # frame of nested empty arrays from inflating into tens of MiB of Python lists first.
    for item in items:
        if isinstance(item, list) and any(isinstance(inner, list) for inner in item):
            raise ValueError("arrays nested more than one deep in a request")
    return items


def worker_unpacker() -> msgpack.Unpacker:
    """The broker's bounded reader for frames from a worker (hostile input)."""
    return msgpack.Unpacker(
        list_hook=_flat_list,
        raw=False,
        max_buffer_size=MAX_WORKER_FRAME + SLOT_PREFIX_MAX + READ_CHUNK,
        max_bin_len=SEND_MAX,
        max_str_len=64,
        max_array_len=MAX_ARRAY,
        max_map_len=0,
        max_ext_len=0,
        strict_map_key=True,
    )


def broker_unpacker() -> msgpack.Unpacker:
    """The worker's reader for frames from the broker (trusted, still bounded)."""
    return msgpack.Unpacker(
        raw=False, max_buffer_size=MAX_BROKER_FRAME + SLOT_PREFIX_MAX + READ_CHUNK, strict_map_key=True
    )


# --- the plain dialect: start, prepare/GO, done -------------------------------------------------------

READY: Final = ["ready"]
PREPARED: Final = ["prepared"]  # a worker in mode "prepare" compiled its script and waits for GO
GO: Final = "go"  # ["go", seed_hi, seed_lo]: the prepared worker's session begins

# How a session ended, as the worker reports it in its "done" frame.
DONE_KINDS: Final = ("return", "error", "instructions", "memory", "compile", "crash", "cpu")


class Mode(enum.Enum):
    """What a worker is doing with a Start message; which requests it may make depends on it."""

    RUN = "run"  # a session, from the top
    PREPARE = "prepare"  # compile, say PREPARED, run at GO: a warm worker ready for one script
    DENSE = "dense"  # a session in a worker shared by up to K (its Start says "run")
    COMPILE = "compile"  # compile only: does it compile?
    CHECK = "check"  # compile and send the chunk's bytecode (`deadend check`), never run it


START_MODES: Final = frozenset({Mode.RUN, Mode.PREPARE, Mode.COMPILE, Mode.CHECK})


@dataclass(frozen=True, slots=True)
class Start:
    """What a worker needs to run one session. It never opens anything itself."""

    mode: str  # a START_MODES value
    source: bytes
    chunkname: str  # e.g. "25.lua", used in Lua error messages
    seed: tuple[int, int]  # for math.randomseed; forked workers would otherwise share the PRNG
    memory: int  # bytes of Lua heap
    instructions: int  # VM instructions allowed between two API calls
    clock: bool  # expose the read-only os clock subset
    measure: bool = False  # `deadend audit`: report the session's usage (a "usage" request) before "done"

    def to_frame(self) -> list[Any]:
        # Field by field: dataclasses.asdict deep-copies every value, the script's source included. Every
        # field, from the class itself: one added later travels without another line here.
        fields = {name: getattr(self, name) for name in _START_FIELDS}
        fields["seed"] = list(self.seed)
        return ["start", fields]

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
            measure=f.get("measure", False),
        )
        if (
            start.mode not in {m.value for m in START_MODES}
            or not isinstance(start.source, bytes)
            or not isinstance(start.chunkname, str)
            or not isinstance(start.memory, int)
            or not isinstance(start.instructions, int)
            or not isinstance(start.clock, bool)
            or not isinstance(start.measure, bool)
        ):
            raise ValueError("malformed start frame")
        return start


_START_FIELDS: Final = tuple(f.name for f in dataclasses.fields(Start))


def go_frame(seed: tuple[int, int]) -> list[Any]:
    return [GO, *seed]


def is_go(frame: Any) -> bool:
    return (
        isinstance(frame, list)
        and len(frame) == 3
        and frame[0] == GO
        and all(type(v) is int for v in frame[1:])
    )


# --- the dense dialect: slot-prefixed frames ---------------------------------------------------------

ABORT: Final = ["abort"]  # the broker's "end this session now", in place of a reply
ABORTED: Final = ["done", "aborted", b""]  # only as the answer to ABORT: not a DONE_KINDS kind


def pack_slot(slot: int, obj: Any) -> bytes:
    """One dense frame: its slot number, then the frame."""
    return pack(slot) + pack(obj)


class SlotReader:
    """Both ends' reader of dense frames: yields (slot, frame) pairs from an unpacker fed with pipe bytes.

    A slot number read before its frame has arrived is kept until the frame does. `pending_slot` is that
    number: a decoding error while it is set happened inside that slot's frame (the broker blames it).
    """

    def __init__(self, unpacker: msgpack.Unpacker) -> None:
        self.unpacker = unpacker
        self.pending_slot: int | None = None

    def feed(self, data: bytes) -> None:
        self.unpacker.feed(data)

    def __iter__(self) -> Iterator[tuple[int, Any]]:
        for obj in self.unpacker:
            if self.pending_slot is None:
                if type(obj) is not int:
                    raise ProtocolViolation("a dense frame without its slot number")
                self.pending_slot = obj
                continue
            slot = self.pending_slot
            yield slot, obj
            self.pending_slot = None  # only now: an error while routing this frame still names the slot


# --- requests from a worker: the one table ---------------------------------------------------------


class Request(NamedTuple):
    # A named tuple: a frozen dataclass's __init__ costs as much as the checks of parse_request.
    op: str
    args: tuple[Any, ...]


def _is_int(v: Any) -> bool:
    # bool is an int subclass in Python; msgpack keeps them apart, so must we.
    return type(v) is int


def _int_in(v: Any, lo: int, hi: int) -> bool:
    return _is_int(v) and lo <= v <= hi


def _check_send(a: tuple[Any, ...]) -> bool:
    return type(a[0]) is bytes and len(a[0]) <= SEND_MAX


def _check_recv(a: tuple[Any, ...]) -> bool:
    return _int_in(a[0], RECV_MIN, RECV_MAX)


def _check_sleep(a: tuple[Any, ...]) -> bool:
    return _int_in(a[0], 0, SLEEP_MAX_MS)


def _check_none(a: tuple[Any, ...]) -> bool:
    return True


def _check_field_value(v: Any) -> bool:
    # Lua integers are 64-bit and msgpack keeps them so; strings come one byte past the cap, as messages.
    return type(v) is bool or _is_int(v) or (type(v) is bytes and len(v) <= FIELD_MAX + 1)


def _check_fields(pairs: Any) -> bool:
    """[key, value, key, value, ...]: at most FIELDS_MAX pairs, keys distinct and well formed."""
    if type(pairs) is not list or len(pairs) % 2 or len(pairs) > 2 * FIELDS_MAX:
        return False
    keys = pairs[0::2]
    return (
        all(type(k) is bytes and FIELD_KEY.fullmatch(k) for k in keys)
        and len(set(keys)) == len(keys)
        and all(_check_field_value(v) for v in pairs[1::2])
    )


def _check_log(a: tuple[Any, ...]) -> bool:
    # The worker sends at most LOG_MAX + 1 bytes so the broker can tell a cut message from a full one.
    return type(a[0]) is bytes and len(a[0]) <= LOG_MAX + 1 and a[1] in LOG_LEVELS and _check_fields(a[2])


def _check_tarpit(a: tuple[Any, ...]) -> bool:
    return all(_int_in(v, 0, TARPIT_MAX_MS) for v in a)


def _check_limits(a: tuple[Any, ...]) -> bool:
    return all(_int_in(v, 0, LIMIT_MAX) for v in a)


def _check_usage(a: tuple[Any, ...]) -> bool:
    return all(_int_in(v, 0, LIMIT_MAX) for v in a)


def check_alpn(value: Any) -> bool:
    """starttls's argument: empty (select none), or protocol names as described at ALPN_MAX."""
    if type(value) is not bytes or len(value) > ALPN_MAX:
        return False
    return not value or all(
        name and all(0x21 <= c <= 0x7E and c != 0x2C for c in name) for name in value.split(b",")
    )


def _check_starttls(a: tuple[Any, ...]) -> bool:
    return check_alpn(a[0])


def _check_dump(a: tuple[Any, ...]) -> bool:
    return type(a[0]) is bytes


def _check_done(a: tuple[Any, ...]) -> bool:
    return a[0] in DONE_KINDS and type(a[1]) is bytes and len(a[1]) <= LOG_MAX + 1


SESSION: Final = frozenset({Mode.RUN, Mode.PREPARE, Mode.DENSE})  # a script runs: its API
EVERY_MODE: Final = frozenset(Mode)


@dataclass(frozen=True, slots=True)
class RequestRow:
    """One request a worker may make (OpenSSH's monitor table: type, where permitted, how checked)."""

    name: str
    arity: int  # arguments after the name; the worker trims Lua's trailing nils to this
    check: Callable[[tuple[Any, ...]], bool]  # the arguments' types and ranges (the count is checked first)
    modes: frozenset[Mode]  # where the request is permitted; anywhere else it is a violation
    # Connection I/O: once the connection is closed (or, for recv, the peer finished sending) it is
    # answered as failed and counted against --linger-calls. Every other request keeps working.
    io: bool = False


REQUESTS: Final = (
    RequestRow("send", 1, _check_send, SESSION, io=True),
    RequestRow("recv", 1, _check_recv, SESSION, io=True),
    RequestRow("sleep", 1, _check_sleep, SESSION),
    RequestRow("get_ip", 0, _check_none, SESSION),
    RequestRow("log", 3, _check_log, SESSION),
    RequestRow("set_tarpit", 2, _check_tarpit, SESSION),
    RequestRow("set_limits", 2, _check_limits, SESSION),
    RequestRow("close", 0, _check_none, SESSION),
    # The broker's TLS handshake on the client connection. A second one in a session is a violation: the
    # bootstrap refuses it with an argument error and never sends it (SPEC.md).
    RequestRow("starttls", 1, _check_starttls, SESSION, io=True),
    RequestRow("tls_info", 0, _check_none, SESSION),
    # `deadend audit` (a Start with measure set): the session's peak Lua heap in bytes, its instructions
    # (counted as the budget counts them) and its CPU time in microseconds, once, just before "done".
    RequestRow("usage", 3, _check_usage, frozenset({Mode.RUN})),
    RequestRow("dump", 1, _check_dump, frozenset({Mode.CHECK})),  # the compiled chunk, for `deadend check`
    RequestRow("done", 2, _check_done, EVERY_MODE),
)
ROWS: Final = {row.name: row for row in REQUESTS}
# The `deadend.*` functions of SPEC.md: the requests only a running script makes.
API_FUNCTIONS: Final = tuple(row.name for row in REQUESTS if row.modes == SESSION)


def parse_request(frame: Any, mode: Mode) -> Request:
    """Validate one frame from a worker in `mode` against the request table, or raise ProtocolViolation."""
    if not isinstance(frame, list) or not frame:
        raise ProtocolViolation(f"frame is not a request array ({type(frame).__name__})")
    op = frame[0]
    row = ROWS.get(op) if isinstance(op, str) else None
    if row is None:
        raise ProtocolViolation(f"unknown request {str(op)[:32]!r}")
    if mode not in row.modes:
        raise ProtocolViolation(f"{op!r} is not permitted in {mode.value} mode")
    args = tuple(frame[1:])
    if len(args) != row.arity or not row.check(args):
        raise ProtocolViolation(f"bad arguments to {op!r}")
    return Request(op, args)


# --- the supervisor (--brokers): broker i of N learns its place and its control socket ------------------

SUPERVISED_ENV: Final = "DEADEND_SUPERVISED"  # "index/count/control_fd/supervisor_pid", set by the supervisor
SUPERVISOR_FDS_MAX: Final = 200  # descriptors per listeners message (the kernel takes at most 253)
SUPERVISOR_CHUNK: Final = 32 << 10  # bytes of metrics text per message (a datagram stays small)


@dataclass(frozen=True, slots=True)
class Supervised:
    """A broker's place under the supervisor: which of how many, and where to talk to it."""

    index: int
    count: int
    control_fd: int
    supervisor_pid: int

    def encode(self) -> str:
        return f"{self.index}/{self.count}/{self.control_fd}/{self.supervisor_pid}"

    @classmethod
    def decode(cls, text: str) -> Supervised:
        parts = text.split("/")
        if len(parts) != 4 or not all(p.isdigit() for p in parts):
            raise ValueError(f"malformed {SUPERVISED_ENV}")
        index, count, fd, pid = (int(p) for p in parts)
        if not 0 <= index < count:
            raise ValueError(f"malformed {SUPERVISED_ENV}")
        return cls(index, count, fd, pid)


# --- the zygote: its configuration and its control messages ------------------------------------------

ZYGOTE_MODULE: Final = "sandbox.zygote"
LAUNCHER_MODULE: Final = "sandbox.launcher"
# A zygote's (and so every worker's) whole environment: nothing of the broker's, whose environment may hold
# tokens and credentials. TZ is read by the C library (the clock option's dates are UTC); nothing in the
# sandbox runs a program, so there is no PATH.
ZYGOTE_ENV: Final = {"TZ": "UTC"}


@dataclass(frozen=True, slots=True)
class ZygoteConfig:
    """What a zygote (or the launcher, which starts zygotes) is started with: its one argument, as JSON.

    The launcher dialect, on a SOCK_SEQPACKET socketpair like the zygote's:
        broker -> launcher   ["spawn"] + fds [zygote's control socket end, zygote's stderr]
        launcher -> broker   ["spawned", pid] | ["spawn-failed", reason]
        launcher -> broker   ["exited", pid, wait_status]
    The launcher fills in parent_pid and control_fd itself and always uses its own run_as: the broker,
    which handles attacker data, cannot ask it for a zygote with more privileges.
    """

    parent_pid: int  # who exec'd it: it dies with that process, and refuses to start if already orphaned
    control_fd: int  # its end of the control socket
    libraries: dict[str, str]  # shared libraries resolved by the broker (no ldconfig fork in the zygote)
    run_as: tuple[int, int] | None  # switch to this uid, gid before the first fork
    isolation_off: tuple[str, ...] = ()  # layers left out: bench/isolation.py's measurements only

    def encode(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def decode(cls, text: str) -> ZygoteConfig:
        f = json.loads(text)
        run_as = f["run_as"]
        config = cls(
            parent_pid=f["parent_pid"],
            control_fd=f["control_fd"],
            libraries=f["libraries"],
            run_as=(int(run_as[0]), int(run_as[1])) if run_as else None,
            isolation_off=tuple(str(name) for name in f.get("isolation_off", ())),
        )
        if not (
            _is_int(config.parent_pid)
            and _is_int(config.control_fd)
            and isinstance(config.libraries, dict)
            and all(isinstance(k, str) and isinstance(v, str) for k, v in config.libraries.items())
        ):
            raise ValueError("malformed zygote configuration")
        return config


# The zygote's isolation report, in its "hello": every layer it applied before its first fork, in order
# (sandbox/isolation.py), and why each one it skipped was refused. The names of the namespaces are the
# kernel's own (/proc/PID/ns/NAME).
LAYERS: Final = ("environment", "user", "ipc", "net", "mnt", "pid", "landlock", "capabilities")
LAYER_REASON_MAX: Final = 200  # a reason is one short line; anything longer is cut


@dataclass(frozen=True, slots=True)
class Layer:
    name: str
    skipped: str = ""  # why it was not applied; empty when it was

    @property
    def applied(self) -> bool:
        return not self.skipped


def layers_to_wire(layers: list[Layer]) -> list[list[str]]:
    return [[layer.name, layer.skipped] for layer in layers]


def layers_from_wire(obj: Any) -> list[Layer]:
    """The layers of a hello message; ValueError for anything that is not a list of [name, reason]."""
    if not isinstance(obj, list) or len(obj) > len(LAYERS):
        raise ValueError("layer report is not a short list")
    layers = []
    for item in obj:
        if not (isinstance(item, list) and len(item) == 2 and all(isinstance(v, str) for v in item)):
            raise ValueError("layer entry is not [name, reason]")
        if item[0] not in LAYERS:
            raise ValueError(f"unknown layer {item[0][:40]!r}")
        layers.append(Layer(item[0], item[1][:LAYER_REASON_MAX]))
    return layers


@dataclass(frozen=True, slots=True)
class ForkRequest:
    """One worker to fork, and how it is confined (each pool forks its own kind from the one zygote)."""

    address_space: int  # RLIMIT_AS, bytes
    cpu_seconds: int  # RLIMIT_CPU, seconds (SIGXCPU at the soft limit)
    dense_session_cpu: float | None = None  # a dense worker meters each session's CPU; None: plain worker

    def to_message(self) -> bytes:
        fields = {
            "address_space": self.address_space,
            "cpu_seconds": self.cpu_seconds,
            "dense_session_cpu": self.dense_session_cpu,
        }
        return pack(["fork", fields])

    @classmethod
    def from_fields(cls, f: Any) -> ForkRequest:
        request = cls(f["address_space"], f["cpu_seconds"], f["dense_session_cpu"])
        if not (
            _is_int(request.address_space)
            and _is_int(request.cpu_seconds)
            and (request.dense_session_cpu is None or isinstance(request.dense_session_cpu, int | float))
        ):
            raise ValueError("malformed fork request")
        return request


def kill_message(pid: int) -> bytes:
    """A worker whose descriptors the broker could not receive: only its parent can kill it safely."""
    return pack(["kill", pid])


# --- the reply to tls_info -------------------------------------------------------------------------

# A Lua table cannot cross the pipe (nothing but bytes, integers, booleans and nil does), so the broker
# packs the table's fields into one string and the bootstrap unpacks it with Lua's string.unpack, in this
# format: version, cipher, ja4, ja3 and the selected ALPN protocol as `s1` strings; a byte 1 or 0 for
# whether an SNI came, then the SNI as `s2`; the number of ALPN offers as a byte, then each as `s1`.
TLS_INFO_FORMAT: Final = ">s1s1s1s1s1Bs2B"  # Lua's string.pack notation; Python's struct has no `s1`


def pack_tls_info(
    version: str, cipher: str, ja4: str, ja3: str, selected: str, sni: bytes | None, alpn: tuple[bytes, ...]
) -> bytes:
    """The tls_info reply; every field fits its length prefix (the caller bounds sni and alpn)."""
    out = bytearray()
    for text in (version, cipher, ja4, ja3, selected):
        raw = text.encode("ascii")
        out += bytes([len(raw)]) + raw
    out += b"\x01" if sni is not None else b"\x00"
    out += len(sni or b"").to_bytes(2, "big") + (sni or b"")
    out.append(len(alpn))
    for name in alpn:
        out += bytes([len(name)]) + name
    return bytes(out)


def unpack_tls_info(blob: bytes) -> dict[str, Any]:
    """The bootstrap's reading of a tls_info reply, in Python (for tests): the table a script gets."""
    fields: dict[str, Any] = {}
    pos = 0

    def take(width: int) -> bytes:
        nonlocal pos
        n = int.from_bytes(blob[pos : pos + width], "big")
        pos += width + n
        return blob[pos - n : pos]

    for name in ("version", "cipher", "ja4", "ja3", "alpn_selected"):
        fields[name] = take(1)
    has_sni = blob[pos]
    pos += 1
    sni = take(2)
    fields["sni"] = sni if has_sni else None
    count = blob[pos]
    pos += 1
    fields["alpn"] = [take(1) for _ in range(count)]
    if not fields["alpn_selected"]:
        fields["alpn_selected"] = None
    return fields


# --- the Lua side ----------------------------------------------------------------------------------


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
        "FIELDS_MAX": FIELDS_MAX,
        "FIELD_MAX": FIELD_MAX,
        "FIELD_KEY_MAX": FIELD_KEY_MAX,
        "ALPN_MAX": ALPN_MAX,
        # "_G" and "print" are built by the bootstrap itself; the rest are copied from the real state
        "BASE_NAMES": ",".join(name for name in BASE_FUNCTIONS if name not in ("setmetatable", "xpcall")),
    }
