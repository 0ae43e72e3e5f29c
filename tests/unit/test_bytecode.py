"""deadend.bytecode against real dumps of Lua 5.4.8 (a raw lupa runtime: tests are trusted)."""

from __future__ import annotations

import random
import re
import struct
from collections.abc import Callable
from pathlib import Path

import lupa.lua54
import pytest

from deadend import bytecode as bc
from deadend.bytecode import Analysis, BytecodeError, Op, Proto, analyze, parse

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

_LUA = lupa.lua54.LuaRuntime(encoding=None)
_DUMP = _LUA.eval(
    """function(src, strip)
         local fn, err = load(src, "=test")
         if not fn then error(err) end
         return string.dump(fn, strip)
       end"""
)
# The lines that hold code, as Lua itself reports them, for the main chunk and for every function it
# returns (a function, or a table of functions); run only on test snippets that are safe to run.
_ACTIVE = _LUA.eval(
    """function(src)
         local function lines(f)
           local out = {}
           for line in pairs(debug.getinfo(f, "L").activelines) do out[#out + 1] = line end
           table.sort(out)
           return out
         end
         local fn = assert(load(src, "=test"))
         local res = {lines(fn)}
         local r = fn()
         if type(r) == "function" then r = {r} end
         for _, f in ipairs(r or {}) do res[#res + 1] = lines(f) end
         return res
       end"""
)
_ACTIVE_MAIN = _LUA.eval(
    'function(src) return debug.getinfo(assert(load(src, "=test")), "L").activelines end'
)


def dump(src: str | bytes, strip: bool = False) -> bytes:
    raw = src.encode() if isinstance(src, str) else src
    out = _DUMP(raw, strip)
    assert isinstance(out, bytes)
    return out


def check(src: str) -> Analysis:
    return analyze(parse(dump(src)))


def ops(p: Proto) -> set[Op]:
    return {i.op for q in p.walk() for i in q.instructions()}


def code_lines(p: Proto) -> list[int]:
    """The lines Lua's `activelines` lists for a function (it skips VARARGPREP of vararg functions)."""
    return sorted(set(p.lines[1:] if p.is_vararg else p.lines))


def active(src: str) -> list[list[int]]:
    return [list(t.values()) for t in _ACTIVE(src.encode()).values()]


# --- a writer mirroring ldump.c, to check the parser round-trips real dumps and to forge bad ones --------


def w_size(x: int) -> bytes:
    groups = [x & 0x7F]
    x >>= 7
    while x:
        groups.append(x & 0x7F)
        x >>= 7
    groups.reverse()
    groups[-1] |= 0x80
    return bytes(groups)


def w_string(s: bytes | None) -> bytes:
    return w_size(0) if s is None else w_size(len(s) + 1) + s


def w_constant(k: bc.Constant) -> bytes:
    if k is None:
        return b"\x00"
    if k is False:
        return b"\x01"
    if k is True:
        return b"\x11"
    if isinstance(k, int):
        return b"\x03" + struct.pack("<q", k)
    if isinstance(k, float):
        return b"\x13" + struct.pack("<d", k)
    return (b"\x04" if len(k) <= 40 else b"\x14") + w_string(k)  # LUAI_MAXSHORTLEN


def w_function(p: Proto, psource: bytes | None) -> bytes:
    out = [w_string(None if p.source == psource else p.source), w_size(p.linedefined)]
    out += [w_size(p.lastlinedefined), bytes([p.numparams, p.is_vararg, p.maxstacksize])]
    out += [w_size(len(p.code)), struct.pack(f"<{len(p.code)}I", *p.code)]
    out += [w_size(len(p.constants)), *map(w_constant, p.constants)]
    out += [w_size(len(p.upvalues)), *(bytes([u.instack, u.idx, u.kind]) for u in p.upvalues)]
    out += [w_size(len(p.protos)), *(w_function(q, p.source) for q in p.protos)]
    out += [w_size(len(p.lineinfo)), p.lineinfo, w_size(len(p.abslineinfo))]
    out += [w_size(pc) + w_size(line) for pc, line in p.abslineinfo]
    out += [w_size(len(p.locvars))]
    out += [w_string(v.name) + w_size(v.startpc) + w_size(v.endpc) for v in p.locvars]
    names = [u.name for u in p.upvalues] if p.has_upvalue_names else []
    out += [w_size(len(names)), *map(w_string, names)]
    return b"".join(out)


def w_chunk(p: Proto, nupvalues: int | None = None) -> bytes:
    n = len(p.upvalues) if nupvalues is None else nupvalues
    return bc.HEADER + bytes([n]) + w_function(p, None)


def fn(**kw: object) -> Proto:
    """A synthetic function (for forged dumps): RETURN0 only, unless told otherwise."""
    base: dict[str, object] = dict(
        source=b"=forged",
        linedefined=0,
        lastlinedefined=0,
        numparams=0,
        is_vararg=1,
        maxstacksize=2,
        code=(Op.RETURN0,),
        constants=(),
        upvalues=(bc.Upvalue(True, 0, 0, b"_ENV"),),
        protos=(),
        lineinfo=b"\x01",
        abslineinfo=(),
        locvars=(),
        has_upvalue_names=True,
        lines=(1,),
    )
    base.update(kw)
    return Proto(**base)  # type: ignore[arg-type]


def ins(op: Op, a: int = 0, b: int = 0, c: int = 0, k: int = 0, bx: int | None = None) -> int:
    if bx is not None:
        return op | a << 7 | bx << 15
    return op | a << 7 | k << 15 | b << 16 | c << 24


# --- the format -------------------------------------------------------------------------------------------

SNIPPETS = [
    "return",
    "local a = 1; x = a + 2; print(x, 3.5, 's', nil, true, false, 1 << 40)",
    "local t = {1, 2, 3, x = 1, [true] = false}; t.f = nil; t[k] = true; return #t",
    "local function f(a, b, ...) return a, b, ... end return f(1, 2, 3)",
    "return function() return function() return function() return _ENV end end end",
    "local s = [[" + "long string " * 20 + "]] return s .. 'short'",
    "for i = 1, 10, 2 do print(i) end for k, v in pairs({}) do print(k, v) end",
    "local a <const> = 42; local b <close> = nil; return a",
    "goto done; print(1) ::done:: return 0x7fffffffffffffff, -0x8000000000000000, 1e308, -0.0, 0/0",
    "local a = ...; while a do a = a - 1 end repeat a = a + 1 until a > 3 return a",
    "return '\\0\\1\\255 binary \\n string', 2^53, math.huge, -math.huge",
]


@pytest.mark.parametrize("src", SNIPPETS)
@pytest.mark.parametrize("strip", [False, True])
def test_round_trip(src: str, strip: bool) -> None:
    """Writing a parsed dump back in ldump.c's format reproduces it byte for byte."""
    d = dump(src, strip)
    p = parse(d)
    assert w_chunk(p) == d
    analyze(p)


def test_header_and_main_function() -> None:
    p = parse(dump("local a = 1\nprint(a)\n"))
    assert p.source == b"=test"
    assert (p.linedefined, p.lastlinedefined, p.numparams, p.is_vararg) == (0, 0, 0, 1)
    assert p.upvalues == (bc.Upvalue(True, 0, 0, b"_ENV"),)
    assert p.constants == (b"print",)
    assert [v.name for v in p.locvars] == [b"a"]
    assert p.instructions()[0].op is Op.VARARGPREP
    assert p.lines == (1, 1, 2, 2, 2, 2)


def test_nested_function_fields() -> None:
    p = parse(dump("local u = 1\nlocal function f(a, b)\n  return a + u, print\nend\nreturn f"))
    (f,) = p.protos
    assert f.source == b"=test"  # dumped as NULL: same as the parent
    assert (f.linedefined, f.lastlinedefined, f.numparams, f.is_vararg) == (2, 4, 2, 0)
    assert [(u.name, u.instack, u.idx) for u in f.upvalues] == [(b"u", True, 0), (b"_ENV", False, 0)]
    assert [v.name for v in f.locvars] == [b"a", b"b"]


def test_constants_of_every_type() -> None:
    long = "x" * 41
    p = parse(dump(f"local t = {{}} t.a = nil t.b = true t.c = false t.d = 7 << 40 t.e = 2.5 t.f = '{long}'"))
    k = p.constants
    assert None in k and True in k and False in k
    assert any(type(v) is int and v == 7 << 40 for v in k)
    assert any(type(v) is float and v == 2.5 for v in k)
    assert long.encode() in k and b"a" in k
    assert w_chunk(p) == dump(
        f"local t = {{}} t.a = nil t.b = true t.c = false t.d = 7 << 40 t.e = 2.5 t.f = '{long}'"
    )
    special = parse(dump("return -0.0, 1/0, -1/0, math.mininteger, 'é\\0'"))
    assert "é\0".encode() in special.constants


def test_stripped_dump() -> None:
    p = parse(dump("local x = 1\nfunction f() y = x end\n", strip=True))
    assert p.lineinfo == b"" and p.lines == (-1,) * len(p.code)
    assert not p.has_upvalue_names and p.upvalues[0].name is None
    a = analyze(p)
    # Without names, the environment is known by position in the main chunk and followed into closures.
    assert a.global_writes == {"f": [-1], "y": [-1]}


# Each snippet compiles to (at least) the named opcode, which pins down the numbering of all 83.
OPCODES: dict[Op, str] = {
    Op.MOVE: "local a = ...; local b = a; return b",
    Op.LOADI: "local a = 1",
    Op.LOADF: "local a = 1.0",
    Op.LOADK: "local a = 'k'",
    Op.LOADKX: "local a\n" + "".join(f"a = {i}.5\n" for i in range(131073)),
    Op.LOADFALSE: "local a = false",
    Op.LFALSESKIP: "local a = ...; local b = a == 1; return b",
    Op.LOADTRUE: "local a = true",
    Op.LOADNIL: "local a, b",
    Op.GETUPVAL: "local u = ...; return function() return u end",
    Op.SETUPVAL: "local u; return function() u = 1 end",
    Op.GETTABUP: "return x",
    Op.GETTABLE: "local t, k = ...; return t[k]",
    Op.GETI: "local t = ...; return t[1]",
    Op.GETFIELD: "local t = ...; return t.f",
    Op.SETTABUP: "x = 1",
    Op.SETTABLE: "local t, k = ...; t[k] = 1",
    Op.SETI: "local t = ...; t[1] = 1",
    Op.SETFIELD: "local t = ...; t.f = 1",
    Op.NEWTABLE: "local t = {}",
    Op.SELF: "local t = ...; t:m()",
    Op.ADDI: "local a = ...; return a + 1",
    Op.ADDK: "local a = ...; return a + 1.5",
    Op.SUBK: "local a = ...; return a - 1.5",
    Op.MULK: "local a = ...; return a * 1.5",
    Op.MODK: "local a = ...; return a % 1.5",
    Op.POWK: "local a = ...; return a ^ 1.5",
    Op.DIVK: "local a = ...; return a / 1.5",
    Op.IDIVK: "local a = ...; return a // 1.5",
    Op.BANDK: "local a = ...; return a & 3",
    Op.BORK: "local a = ...; return a | 3",
    Op.BXORK: "local a = ...; return a ~ 3",
    Op.SHRI: "local a = ...; return a >> 3",
    Op.SHLI: "local a = ...; return 3 << a",
    Op.ADD: "local a, b = ...; return a + b",
    Op.SUB: "local a, b = ...; return a - b",
    Op.MUL: "local a, b = ...; return a * b",
    Op.MOD: "local a, b = ...; return a % b",
    Op.POW: "local a, b = ...; return a ^ b",
    Op.DIV: "local a, b = ...; return a / b",
    Op.IDIV: "local a, b = ...; return a // b",
    Op.BAND: "local a, b = ...; return a & b",
    Op.BOR: "local a, b = ...; return a | b",
    Op.BXOR: "local a, b = ...; return a ~ b",
    Op.SHL: "local a, b = ...; return a << b",
    Op.SHR: "local a, b = ...; return a >> b",
    Op.MMBIN: "local a, b = ...; return a + b",
    Op.MMBINI: "local a = ...; return a + 1",
    Op.MMBINK: "local a = ...; return a + 1.5",
    Op.UNM: "local a = ...; return -a",
    Op.BNOT: "local a = ...; return ~a",
    Op.NOT: "local a = ...; return not a",
    Op.LEN: "local a = ...; return #a",
    Op.CONCAT: "local a, b = ...; return a .. b",
    Op.CLOSE: "local a = ...; do local x; a = function() return x end end return a",
    Op.TBC: "local x <close> = ...",
    Op.JMP: "while ... do end",
    Op.EQ: "local a, b = ...; if a == b then return 1 end",
    Op.LT: "local a, b = ...; if a < b then return 1 end",
    Op.LE: "local a, b = ...; if a <= b then return 1 end",
    Op.EQK: "local a = ...; if a == 'k' then return 1 end",
    Op.EQI: "local a = ...; if a == 1 then return 1 end",
    Op.LTI: "local a = ...; if a < 1 then return 1 end",
    Op.LEI: "local a = ...; if a <= 1 then return 1 end",
    Op.GTI: "local a = ...; if a > 1 then return 1 end",
    Op.GEI: "local a = ...; if a >= 1 then return 1 end",
    Op.TEST: "local a = ...; if a then return 1 end",
    Op.TESTSET: "local a, b = ...; local c = a or b; return c",
    Op.CALL: "local f = ...; f()",
    Op.TAILCALL: "local f = ...; return f()",
    Op.RETURN: "return 1, 2",
    Op.RETURN0: "return function() end",
    Op.RETURN1: "return function(a) return a end",
    Op.FORLOOP: "for i = 1, 2 do end",
    Op.FORPREP: "for i = 1, 2 do end",
    Op.TFORPREP: "local f = ...; for k in f do end",
    Op.TFORCALL: "local f = ...; for k in f do end",
    Op.TFORLOOP: "local f = ...; for k in f do end",
    Op.SETLIST: "local t = {1, 2, 3}",
    Op.CLOSURE: "local f = function() end",
    Op.VARARG: "local a = ...",
    Op.VARARGPREP: "return",
    Op.EXTRAARG: "local t = {}",
}


def test_opcode_table_covers_lua_54() -> None:
    assert bc.NUM_OPCODES == 83 and set(OPCODES) == set(Op)
    assert [op.value for op in Op] == list(range(83))


@pytest.mark.parametrize("op", list(Op), ids=lambda op: op.name)
def test_opcode_numbering(op: Op) -> None:
    assert op in ops(parse(dump(OPCODES[op])))


def test_exact_disassembly() -> None:
    """One full listing, fields included, for a snippet whose code generation is well known."""
    p = parse(dump("local t = {}\nt.x = t.y + 1\nprint(t)\n"))
    got = [(i.op, i.a, i.b, i.c, i.k) for i in p.instructions()]
    assert got == [
        (Op.VARARGPREP, 0, 0, 0, 0),
        (Op.NEWTABLE, 0, 0, 0, 0),
        (Op.EXTRAARG, 0, 0, 0, 0),
        (Op.GETFIELD, 1, 0, 1, 0),  # K[1] = "y"
        (Op.ADDI, 1, 1, bc.OFFSET_SC + 1, 0),  # sC = 1
        (Op.MMBINI, 1, bc.OFFSET_SC + 1, 6, 0),  # TM_ADD
        (Op.SETFIELD, 0, 0, 1, 0),  # K[0] = "x", value in R[1]
        (Op.GETTABUP, 1, 0, 2, 0),  # _ENV["print"]
        (Op.MOVE, 2, 0, 0, 0),
        (Op.CALL, 1, 2, 1, 0),
        (Op.RETURN, 1, 1, 1, 0),
    ]
    assert p.constants == (b"x", b"y", b"print")
    jumps = parse(dump("local a = ...\nwhile a do a = nil end\nreturn 1.5\n")).instructions()
    jmp = [i for i in jumps if i.op is Op.JMP]
    assert [j.sj for j in jmp] == [2, -4]
    loadk = parse(dump("local a = 40000\nlocal b = -40000\nreturn a, b")).instructions()
    assert [i.sbx for i in loadk if i.op is Op.LOADI] == [40000, -40000]


# --- lines -------------------------------------------------------------------------------------------------

LINE_SNIPPETS = [
    "local a = 1\n\n\nlocal b = a\nreturn {function() return a end, function()\n  return b\nend}\n",
    # A gap of more than 127 lines needs an absolute line entry; so do 128 instructions without one.
    "local a = 1" + "\n" * 300 + "local b = 2\n" + "\n" * 1000 + "return function()\n" + "\n" * 200 + "end\n",
    "local t = {}\n"
    + "t[1] = 1 " * 200
    + "\nreturn function(x)\n"
    + "x = x + 1 " * 300
    + "\n" * 129
    + "end\n",
    "local x = 0\nfor i = 1, 3 do\n  x = x +\n    i\nend\nreturn function() return\n"
    + "\n" * 127
    + "1 end\n",
]


@pytest.mark.parametrize("src", LINE_SNIPPETS)
def test_lines_match_lua(src: str) -> None:
    p = parse(dump(src))
    assert [code_lines(f) for f in [p, *p.protos]] == active(src)


def test_abslineinfo_is_used() -> None:
    p = parse(dump(LINE_SNIPPETS[1]))
    assert p.abslineinfo, "the snippet was meant to need absolute line information"
    q = parse(dump(LINE_SNIPPETS[2])).protos[0]
    assert len(q.abslineinfo) >= 2
    assert all(q.lineinfo[pc] == 0x80 for pc, _ in q.abslineinfo)


def test_lines_of_examples_match_lua() -> None:
    for path in sorted(EXAMPLES.glob("*.lua")):
        src = path.read_bytes()
        p = parse(dump(src))
        assert code_lines(p) == sorted(_ACTIVE_MAIN(src).keys()), path.name


# --- globals -----------------------------------------------------------------------------------------------


def test_global_reads_and_writes_with_lines() -> None:
    a = check("x = 1\nprint(y)\nlocal z = 3\nz = z + w\nx, v = v, x\n")
    assert a.global_writes == {"v": [5], "x": [1, 5]}
    assert a.global_reads == {"print": [2], "v": [5], "w": [4], "x": [5], "y": [2]}
    assert "z" not in a.global_reads and "z" not in a.global_writes


def test_globals_in_nested_functions_and_closures() -> None:
    src = """local up = 1
function top(p)
  local l = p
  return function()
    inner = l + up + outer
    local function deeper()
      return deepest, up
    end
    return deeper
  end
end
local t = {}
function t.method(self) return self, gm end
function t:m2() mvar = self end
"""
    a = check(src)
    assert a.global_writes == {"inner": [5], "mvar": [14], "top": [2]}
    assert a.global_reads == {"deepest": [7], "gm": [13], "outer": [5]}
    assert a.functions == 6


def test_locals_and_parameters_are_not_globals() -> None:
    a = check(
        "local a, b = 1, 2\nlocal function f(p, ...) local q = p; q = a; return q, ... end\n"
        "for i = 1, 2 do a = i end for k, v in next, {} do b = k end\n"
    )
    assert a.global_reads == {"next": [3]}
    assert a.global_writes == {}


def test_local_env_is_tolerated() -> None:
    """A local `_ENV` is an environment as far as Lua's own messages go: its names count as globals."""
    src = """local print = print
do
  local _ENV = {}
  sandboxed = 1
  local function f() return inside end
end
local _ENV = setmetatable({}, {__index = _ENV})
after = string.dump
"""
    a = check(src)
    assert a.global_writes == {"after": [8], "sandboxed": [4]}
    assert a.global_reads == {"inside": [5], "print": [1], "setmetatable": [7], "string": [8]}
    assert a.field_uses == {("string", "dump"): [8]}


def test_env_copies_and_dynamic_keys() -> None:
    src = """local e = _ENV
e.copied = e.read
local k = "x"
local v = _ENV[k]
_ENV[k .. "y"] = 1
local s = string
local d = s["du" .. "mp"]
return function() return e.viaup end
"""
    a = check(src)
    assert a.global_writes == {"copied": [2]}
    assert a.global_reads["read"] == [2] and a.global_reads["viaup"] == [8] and a.global_reads["x"] == [4]
    assert a.dynamic_indexes == {"_ENV": [5], "string": [7]}


def test_many_constants_do_not_hide_accesses() -> None:
    """Past 256 constants, `_ENV` goes through a register (GETUPVAL + LOADK + GETTABLE): still seen."""
    pad = "local _ " + " ".join(f'_ = "pad{i}"' for i in range(300))
    a = check(
        pad + "\ndeadend.send('hi')\nlocal q = string.dump\nzz = ('abc'):rep(2)\nlocal e = os.execute\n"
    )
    assert a.deadend_calls == {"send": [2]}
    assert a.field_uses == {("deadend", "send"): [2], ("os", "execute"): [5], ("string", "dump"): [3]}
    assert a.global_writes == {"zz": [4]}
    assert a.method_names == {"rep": [4]}


def test_loadkx_constants_do_not_hide_accesses() -> None:
    a = check(OPCODES[Op.LOADKX] + "deadend.log('x')\nstring.dump(print)\n")
    assert a.deadend_calls == {"log": [131075]}
    assert a.field_uses[("string", "dump")] == [131076]
    assert a.global_reads == {"deadend": [131075], "print": [131076], "string": [131076]}


# --- deadend, fields, methods ------------------------------------------------------------------------------


def test_deadend_calls() -> None:
    src = """deadend.set_limits(4, 1024)
local data = deadend.recv(10)
if data then
  deadend.send(data)
end
local d = deadend
d.log("via alias")
local send = deadend.send
local function later()
  d.close()
  return deadend.get_ip()
end
deadend:sleep(1)
deadend.custom = 1
"""
    a = check(src)
    assert a.deadend_calls == {
        "close": [10],
        "custom": [14],
        "get_ip": [11],
        "log": [7],
        "recv": [2],
        "send": [4, 8],
        "set_limits": [1],
        "sleep": [13],
    }
    assert a.global_reads == {"deadend": [1, 2, 4, 6, 8, 11, 13, 14]}


def test_field_uses() -> None:
    src = """local f = io.open("/etc/passwd")
os.execute("id")
local dump = string.dump
table.move({}, 1, 1, 1)
local s = string
s.dump(print)
_G.string.dump(print)
string.dump = nil
local function g() return s.rep, debug.getinfo end
"""
    a = check(src)
    assert a.field_uses == {
        ("_G", "string"): [7],
        ("debug", "getinfo"): [9],
        ("io", "open"): [1],
        ("os", "execute"): [2],
        ("string", "dump"): [3, 6, 7, 8],
        ("string", "rep"): [9],
        ("table", "move"): [4],
    }


def test_method_names() -> None:
    src = """local x = ("x"):dump()
local y = (""):rep(3)
local z = ("").dump
local s = "abc"
local w = s.char
local t = {}
t:method()
local up = "u"
return function() return up.upvalue_field, up:upmeth() end
"""
    a = check(src)
    assert a.method_names == {
        "char": [5],
        "dump": [1, 3],
        "method": [7],
        "rep": [2],
        "upmeth": [9],
        "upvalue_field": [9],
    }
    assert a.field_uses == {}


def test_examples_parse_and_match_their_text() -> None:
    """Every example parses; what the bytecode says agrees with a plain look at the text."""
    paths = sorted(EXAMPLES.glob("*.lua"))
    assert paths
    for path in paths:
        src = path.read_bytes()
        d = dump(src)
        p = parse(d)
        assert w_chunk(p) == d
        a = analyze(p)
        text = src.decode()
        code = re.sub(r"--[^\n]*", "", text)
        assert (
            set(re.findall(r"\bdeadend\.(\w+)", code))
            <= set(a.deadend_calls)
            <= set(re.findall(r"\bdeadend\.(\w+)", text))
        ), path.name
        for name, lines in a.deadend_calls.items():
            for line in lines:
                assert name in text.splitlines()[line - 1], (path.name, name, line)
        for name, lines in a.global_reads.items():
            for line in lines:
                assert re.search(rf"\b{name}\b", text.splitlines()[line - 1]), (path.name, name, line)
        assert ("string", "dump") not in a.field_uses and "dump" not in a.method_names


def test_many_local_envs_stay_linear() -> None:
    src = "".join(f"do local _ENV = _ENV; x{i % 7} = {i} end\n" for i in range(20000))
    a = check(src)
    assert a.global_writes == {f"x{j}": list(range(j + 1, 20001, 7)) for j in range(7)}
    assert a.global_reads == {}


# --- malformed input ---------------------------------------------------------------------------------------

SMALL = "local t = {1, 'two', 3.0, true}\nfunction f(x) return x .. t[2], print end\nreturn f(1)\n"


def only_bytecode_errors(data: bytes) -> Proto | None:
    try:
        p = parse(data)
    except BytecodeError:
        return None
    analyze(p)  # whatever parses must analyze without error
    return p


def test_every_truncation() -> None:
    d = dump(SMALL)
    for n in range(len(d)):
        with pytest.raises(BytecodeError):
            parse(d[:n])
    assert parse(d) is not None


def test_trailing_data() -> None:
    with pytest.raises(BytecodeError, match="trailing"):
        parse(dump(SMALL) + b"\x00")


def test_random_bytes() -> None:
    rng = random.Random(1234)
    for n in range(500):
        assert only_bytecode_errors(rng.randbytes(n % 200)) is None
        only_bytecode_errors(bc.HEADER + rng.randbytes(n % 300))


def test_random_mutations() -> None:
    rng = random.Random(99)
    d = bytearray(dump("local s = ('x'):dump()\nlocal u = string.dump\n" + SMALL))
    for _ in range(3000):
        m = bytearray(d)
        for _ in range(rng.randint(1, 4)):
            m[rng.randrange(len(m))] = rng.randrange(256)
        only_bytecode_errors(bytes(m))
    for pos in range(len(d)):  # every single byte, set to a few interesting values
        for value in (0x00, 0x7F, 0x80, 0xFF):
            m = bytearray(d)
            m[pos] = value
            only_bytecode_errors(bytes(m))


@pytest.mark.parametrize("pos", range(len(bc.HEADER)))
def test_wrong_header(pos: int) -> None:
    d = bytearray(dump(SMALL))
    d[pos] ^= 0x01
    with pytest.raises(BytecodeError):
        parse(bytes(d))


def test_not_bytes() -> None:
    with pytest.raises(BytecodeError):
        parse("\x1bLua")  # type: ignore[arg-type]
    with pytest.raises(BytecodeError, match="not a binary chunk"):
        parse(b"print('source, not bytecode')")


def test_forged_dump_round_trips() -> None:
    assert w_chunk(parse(w_chunk(fn()))) == w_chunk(fn())


FORGED: list[tuple[str, str, Callable[[], bytes]]] = [
    ("header upvalue count", r"does not match the header", lambda: w_chunk(fn(), nupvalues=2)),
    ("unknown opcode", r"unknown opcode 83", lambda: w_chunk(fn(code=(83,)))),
    ("opcode 127", r"unknown opcode 127", lambda: w_chunk(fn(code=(127,)))),
    ("constant index", r"GETTABUP", lambda: w_chunk(fn(code=(ins(Op.GETTABUP, 0, 0, 5),)))),
    ("upvalue index", r"GETUPVAL", lambda: w_chunk(fn(code=(ins(Op.GETUPVAL, 0, 3),)))),
    (
        "settabup upvalue",
        r"SETTABUP",
        lambda: w_chunk(fn(code=(ins(Op.SETTABUP, 9, 0, 0),), constants=(b"x",))),
    ),
    ("loadk index", r"in LOADK ", lambda: w_chunk(fn(code=(ins(Op.LOADK, 0, bx=1),), constants=(b"x",)))),
    ("loadkx at end", r"LOADKX", lambda: w_chunk(fn(code=(ins(Op.LOADKX),), lineinfo=b"\x01"))),
    (
        "loadkx index",
        r"LOADKX",
        lambda: w_chunk(fn(code=(ins(Op.LOADKX), Op.EXTRAARG | 7 << 7), lineinfo=b"\x01\x00")),
    ),
    ("closure index", r"CLOSURE", lambda: w_chunk(fn(code=(ins(Op.CLOSURE, 0, bx=0),)))),
    ("lineinfo size", r"line information does not match", lambda: w_chunk(fn(lineinfo=b"\x01\x01"))),
    ("abslineinfo pc", r"absolute line", lambda: w_chunk(fn(abslineinfo=((1, 5),)))),
    (
        "abslineinfo order",
        r"absolute line",
        lambda: w_chunk(fn(code=(0, 0), lineinfo=b"\x80\x80", abslineinfo=((1, 1), (0, 1)))),
    ),
    ("upvalue names", r"upvalue names", lambda: w_chunk(fn())[:-6] + b"\x82" + b"\x85_ENV" * 2),
    (
        "too many upvalues",
        r"255 upvalues",
        lambda: w_chunk(fn(upvalues=(bc.Upvalue(True, 0, 0, b"u"),) * 256), 255),
    ),
    (
        "constant tag",
        r"constant tag 0x05",
        lambda: w_chunk(fn(constants=(b"x",))).replace(b"\x81\x04\x82x", b"\x81\x05\x82x"),
    ),
    (
        "null constant string",
        r"constant string",
        lambda: w_chunk(fn(constants=(b"x",))).replace(b"\x81\x04\x82x", b"\x81\x04\x80"),
    ),
    ("int overflow", r"overflow", lambda: bc.HEADER + b"\x01\x80" + b"\x10\x00\x00\x00\x00\x80"),
    (
        "huge code count",
        r"truncated dump \(code",
        lambda: bc.HEADER + b"\x01\x80\x80\x80\x00\x00\x00\x07\x7f\x7f\xff",
    ),
    ("huge string", r"truncated dump \(bytes", lambda: bc.HEADER + b"\x01" + b"\x7f" * 8 + b"\xff"),
]


@pytest.mark.parametrize(("why", "error", "make"), FORGED, ids=[why for why, _, _ in FORGED])
def test_forged(why: str, error: str, make: Callable[[], bytes]) -> None:
    with pytest.raises(BytecodeError, match=error):
        parse(make())


def nest(depth: int) -> Proto:
    p = fn(upvalues=(), has_upvalue_names=False)
    for _ in range(depth):
        p = fn(
            upvalues=(),
            has_upvalue_names=False,
            protos=(p,),
            code=(ins(Op.CLOSURE, 0, bx=0), Op.RETURN0),
            lineinfo=b"\x01\x00",
            lines=(1, 1),
        )
    return p


def test_nesting_depth() -> None:
    assert analyze(parse(w_chunk(nest(bc.MAX_DEPTH)))).functions == bc.MAX_DEPTH + 1
    with pytest.raises(BytecodeError, match="nested"):
        parse(w_chunk(nest(bc.MAX_DEPTH + 1)))


def test_real_nesting_is_far_from_the_bound() -> None:
    """The compiler's own limit on nesting (C levels) is reached well before MAX_DEPTH."""
    deep = "return " + "function() return " * 300 + "1" + " end" * 300
    with pytest.raises(lupa.lua54.LuaError):
        dump(deep)


def test_overall_bounds(monkeypatch: pytest.MonkeyPatch) -> None:
    d = dump(SMALL)
    monkeypatch.setattr(bc, "MAX_INSTRUCTIONS", 10)
    with pytest.raises(BytecodeError, match="instructions"):
        parse(d)
    monkeypatch.undo()
    monkeypatch.setattr(bc, "MAX_CONSTANTS", 2)  # SMALL has 3
    with pytest.raises(BytecodeError, match="constants"):
        parse(d)
    monkeypatch.undo()
    monkeypatch.setattr(bc, "MAX_PROTOS", 0)
    with pytest.raises(BytecodeError, match="functions"):
        parse(d)
    monkeypatch.undo()
    monkeypatch.setattr(bc, "MAX_DEBUG_ENTRIES", 1)
    with pytest.raises(BytecodeError, match="debug"):
        parse(d)


def test_large_dump_is_linear() -> None:
    """About 1.8 MB of dump (131k constants, LOADKX) parses and analyzes in well under the test timeout."""
    d = dump(OPCODES[Op.LOADKX])
    assert len(d) > 1_500_000
    p = parse(d)
    assert len(p.constants) > 131072
    code = p.instructions()
    loadkx = [pc for pc, i in enumerate(code) if i.op is Op.LOADKX]
    assert loadkx and all(code[pc + 1].op is Op.EXTRAARG for pc in loadkx)
    # `a = <i>.5` for i in 0..131072: constant i is i + 0.5, and only constant 131072 is past LOADK's reach.
    assert [code[pc + 1].ax for pc in loadkx] == [131072]
    assert p.constants[131072] == 131072.5
    analyze(p)


# --- guards: a global whose presence is tested ------------------------------------------------------------


def test_guards_are_type_calls_and_conditions() -> None:
    src = """local has_clock = type(os) == "table"
if os then x = 1 end
local d = os and os.date
local t = type(os.time)
local n = type(deadend, 1)
local function f() return type(io) end
"""
    a = check(src)
    # type(os.time) tests a field, not a global; a call of type with two arguments is not a test
    assert a.guards == {"io": [6], "os": [1, 2, 3]}


def test_no_guard_without_a_test() -> None:
    a = check("local d = os.date('!%Y')\nlocal type = print\ntype(os)\n")
    assert a.guards == {}
