"""Under a real broker: what a sandbox can read (the broker's environment), see (other processes, the
broker's namespaces) and learn (addresses of the shared layout), checked from /proc and over sessions."""

from __future__ import annotations

import os
import re
import socket

import pytest

from deadend.wire import LAYERS as ORDER
from tests.conftest import Broker, descendants, fork_server, ns_pids, parent_of, read_until, zygote_of

CANARY = "DEADEND_CANARY_VARIABLE"
CANARY_VALUE = "s3cret-that-must-stay-in-the-broker"
HOLD = 'deadend.send("up\\n") deadend.recv(1)'
NAMESPACES = ("user", "pid", "net", "ipc", "mnt")
IS_ROOT = os.geteuid() == 0


def held_sessions(b: Broker, count: int) -> list[socket.socket]:
    clients = [b.connect(7) for _ in range(count)]
    for c in clients:
        assert read_until(c, b"\n") == b"up\n"
    return clients


def processes_in(pid_namespace: str) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.readlink(f"/proc/{entry}/ns/pid") == pid_namespace:
                    found.add(int(entry))
            except OSError:
                continue
    return found


@pytest.mark.parametrize("user", [[], ["--user", "nobody"]], ids=["as-is", "user-nobody"])
def test_sandboxes_read_nothing_see_nothing_hold_nothing(make_broker, user: list[str]) -> None:
    if user and not IS_ROOT:
        pytest.skip("--user needs root")
    b = make_broker({"7.lua": HOLD}, *user, env={**os.environ, CANARY: CANARY_VALUE})
    line = b.wait_for(r"sandbox isolation: (.*)").group(1)
    assert line.split(", ") == list(ORDER)
    assert "skipped" not in "\n".join(b.lines)
    clients = held_sessions(b, 3)
    try:
        zygote = zygote_of(b)
        server = fork_server(zygote)
        sandboxes = descendants(server)
        assert server != zygote and len(sandboxes) >= 3
        for pid in descendants(b.proc.pid):  # the launcher too (--user), and every sandbox
            with open(f"/proc/{pid}/environ", "rb") as f:
                assert CANARY.encode() not in f.read(), f"pid {pid} inherited the broker's environment"
        for pid in [zygote, server, *sandboxes]:
            with open(f"/proc/{pid}/status") as f:
                status = dict(line.split(":", 1) for line in f if ":" in line)
            for capabilities in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
                assert int(status[capabilities], 16) == 0, (pid, capabilities, status[capabilities])
        for pid in sandboxes:
            for name in NAMESPACES:
                assert os.readlink(f"/proc/{pid}/ns/{name}") != os.readlink(f"/proc/{b.proc.pid}/ns/{name}")
            assert len(ns_pids(pid)) == 2  # a pid here and one in the sandboxes' namespace
        # What a sandbox can see of the machine's processes: its namespace's, which are the fork server (its
        # init) and the fork server's children, the sandboxes (the pool may be forking more meanwhile).
        members = processes_in(os.readlink(f"/proc/{sandboxes[0]}/ns/pid"))
        assert {server, *sandboxes} <= members
        for pid in members - {server}:
            assert parent_of(pid) in (server, None), f"pid {pid} in the sandboxes' namespace"
        assert ns_pids(server)[-1] == 1
    finally:
        for c in clients:
            c.close()


# Each value Lua would print with an address, and the seed math.randomseed() derives from one.
SHOW = """
local t = {}
local a, b = math.randomseed()
local shown = {
  tostring(string.len), tostring({}), string.format("%p", {}), ("%p"):format(t), string.format("%s", t),
  tostring(print), tostring(deadend.send), tostring(string.format), a, b,
}
for i = 1, #shown do shown[i] = tostring(shown[i]) end
deadend.send(table.concat(shown, " ") .. "\\n")
deadend.recv(1)
"""


def pointer_like(token: str) -> bool:
    """An address-sized number: hex past a per-session counter's range, or an integer wider than 32 bits."""
    hex_value = re.fullmatch(r"0x([0-9a-fA-F]+)", token)
    if hex_value:
        return int(hex_value.group(1), 16) >= 0x10000
    return bool(re.fullmatch(r"-?\d+", token)) and abs(int(token)) >= 1 << 32


def test_concurrent_sessions_share_no_pointer_like_value(make_broker) -> None:
    b = make_broker({"7.lua": SHOW})
    clients = [b.connect(7) for _ in range(3)]
    try:
        shown = [read_until(c, b"\n").decode().split() for c in clients]
    finally:
        for c in clients:
            c.close()
    tokens = [{t.rstrip(":") for t in session} for session in shown]
    for session in tokens:
        assert not [t for t in session if t.startswith("0x") and pointer_like(t)], session
    pointers = [{t for t in session if pointer_like(t)} for session in tokens]
    assert all(len(p) == 2 for p in pointers), pointers  # math.randomseed()'s two numbers, nothing else
    for i in range(3):
        for j in range(i + 1, 3):
            assert not pointers[i] & pointers[j], (shown[i], shown[j])
