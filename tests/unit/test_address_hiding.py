"""The bootstrap's address hiding, run in this process's own Lua state (no sandbox process needed): what a
script sees of reference values, and that Lua's own behaviour (__tostring, __name, errors) is kept."""

from __future__ import annotations

import re

import pytest

from sandbox import worker as child


def run(source: str) -> list[str]:
    """The script's print() lines; a script error is raised as AssertionError with its message."""
    _lua, start = child.new_runtime()  # the runtime must outlive the script
    result = start(source.encode(), b"s", b"run", 1, 2, 10_000_000, False)
    step, printed = result[1], []
    out = child._as_tuple(step())
    while out[0] == b"call":
        assert out[1] == b"log", out
        printed.append(out[2].decode())
        out = child._as_tuple(step(True))
    if out[0] != b"return":
        raise AssertionError(out[1].decode() if len(out) > 1 else out[0].decode())
    return printed


ADDRESS = re.compile(r"0x[0-9a-f]{5,}")


@pytest.mark.parametrize(
    "shown",
    [
        "tostring({})",
        "tostring(print)",
        "tostring(string.len)",
        "tostring(deadend.send)",
        "string.format('%p', {})",
        "string.format('%s', {})",
        "('%p'):format({})",
        "('%s|%10s|%-12p|'):format(print, {}, {})",
        "string.format('%p', 'a string')",
        "select(2, pcall(error, {}))",
    ],
)
def test_no_address_is_shown(shown: str) -> None:
    [line] = run(f"print({shown})")
    assert not ADDRESS.search(line), line


def test_each_value_keeps_its_number_for_the_session() -> None:
    [line] = run("local t, u = {}, {} print(tostring(t), tostring(u), tostring(t), string.format('%p', u))")
    assert line.split("\t") == ["table: 0x0001", "table: 0x0002", "table: 0x0001", "0x0002"]


def test_tostring_and_name_work_as_in_lua() -> None:
    lines = run(
        """
        print(setmetatable({}, {__tostring = function() return "custom" end}))
        print(setmetatable({}, {__tostring = function() return 42 end}))
        print(setmetatable({}, {__name = "My.Type"}))
        print(string.format("[%s]", setmetatable({}, {__name = "N"})))
        print(pcall(tostring, setmetatable({}, {__tostring = function() return {} end})))
        print(select(2, pcall(tostring)))
        print(tostring(nil), tostring(1.5), tostring(7), tostring(true), tostring("s"))
        """
    )
    assert lines == [
        "custom",
        "42",
        "My.Type: 0x0001",
        "[N: 0x0002]",
        "false\t'__tostring' must return a string",
        "bad argument #1 to 'tostring' (value expected)",
        "nil\t1.5\t7\ttrue\ts",
    ]


def test_format_keeps_lua_behaviour_and_errors() -> None:
    lines = run(
        """
        print(string.format("%%p %5.2f %d %q", 1.5, 3, "x"), string.format(12))
        print(string.format("%10p|%-10p|", 1, {}))
        print(select(2, pcall(string.format, "%5.3p", {})))
        print(select(2, pcall(string.format, "%d", {})))
        print(select(2, pcall(string.format, "%p")))
        print(select(2, pcall(function() local s = ("%d"):format({}) return s end)))
        """
    )
    assert lines == [
        '%p  1.50 3 "x"\t12',
        "    (null)|0x0001    |",
        "invalid conversion specification: '%5.3p'",
        "bad argument #2 to 'format' (number expected, got table)",
        "bad argument #2 to 'format' (no value)",
        "s:7: bad argument #2 to 'format' (number expected, got table)",
    ]


def test_an_uncaught_format_error_names_the_script_line() -> None:
    with pytest.raises(AssertionError, match=r"^s:2: bad argument #2 to 'format'"):
        run("\nlocal x = string.format('%d', {})")


def test_randomseed_shows_no_address_and_keeps_its_contract() -> None:
    lines = run(
        """
        local a, b = math.randomseed()
        print(math.type(a), math.type(b))
        print(math.randomseed(7, 8))
        local x = math.random(1 << 40)
        math.randomseed(7, 8)
        print(math.random(1 << 40) == x)
        print(select(2, pcall(math.randomseed, 1.5)))
        """
    )
    assert lines == [
        "integer\tinteger",
        "7\t8",
        "true",
        "bad argument #1 to 'randomseed' (number has no integer representation)",
    ]


def test_seeds_from_randomseed_come_from_the_session_seed() -> None:
    # The same broker seed gives the same numbers; nothing in them depends on this state's address.
    assert run("print(math.randomseed())") == run("print(math.randomseed())")


def test_many_formats_stay_under_the_instruction_budget() -> None:
    with pytest.raises(AssertionError, match="instruction limit exceeded"):
        run("local t = {} while true do string.format('%p %s', t, t) end")
