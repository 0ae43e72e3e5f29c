"""Static analysis of compiled Lua 5.4 chunks, for `deadend check`.

A script is compiled inside a locked-down sandbox child, which hands back `string.dump(fn)` of the main
chunk (with debug information). This module, on the trusted side, parses that binary chunk (the format
written by Lua 5.4.8's `ldump.c`) and walks the instructions of every function to report what the script
touches: the globals it reads and writes, the `deadend.*` functions it uses, the fields of global tables it
accesses (`string.dump`, `os.execute`), the method names it calls (`("x"):dump()`), and the globals whose
presence it tests (`type(os)`, `if os then`: a script that guards the optional clock).

The dump is treated as hostile: anything malformed, truncated or absurdly large raises `BytecodeError`,
and both parsing and analysis run in time linear in the size of the dump.

What counts as a global follows Lua's own error messages (`ldebug.c`): an access is to a global when the
indexed table is a variable named `_ENV` (an upvalue or a local of that name), or a value copied from one.
The main chunk's first upvalue is the environment even without debug names, and what a closure captures
is followed into it, so a stripped dump still yields its globals (without lines).

Register contents (the environment, the value of a global, a string constant) are tracked by a single
linear pass over each function, without following jumps, and handed to closures through their upvalues.
So an alias (`local d = deadend; d.send(x)`, also inside a nested function) is seen when its definition
comes before its use in the code; a value that reaches a use only around a loop back edge is not, and one
assigned in a branch may be credited to code in a sibling branch (a possible use is reported rather than
missed). `_G.NAME` is taken to be the global NAME when followed by a field (`_G.string.dump`).
Indexing with a computed key (`string["du" .. "mp"]`, `_ENV[name]`) cannot be resolved and is listed in
`Analysis.dynamic_indexes` instead; values passed through calls, tables or `load` are not followed.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Final, NamedTuple, TypeAlias


class BytecodeError(ValueError):
    """The dump is not a well-formed Lua 5.4 binary chunk (or exceeds the analyzer's bounds)."""


# --- format constants (lundump.h, lopcodes.h, llimits.h of Lua 5.4.8) -------------------------------------

SIGNATURE: Final = b"\x1bLua"
VERSION: Final = 0x54
FORMAT: Final = 0
LUAC_DATA: Final = b"\x19\x93\r\n\x1a\n"
LUAC_INT: Final = 0x5678
LUAC_NUM: Final = 370.5
HEADER: Final = (
    SIGNATURE
    + bytes([VERSION, FORMAT])
    + LUAC_DATA
    + bytes([4, 8, 8])
    + struct.pack("<q", LUAC_INT)
    + struct.pack("<d", LUAC_NUM)
)

TAG_NIL: Final = 0x00
TAG_FALSE: Final = 0x01
TAG_TRUE: Final = 0x11
TAG_INT: Final = 0x03
TAG_FLOAT: Final = 0x13
TAG_SHORT_STR: Final = 0x04
TAG_LONG_STR: Final = 0x14

ABSLINEINFO: Final = -0x80  # lineinfo marker: the line of this instruction is in abslineinfo
INT_MAX: Final = 2**31 - 1
MAXUPVAL: Final = 255

# Bounds on what the analyzer accepts; the real compiler stays far below all of them for any script that
# fits the size limits, and they keep a hostile dump from costing more than linear work.
MAX_INSTRUCTIONS: Final = 1_000_000  # all functions together
MAX_CONSTANTS: Final = 1_000_000
MAX_PROTOS: Final = 1_000_000
MAX_DEBUG_ENTRIES: Final = 1_000_000  # abslineinfo entries and local variables, all functions together
MAX_DEPTH: Final = 200  # nesting of functions


class Op(IntEnum):
    """Lua 5.4 opcodes, in the order of `lopcodes.h` (the numbering is checked against real dumps)."""

    MOVE = 0
    LOADI = 1
    LOADF = 2
    LOADK = 3
    LOADKX = 4
    LOADFALSE = 5
    LFALSESKIP = 6
    LOADTRUE = 7
    LOADNIL = 8
    GETUPVAL = 9
    SETUPVAL = 10
    GETTABUP = 11
    GETTABLE = 12
    GETI = 13
    GETFIELD = 14
    SETTABUP = 15
    SETTABLE = 16
    SETI = 17
    SETFIELD = 18
    NEWTABLE = 19
    SELF = 20
    ADDI = 21
    ADDK = 22
    SUBK = 23
    MULK = 24
    MODK = 25
    POWK = 26
    DIVK = 27
    IDIVK = 28
    BANDK = 29
    BORK = 30
    BXORK = 31
    SHRI = 32
    SHLI = 33
    ADD = 34
    SUB = 35
    MUL = 36
    MOD = 37
    POW = 38
    DIV = 39
    IDIV = 40
    BAND = 41
    BOR = 42
    BXOR = 43
    SHL = 44
    SHR = 45
    MMBIN = 46
    MMBINI = 47
    MMBINK = 48
    UNM = 49
    BNOT = 50
    NOT = 51
    LEN = 52
    CONCAT = 53
    CLOSE = 54
    TBC = 55
    JMP = 56
    EQ = 57
    LT = 58
    LE = 59
    EQK = 60
    EQI = 61
    LTI = 62
    LEI = 63
    GTI = 64
    GEI = 65
    TEST = 66
    TESTSET = 67
    CALL = 68
    TAILCALL = 69
    RETURN = 70
    RETURN0 = 71
    RETURN1 = 72
    FORLOOP = 73
    FORPREP = 74
    TFORPREP = 75
    TFORCALL = 76
    TFORLOOP = 77
    SETLIST = 78
    CLOSURE = 79
    VARARG = 80
    VARARGPREP = 81
    EXTRAARG = 82


NUM_OPCODES: Final = len(Op)
OFFSET_SBX: Final = (2**17 - 1) >> 1
OFFSET_SJ: Final = (2**25 - 1) >> 1
OFFSET_SC: Final = 0xFF >> 1


class Instruction(NamedTuple):
    """One decoded instruction; every field is extracted, the opcode says which are meaningful."""

    raw: int
    op: Op
    a: int
    k: int
    b: int
    c: int

    @property
    def bx(self) -> int:
        return self.raw >> 15

    @property
    def sbx(self) -> int:
        return self.bx - OFFSET_SBX

    @property
    def sb(self) -> int:
        return self.b - OFFSET_SC

    @property
    def sc(self) -> int:
        return self.c - OFFSET_SC

    @property
    def ax(self) -> int:
        return self.raw >> 7

    @property
    def sj(self) -> int:
        return self.ax - OFFSET_SJ


def decode(ins: int) -> Instruction:
    """Split a 32-bit instruction into its fields (iABC, iABx, iAsBx, iAx and isJ share the layout)."""
    op = ins & 0x7F
    if op >= NUM_OPCODES:
        raise BytecodeError(f"unknown opcode {op}")
    return Instruction(
        ins, Op(op), (ins >> 7) & 0xFF, (ins >> 15) & 1, (ins >> 16) & 0xFF, (ins >> 24) & 0xFF
    )


# --- the parsed chunk --------------------------------------------------------------------------------------

Constant: TypeAlias = "bool | int | float | bytes | None"


@dataclass(frozen=True, slots=True)
class Upvalue:
    instack: bool  # captures a register (local) of the enclosing function, else one of its upvalues
    idx: int
    kind: int
    name: bytes | None  # None without debug information


@dataclass(frozen=True, slots=True)
class LocVar:
    name: bytes | None
    startpc: int  # first instruction where the variable is active
    endpc: int  # first instruction where it is dead


@dataclass(frozen=True, slots=True, eq=False)
class Proto:
    """One function of the chunk, as `lundump.c` would load it (strings are raw bytes)."""

    source: bytes | None  # nested functions inherit their parent's source, as in `lundump.c`
    linedefined: int
    lastlinedefined: int
    numparams: int
    is_vararg: int
    maxstacksize: int
    code: tuple[int, ...]
    constants: tuple[Constant, ...]
    upvalues: tuple[Upvalue, ...]
    protos: tuple[Proto, ...]
    lineinfo: bytes  # raw signed deltas, one per instruction (empty when stripped)
    abslineinfo: tuple[tuple[int, int], ...]  # (pc, line)
    locvars: tuple[LocVar, ...]
    has_upvalue_names: bool
    lines: tuple[int, ...]  # source line of every instruction, -1 when there is no line information

    def instructions(self) -> list[Instruction]:
        return [decode(i) for i in self.code]

    def walk(self) -> list[Proto]:
        """This function and every function nested in it, depth first."""
        out: list[Proto] = []
        stack: list[Proto] = [self]
        while stack:
            p = stack.pop()
            out.append(p)
            stack.extend(reversed(p.protos))
        return out


class _Reader:
    __slots__ = ("constants", "data", "debug", "instructions", "pos", "protos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0
        self.instructions = 0
        self.constants = 0
        self.protos = 0
        self.debug = 0

    def need(self, n: int, what: str) -> None:
        if n > len(self.data) - self.pos:
            raise BytecodeError(f"truncated dump ({what} at offset {self.pos})")

    def byte(self) -> int:
        self.need(1, "byte")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def take(self, n: int) -> bytes:
        self.need(n, "bytes")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def unsigned(self, limit: int) -> int:
        """`loadUnsigned`: MSB-first groups of 7 bits, the last byte marked by 0x80."""
        x = 0
        limit >>= 7
        while True:
            b = self.byte()
            if x >= limit:
                raise BytecodeError(f"integer overflow at offset {self.pos - 1}")
            x = (x << 7) | (b & 0x7F)
            if b & 0x80:
                return x

    def int_(self) -> int:
        return self.unsigned(INT_MAX)

    def count(self, min_bytes_each: int, what: str) -> int:
        """A vector length, refused when the rest of the dump cannot possibly hold that many entries."""
        n = self.int_()
        self.need(n * min_bytes_each, what)
        return n

    def string(self) -> bytes | None:
        size = self.unsigned(2**63)
        if size == 0:
            return None
        return self.take(size - 1)

    def header(self) -> None:
        if self.take(min(len(HEADER), len(self.data))) != HEADER:
            if not self.data.startswith(SIGNATURE):
                raise BytecodeError("not a binary chunk")
            raise BytecodeError("not a Lua 5.4 binary chunk of this platform (header mismatch)")

    def function(self, psource: bytes | None, depth: int) -> Proto:
        if depth > MAX_DEPTH:
            raise BytecodeError(f"functions nested deeper than {MAX_DEPTH}")
        source = self.string()
        if source is None:
            source = psource
        linedefined = self.int_()
        lastlinedefined = self.int_()
        numparams = self.byte()
        is_vararg = self.byte()
        maxstacksize = self.byte()

        n = self.count(4, "code")
        self.instructions += n
        if self.instructions > MAX_INSTRUCTIONS:
            raise BytecodeError(f"more than {MAX_INSTRUCTIONS} instructions")
        code = struct.unpack_from(f"<{n}I", self.data, self.pos)
        self.pos += 4 * n

        n = self.count(1, "constants")
        self.constants += n
        if self.constants > MAX_CONSTANTS:
            raise BytecodeError(f"more than {MAX_CONSTANTS} constants")
        constants = tuple(self.constant() for _ in range(n))

        n = self.count(3, "upvalues")
        if n > MAXUPVAL:
            raise BytecodeError(f"more than {MAXUPVAL} upvalues")
        updesc = [(self.byte(), self.byte(), self.byte()) for _ in range(n)]

        n = self.count(1, "protos")
        self.protos += n
        if self.protos > MAX_PROTOS:
            raise BytecodeError(f"more than {MAX_PROTOS} functions")
        protos = tuple(self.function(source, depth + 1) for _ in range(n))

        n = self.count(1, "lineinfo")
        if n not in (0, len(code)):
            raise BytecodeError("line information does not match the code")
        lineinfo = self.take(n)
        n = self.count(2, "abslineinfo")
        self.debug += n
        if self.debug > MAX_DEBUG_ENTRIES:
            raise BytecodeError(f"more than {MAX_DEBUG_ENTRIES} debug entries")
        abslineinfo = tuple((self.int_(), self.int_()) for _ in range(n))
        n = self.count(3, "locvars")
        self.debug += n
        if self.debug > MAX_DEBUG_ENTRIES:
            raise BytecodeError(f"more than {MAX_DEBUG_ENTRIES} debug entries")
        locvars = tuple(LocVar(self.string(), self.int_(), self.int_()) for _ in range(n))
        n = self.count(1, "upvalue names")
        if n not in (0, len(updesc)):
            raise BytecodeError("upvalue names do not match the upvalues")
        names: list[bytes | None] = [self.string() for _ in range(n)] or [None] * len(updesc)
        upvalues = tuple(
            Upvalue(bool(instack), idx, kind, name)
            for (instack, idx, kind), name in zip(updesc, names, strict=True)
        )

        proto = Proto(
            source=source,
            linedefined=linedefined,
            lastlinedefined=lastlinedefined,
            numparams=numparams,
            is_vararg=is_vararg,
            maxstacksize=maxstacksize,
            code=code,
            constants=constants,
            upvalues=upvalues,
            protos=protos,
            lineinfo=lineinfo,
            abslineinfo=abslineinfo,
            locvars=locvars,
            has_upvalue_names=n != 0,
            lines=_lines(linedefined, code, lineinfo, abslineinfo),
        )
        _check_operands(proto)
        return proto

    def constant(self) -> Constant:
        tag = self.byte()
        if tag == TAG_NIL:
            return None
        if tag == TAG_FALSE:
            return False
        if tag == TAG_TRUE:
            return True
        if tag == TAG_INT:
            return int.from_bytes(self.take(8), "little", signed=True)
        if tag == TAG_FLOAT:
            value: float = struct.unpack("<d", self.take(8))[0]
            return value
        if tag in (TAG_SHORT_STR, TAG_LONG_STR):
            s = self.string()
            if s is None:
                raise BytecodeError("bad format for constant string")
            return s
        raise BytecodeError(f"unknown constant tag 0x{tag:02x}")


def _lines(
    linedefined: int, code: tuple[int, ...], lineinfo: bytes, abslineinfo: tuple[tuple[int, int], ...]
) -> tuple[int, ...]:
    """The line of every instruction, as `luaG_getfuncline` computes it one pc at a time."""
    if not lineinfo:
        return (-1,) * len(code)
    last = -1
    for pc, _ in abslineinfo:
        if not last < pc < len(code):
            raise BytecodeError("absolute line information out of order")
        last = pc
    deltas = struct.unpack(f"{len(lineinfo)}b", lineinfo)
    out: list[int] = []
    line = linedefined
    nxt = 0  # next abslineinfo entry
    for pc, delta in enumerate(deltas):
        if nxt < len(abslineinfo) and abslineinfo[nxt][0] == pc:
            line = abslineinfo[nxt][1]
            nxt += 1
        else:
            line += delta
        out.append(line)
    return tuple(out)


def _check_operands(p: Proto) -> None:
    """Refuse the operands the analysis relies on when they point outside their tables."""
    nk, nup, np, ncode = len(p.constants), len(p.upvalues), len(p.protos), len(p.code)
    for pc, ins in enumerate(p.code):
        op = ins & 0x7F
        if op >= NUM_OPCODES:
            raise BytecodeError(f"unknown opcode {op} at pc {pc}")
        a, b, c, bx = (ins >> 7) & 0xFF, (ins >> 16) & 0xFF, (ins >> 24) & 0xFF, ins >> 15
        k = (ins >> 15) & 1
        bad = False
        if op == Op.LOADK:
            bad = bx >= nk
        elif op == Op.LOADKX:
            bad = pc + 1 >= ncode or p.code[pc + 1] & 0x7F != Op.EXTRAARG or p.code[pc + 1] >> 7 >= nk
        elif op in (Op.GETUPVAL, Op.SETUPVAL):
            bad = b >= nup
        elif op == Op.GETTABUP:
            bad = b >= nup or c >= nk
        elif op == Op.SETTABUP:
            bad = a >= nup or b >= nk
        elif op == Op.GETFIELD:
            bad = c >= nk
        elif op == Op.SETFIELD:
            bad = b >= nk
        elif op == Op.SELF:
            bad = bool(k) and c >= nk
        elif op == Op.CLOSURE:
            bad = bx >= np
        if bad:
            raise BytecodeError(f"operand out of range in {Op(op).name} at pc {pc}")


def parse(dump: bytes) -> Proto:
    """Parse a binary chunk written by `string.dump` of Lua 5.4.8 (64-bit integers and floats)."""
    if not isinstance(dump, bytes | bytearray | memoryview):
        raise BytecodeError("a dump is bytes")
    r = _Reader(bytes(dump))
    r.header()
    nupvalues = r.byte()
    main = r.function(None, 0)
    if len(main.upvalues) != nupvalues:
        raise BytecodeError("upvalue count of the main function does not match the header")
    if r.pos != len(r.data):
        raise BytecodeError(f"{len(r.data) - r.pos} bytes of trailing data")
    return main


# --- the analysis ------------------------------------------------------------------------------------------

# What the linear pass knows a register (or upvalue) holds: the environment, the value of a global, or a
# string constant. None: anything else, or unknown.
_Value: TypeAlias = "tuple[str, str] | None"
_ENV: Final = ("env", "")
_ENV_NAME: Final = b"_ENV"
_NO_WRITE: Final = frozenset(
    {
        Op.SETTABUP,
        Op.SETTABLE,
        Op.SETI,
        Op.SETFIELD,
        Op.MMBIN,
        Op.MMBINI,
        Op.MMBINK,
        Op.CLOSE,
        Op.TBC,
        Op.JMP,
        Op.EQ,
        Op.LT,
        Op.LE,
        Op.EQK,
        Op.EQI,
        Op.LTI,
        Op.LEI,
        Op.GTI,
        Op.GEI,
        Op.TEST,
        Op.RETURN,
        Op.RETURN0,
        Op.RETURN1,
        Op.TFORPREP,
        Op.SETLIST,
        Op.VARARGPREP,
        Op.EXTRAARG,
    }
)


@dataclass(slots=True)
class Analysis:
    """What a chunk touches; every list holds the distinct source lines, ascending (-1: no line info)."""

    global_reads: dict[str, list[int]] = field(default_factory=dict)
    global_writes: dict[str, list[int]] = field(default_factory=dict)
    deadend_calls: dict[str, list[int]] = field(default_factory=dict)  # deadend.NAME, called or not
    field_uses: dict[tuple[str, str], list[int]] = field(default_factory=dict)  # GLOBAL.FIELD, read or write
    method_names: dict[str, list[int]] = field(default_factory=dict)  # x:NAME(), and ("literal").NAME
    # "_ENV", or the global whose value was indexed, with a key that is not a constant string
    dynamic_indexes: dict[str, list[int]] = field(default_factory=dict)
    # globals whose presence is tested: `type(NAME)`, or NAME as a condition (`if os then`, `os and ...`)
    guards: dict[str, list[int]] = field(default_factory=dict)
    functions: int = 0


def name_of(raw: bytes) -> str:
    """A Lua string as a `str` (invalid UTF-8 escaped; control characters are left to the reporter)."""
    return raw.decode("utf-8", "backslashreplace")


class _Collector:
    def __init__(self) -> None:
        self.reads: dict[str, set[int]] = {}
        self.writes: dict[str, set[int]] = {}
        self.deadend: dict[str, set[int]] = {}
        self.fields: dict[tuple[str, str], set[int]] = {}
        self.methods: dict[str, set[int]] = {}
        self.dynamic: dict[str, set[int]] = {}
        self.guards: dict[str, set[int]] = {}

    def guard(self, value: _Value, line: int) -> None:
        """`value` is tested (passed to `type`, or used as a condition): a test of a global's presence."""
        if value is not None and value[0] == "global":
            self.guards.setdefault(value[1], set()).add(line)

    def index(self, obj: _Value, key: str | None, line: int, write: bool) -> _Value:
        """Record `obj[key]` (a read, or a write when `write`); the value a read yields, when known."""
        if obj is None:
            return None
        kind, name = obj
        if kind == "env":
            if key is None:
                self.dynamic.setdefault("_ENV", set()).add(line)
                return None
            (self.writes if write else self.reads).setdefault(key, set()).add(line)
            return None if write else ("global", key)
        if kind == "global":
            if key is None:
                self.dynamic.setdefault(name, set()).add(line)
                return None
            self.fields.setdefault((name, key), set()).add(line)
            if name == "deadend":
                self.deadend.setdefault(key, set()).add(line)
            if name == "_G" and not write:
                return ("global", key)
            return None
        if kind == "str" and key is not None and not write:
            self.methods.setdefault(key, set()).add(line)
        return None

    def result(self, functions: int) -> Analysis:
        def done(d: dict[str, set[int]]) -> dict[str, list[int]]:
            return {k: sorted(d[k]) for k in sorted(d)}

        return Analysis(
            global_reads=done(self.reads),
            global_writes=done(self.writes),
            deadend_calls=done(self.deadend),
            field_uses={k: sorted(self.fields[k]) for k in sorted(self.fields)},
            method_names=done(self.methods),
            dynamic_indexes=done(self.dynamic),
            guards=done(self.guards),
            functions=functions,
        )


def _env_locals(p: Proto) -> list[tuple[int, int, int]]:
    """(startpc, endpc, register) of every local named `_ENV`.

    A local's register is the number of locals still active where it starts (as in `luaF_getlocalname`);
    the compiler's locals nest like a stack, which keeps this linear.
    """
    out: list[tuple[int, int, int]] = []
    stack: list[int] = []  # endpc of the active locals, in register order
    for var in p.locvars:
        while stack and stack[-1] <= var.startpc:
            stack.pop()
        if var.name == _ENV_NAME and var.startpc < var.endpc and len(stack) <= 0xFF:
            out.append((var.startpc, var.endpc, len(stack)))
        stack.append(var.endpc)
    return out


def analyze(proto: Proto) -> Analysis:
    """Walk every function of a parsed chunk and collect what it touches (see the module docstring)."""
    col = _Collector()
    # The main chunk's first upvalue is the environment `load` gives it.
    todo: list[tuple[Proto, list[_Value]]] = [
        (proto, [_ENV, *[None] * len(proto.upvalues)][: len(proto.upvalues)])
    ]
    functions = 0
    while todo:
        p, upvals = todo.pop()
        functions += 1
        todo.extend(_function(p, upvals, col))
    return col.result(functions)


def _function(p: Proto, upvals: list[_Value], col: _Collector) -> list[tuple[Proto, list[_Value]]]:
    """One linear pass over `p`; returns its nested functions with what their upvalues hold."""
    code, lines, consts, nested = p.code, p.lines, p.constants, p.protos
    up: list[_Value] = list(upvals)
    env_up = [u.name == _ENV_NAME for u in p.upvalues]
    for i, is_env in enumerate(env_up):
        if is_env:
            up[i] = _ENV
    # Registers holding a local named _ENV at the current pc (a count: the intervals come from debug data).
    env_locals = _env_locals(p)
    starts = sorted((start, r) for start, _, r in env_locals)
    ends = sorted((end, r) for _, end, r in env_locals)
    env_active: dict[int, int] = {}
    next_start = next_end = 0
    regs: dict[int, _Value] = {}
    occupied = 0  # bit r set: regs has r (clobbering a range then costs only what it removes)
    children: list[tuple[Proto, list[_Value]]] = []
    seen: set[int] = set()

    def reg(r: int) -> _Value:
        return _ENV if env_active.get(r) else regs.get(r)

    def upval(u: int) -> _Value:
        return up[u] if u < len(up) else None

    def kstr(i: int) -> str | None:
        value = consts[i] if i < len(consts) else None
        return name_of(value) if isinstance(value, bytes) else None

    def kvalue(i: int) -> _Value:
        s = kstr(i)
        return None if s is None else ("str", s)

    def strval(v: _Value) -> str | None:
        return v[1] if v is not None and v[0] == "str" else None

    def clobber(lo: int, hi: int) -> None:
        nonlocal occupied
        mask = occupied & ((1 << hi) - (1 << lo))
        occupied &= ~mask
        while mask:
            low = mask & -mask
            del regs[low.bit_length() - 1]
            mask ^= low

    def setreg(r: int, v: _Value) -> None:
        nonlocal occupied
        if v is None:
            if regs.pop(r, None) is not None:
                occupied &= ~(1 << r)
        else:
            regs[r] = v
            occupied |= 1 << r

    for pc, ins in enumerate(code):
        while next_start < len(starts) and starts[next_start][0] <= pc:
            env_active[starts[next_start][1]] = env_active.get(starts[next_start][1], 0) + 1
            next_start += 1
        while next_end < len(ends) and ends[next_end][0] <= pc:
            env_active[ends[next_end][1]] -= 1
            next_end += 1
        op = ins & 0x7F
        a, b, c, bx = (ins >> 7) & 0xFF, (ins >> 16) & 0xFF, (ins >> 24) & 0xFF, ins >> 15
        line = lines[pc] if pc < len(lines) else -1
        if op == Op.MOVE:
            setreg(a, reg(b))
        elif op == Op.LOADK:
            setreg(a, kvalue(bx))
        elif op == Op.LOADKX:
            nxt = code[pc + 1] if pc + 1 < len(code) else 0
            setreg(a, kvalue(nxt >> 7) if nxt & 0x7F == Op.EXTRAARG else None)
        elif op == Op.GETUPVAL:
            setreg(a, upval(b))
        elif op == Op.SETUPVAL:
            if b < len(up) and not env_up[b]:
                up[b] = reg(a)
        elif op == Op.GETTABUP:
            setreg(a, col.index(upval(b), kstr(c), line, False))
        elif op == Op.GETTABLE:
            setreg(a, col.index(reg(b), strval(reg(c)), line, False))
        elif op == Op.GETFIELD:
            setreg(a, col.index(reg(b), kstr(c), line, False))
        elif op == Op.SETTABUP:
            col.index(upval(a), kstr(b), line, True)
        elif op == Op.SETTABLE:
            col.index(reg(a), strval(reg(b)), line, True)
        elif op == Op.SETFIELD:
            col.index(reg(a), kstr(b), line, True)
        elif op == Op.SELF:
            obj = reg(b)
            key = kstr(c) if (ins >> 15) & 1 else strval(reg(c))
            if key is not None:
                col.methods.setdefault(key, set()).add(line)
            value = None if obj is not None and obj[0] == "str" else col.index(obj, key, line, False)
            setreg(a, value)
            setreg(a + 1, obj)
        elif op == Op.LOADNIL:
            clobber(a, a + b + 1)
        elif op == Op.CONCAT:
            clobber(a, a + max(b, 1))
        elif op in (Op.CALL, Op.TAILCALL, Op.VARARG, Op.TFORCALL, Op.TFORLOOP):
            if op in (Op.CALL, Op.TAILCALL) and b == 2 and reg(a) == ("global", "type"):
                col.guard(reg(a + 1), line)  # type(NAME), one argument
            clobber(a, 0x200)
        elif op == Op.TEST:
            col.guard(reg(a), line)
        elif op in (Op.FORLOOP, Op.FORPREP):
            clobber(a, a + 4)
        elif op == Op.TESTSET:
            col.guard(reg(b), line)
            setreg(a, reg(b))
        elif op == Op.CLOSURE:
            if bx < len(nested) and bx not in seen:
                seen.add(bx)
                child = nested[bx]
                children.append((child, [reg(u.idx) if u.instack else upval(u.idx) for u in child.upvalues]))
            setreg(a, None)
        elif op not in _NO_WRITE:
            setreg(a, None)
    # A function no CLOSURE creates (not produced by the compiler) is still looked at, knowing nothing.
    for i, child in enumerate(nested):
        if i not in seen:
            children.append((child, [None] * len(child.upvalues)))
    children.reverse()  # popped from the end: keep source order
    return children
