"""SPEC.md "Scripts and ports": which files are served, which are ignored, and how start-up fails."""

from __future__ import annotations

import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import AS_ROOT, HOST, REPO, free_offset, read_all


def served_name(b, port: int) -> bytes:
    with b.connect(port) as s:
        return read_all(s)


def echo_name(name: str) -> str:
    return f"deadend.send('{name}')\n"


def listening_scripts(b) -> list[str]:
    return re.findall(r"listening on \S+ script=(\S+)", "\n".join(b.lines))


def wait_exit(b, timeout: float = 20.0) -> tuple[int, str]:
    """The exit status and stderr of a broker that is expected to fail at start-up."""
    try:
        rc = b.proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pytest.fail("the broker did not exit:\n" + "\n".join(b.lines[-20:]))
    return rc, b.stderr_closed()


def run_cli(args: list[str], timeout: float = 20.0) -> tuple[int, str, str]:
    """Run `python -m deadend broker ...` expecting it to exit by itself."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "deadend", "broker", *args, *AS_ROOT],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        cwd=REPO,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.terminate()
        try:
            proc.communicate(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
        pytest.fail(f"deadend broker {' '.join(args)} did not exit within {timeout}s")
    return proc.returncode, out, err


def assert_one_error_line(stderr: str, *words: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line on stderr, got:\n{stderr}"
    assert "Traceback" not in stderr
    line = lines[0]
    assert "error" in line.lower(), line
    for word in words:
        assert word in line, f"{word!r} not in {line!r}"
    return line


# --- served names -----------------------------------------------------------------------------------


def test_port_named_scripts_are_served(make_broker):
    names = ["22", "80", "25", "5222"]
    b = make_broker({f"{n}.lua": echo_name(n) for n in names})
    b.wait_for(r"ready: 4 script")
    for n in names:
        assert served_name(b, int(n)) == n.encode()
        b.wait_for(rf"listening on {re.escape(HOST)}:{b.port(int(n))} script={n}\.lua")


@pytest.mark.parametrize("port", [1, 65535])
def test_extreme_ports_are_served(make_broker, port):
    b = make_broker({f"{port}.lua": echo_name(str(port))})
    assert served_name(b, port) == str(port).encode()
    assert listening_scripts(b) == [f"{port}.lua"]


# --- ignored names ----------------------------------------------------------------------------------

IGNORED = [
    "ssh.lua",
    "22.txt",
    "00000.lua",
    "70000.lua",
    "022.lua",
    "0.lua",
    "65536.lua",
    "123456.lua",
    "7.lua.bak",
    "7.LUA",
    ".lua",
    "-7.lua",
    "+7.lua",
]


def test_other_names_are_ignored_with_one_line_each(make_broker):
    files = {name: echo_name("wrong") for name in IGNORED}
    files["7.lua"] = echo_name("7")
    b = make_broker(files)
    b.wait_for(r"ready: 1 script")
    for name in IGNORED:
        found = [line for line in b.lines if re.search(rf"ignored {re.escape(name)}: \S", line)]
        assert len(found) == 1, f"{name}: {found}"
    assert len([line for line in b.lines if " ignored " in line]) == len(IGNORED)
    assert listening_scripts(b) == ["7.lua"]
    assert served_name(b, 7) == b"7"


# --- compile errors ---------------------------------------------------------------------------------


def test_script_that_does_not_compile_is_reported_and_others_start(make_broker):
    b = make_broker(
        {"7.lua": echo_name("7"), "8.lua": "local x = = 1\n", "9.lua": echo_name("9")},
    )
    b.wait_for(r"ready: 2 script")
    reports = [line for line in b.lines if "8.lua" in line]
    assert len(reports) == 1, reports
    # the compiler's own message: chunk name, line and what it found
    assert re.search(r"8\.lua:1: .*near", reports[0]), reports[0]
    assert listening_scripts(b) == ["7.lua", "9.lua"]
    assert served_name(b, 7) == b"7"
    assert served_name(b, 9) == b"9"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((HOST, b.port(8)), timeout=5).close()


# --- start-up failures ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "files",
    [{}, {"ssh.lua": echo_name("x"), "0.lua": echo_name("x")}, {"8.lua": "this is not lua\n"}],
    ids=["empty", "only-ignored", "only-broken"],
)
def test_no_servable_script_exits_non_zero(make_broker, files):
    b = make_broker(files, ready=False, expect_exit=1)
    rc, stderr = wait_exit(b)
    assert rc != 0
    assert_one_error_line(stderr, "script")
    assert not [line for line in b.lines if "listening on" in line]


def test_missing_folder_is_one_clear_error(tmp_path: Path):
    missing = tmp_path / "no-such-folder"
    rc, out, err = run_cli(["--scripts", str(missing), "--host", HOST, "--port-offset", "20000"])
    assert rc != 0
    assert_one_error_line(err, str(missing))
    assert "listening on" not in out


@pytest.mark.parametrize("offset", [65530, -10])
def test_port_offset_outside_range_is_a_clear_error(tmp_path: Path, offset: int):
    (tmp_path / "7.lua").write_text(echo_name("7"))
    rc, out, err = run_cli(["--scripts", str(tmp_path), "--host", HOST, "--port-offset", str(offset)])
    assert rc != 0
    line = assert_one_error_line(err, "7.lua")
    assert "offset" in line or str(7 + offset) in line, line
    assert "listening on" not in out


@pytest.mark.parametrize(
    "flag",
    [
        ["--workers", "0"],
        ["--workers", "x"],
        ["--port-offset", "abc"],
        ["--log-level", "loud"],
        ["--log-rate", "0"],
    ],
    ids=lambda f: " ".join(f),
)
def test_bad_flag_values_are_one_line_errors(tmp_path: Path, flag: list[str]):
    (tmp_path / "7.lua").write_text(echo_name("7"))
    offset = free_offset([7])
    args = ["--scripts", str(tmp_path), "--host", HOST, "--port-offset", str(offset), *flag]
    rc, out, err = run_cli(args)
    assert rc != 0
    line = assert_one_error_line(err)
    assert flag[0] in line or repr(flag[1]) in line or flag[1] in line, line
    assert "listening on" not in out
