"""The zygote's isolation layers, proven on real workers from /proc, in each way the zygote can start:
as root, as root with --user nobody, and as an ordinary user (tests/sandbox/zygote_client.py)."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from broker.isolation import check_isolation
from deadend.config import Config
from deadend.wire import LAYERS as ORDER
from deadend.wire import ZYGOTE_ENV as ENVIRONMENT
from sandbox.landlock import abi
from sandbox.layers import Skipped
from tests.conftest import ns_pids, wait_gone
from tests.sandbox.zygote_client import MODES, NOBODY, ZygoteUnderTest

NAMESPACES = ("user", "pid", "net", "ipc", "mnt")
CAPABILITY_SETS = ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")


def _absent() -> str:
    """Why this kernel cannot give every layer, or "" (only a missing kernel feature may skip a test)."""
    if Path("/proc/sys/user/max_user_namespaces").read_text().strip() == "0":
        return "user namespaces are disabled here (user.max_user_namespaces = 0)"
    try:
        abi()
    except Skipped as e:
        return f"Landlock: {e}"
    return ""


pytestmark = pytest.mark.skipif(bool(_absent()), reason=_absent() or "-")


def status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return {k: v.strip() for k, _, v in (line.partition(":") for line in f)}


def namespace(pid: int | str, name: str) -> str:
    return os.readlink(f"/proc/{pid}/ns/{name}")


def processes_in(pid_namespace: str) -> set[int]:
    """Every process of this machine in that PID namespace: what its members can see of the system."""
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if namespace(entry, "pid") == pid_namespace:
                    found.add(int(entry))
            except OSError:
                continue
    return found


@pytest.fixture(params=MODES)
def zygote(request: pytest.FixtureRequest) -> Iterator[ZygoteUnderTest]:
    if os.geteuid() != 0:
        pytest.skip("starting the zygote as root, as nobody and as --user nobody needs root")
    z = ZygoteUnderTest(request.param)
    try:
        z.start()
        yield z
    finally:
        z.stop()


def test_every_layer_is_applied(zygote: ZygoteUnderTest) -> None:
    assert [layer.name for layer in zygote.layers] == list(ORDER)
    assert [layer for layer in zygote.layers if not layer.applied] == []


def test_workers_hold_nothing_and_see_nothing(zygote: ZygoteUnderTest) -> None:
    workers = [zygote.fork(), zygote.fork()]
    server = zygote.fork_server()
    uid = "0" if zygote.mode == "root" else str(NOBODY)
    for pid in [server, *(w.pid for w in workers)]:
        found = status(pid)
        assert {name: found[name] for name in CAPABILITY_SETS} == dict.fromkeys(CAPABILITY_SETS, "0" * 16)
        assert found["Uid"].split() == [uid] * 4, found["Uid"]
        for name in NAMESPACES:
            assert namespace(pid, name) != namespace("self", name), name
        assert os.listdir(f"/proc/{pid}/root") == []  # an empty root...
        assert os.statvfs(f"/proc/{pid}/root").f_flag & os.ST_RDONLY  # ...that stays empty
    for w in workers:
        assert status(w.pid)["Seccomp"] == "2"
        with open(f"/proc/{w.pid}/environ", "rb") as f:
            assert f.read() == b"".join(f"{k}={v}\0".encode() for k, v in ENVIRONMENT.items())
    # The fork server is its PID namespace's init, and the namespace holds it and the workers: nothing else
    # of this machine is there for a worker to see.
    assert ns_pids(server) == [server, 1]
    assert processes_in(namespace(workers[0].pid, "pid")) == {server, *(w.pid for w in workers)}


NET_PROBE = """
import ctypes, fcntl, json, os, socket, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
assert libc.setns(os.open(sys.argv[1], os.O_RDONLY), 0x40000000) == 0, os.strerror(ctypes.get_errno())
probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
flags = {}
for _, name in socket.if_nameindex():  # SIOCGIFFLAGS
    request = struct.pack("16sH", name.encode(), 0)
    flags[name] = struct.unpack("16sH", fcntl.ioctl(probe, 0x8913, request)[:18])[1]
try:
    socket.create_connection(("127.0.0.1", 9), timeout=2)
    reached = "connected"
except OSError as e:
    reached = e.strerror
print(json.dumps({"flags": flags, "loopback": reached}))
"""


def test_the_network_is_empty(zygote: ZygoteUnderTest) -> None:
    worker = zygote.fork()
    probe = subprocess.run(
        [sys.executable, "-c", NET_PROBE, f"/proc/{worker.pid}/ns/net"],
        capture_output=True,
        text=True,
        timeout=20,
    )
    assert probe.returncode == 0, probe.stderr
    seen = json.loads(probe.stdout)
    assert list(seen["flags"]) == ["lo"]
    assert not seen["flags"]["lo"] & 1  # IFF_UP: even loopback is down
    assert seen["loopback"] == os.strerror(101)  # ENETUNREACH


def test_nothing_outlives_the_zygote(zygote: ZygoteUnderTest) -> None:
    workers = [zygote.fork(), zygote.fork()]
    server = zygote.fork_server()
    assert zygote.proc is not None
    os.kill(zygote.proc.pid, signal.SIGKILL)  # what the broker's own death does to it (parent-death signal)
    assert wait_gone([server, *(w.pid for w in workers)]) == []


def test_an_inherited_environment_is_reported_never_shown() -> None:
    if os.geteuid() != 0:
        pytest.skip("the zygote is started as root here")
    z = ZygoteUnderTest("root", env={**ENVIRONMENT, "DEADEND_CANARY": "hunter2"})
    try:
        z.start()
    finally:
        z.stop()
    [environment] = [layer for layer in z.layers if layer.name == "environment"]
    assert "DEADEND_CANARY" in environment.skipped and "hunter2" not in environment.skipped
    assert [layer.name for layer in z.layers if not layer.applied] == ["environment"]


def test_check_isolation_lists_every_layer() -> None:
    out = io.StringIO()
    assert check_isolation(Config(scripts=Path(), allow_root=os.geteuid() == 0), out) == 0
    rows = out.getvalue().splitlines()
    assert [row.split()[:2] for row in rows] == [[name, "active:"] for name in ORDER]


def test_check_isolation_refuses_root_sandboxes_like_the_broker(capsys: pytest.CaptureFixture[str]) -> None:
    if os.geteuid() != 0:
        pytest.skip("the refusal is root's")
    out = io.StringIO()
    assert check_isolation(Config(scripts=Path()), out) == 1
    assert out.getvalue() == ""
    assert "refusing to run sandboxes as root" in capsys.readouterr().err


def test_without_a_user_namespace_an_ordinary_user_still_serves() -> None:
    """Where user namespaces are refused (a sysctl, AppArmor, systemd), an ordinary user can create no other
    namespace and cannot drop the bounding set: each of those layers is skipped with its reason, and the
    zygote still forks workers that lock themselves down."""
    if os.geteuid() != 0:
        pytest.skip("the ordinary user is made from root here")
    z = ZygoteUnderTest("ordinary user", off=("user",))
    try:
        z.start()
        skipped = {layer.name: layer.skipped for layer in z.layers if not layer.applied}
        assert set(skipped) == {"user", "ipc", "net", "mnt", "pid", "capabilities"}, skipped
        for name in ("ipc", "net", "mnt", "pid"):
            assert skipped[name].endswith("Operation not permitted (no user namespace, not root)"), skipped
        assert "bounding set" in skipped["capabilities"]
        worker = z.fork()
        found = status(worker.pid)
        assert found["Seccomp"] == "2"
        assert found["CapEff"] == found["CapPrm"] == found["CapInh"] == found["CapAmb"] == "0" * 16
        assert namespace(worker.pid, "net") == namespace("self", "net")  # as said: no namespace
    finally:
        z.stop()


# What systemd does to the zygote with `RestrictNamespaces=yes` and a filter without its calls
# (SystemCallErrorNumber=EPERM): every one of them fails with EPERM.
REFUSING = """
refuse = pyseccomp.SyscallFilter(pyseccomp.ALLOW)
for name in ("unshare", "mount", "umount2", "pivot_root", "capset", "landlock_create_ruleset"):
    refuse.add_rule(pyseccomp.ERRNO(1), name)
refuse.load()
"""


def test_a_setup_that_refuses_every_layer_still_serves() -> None:
    if os.geteuid() != 0:
        pytest.skip("the zygote is started as root here")
    z = ZygoteUnderTest("root", prelude=REFUSING)
    try:
        z.start()
        skipped = {layer.name: layer.skipped for layer in z.layers if not layer.applied}
        assert set(skipped) == set(ORDER) - {"environment"}, skipped
        assert all("Operation not permitted" in why for why in skipped.values()), skipped
        worker = z.fork()
        assert status(worker.pid)["Seccomp"] == "2"
    finally:
        z.stop()
