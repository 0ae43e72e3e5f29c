"""A sandbox child is locked down: proven from /proc on live pool children, and by running code after the
real `lockdown()` that tries each forbidden syscall family and dies by SIGSYS."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.conftest import REPO, descendants, sandboxes_below


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:  # it exited meanwhile
        return ""


def _ppid(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except OSError:
        return -1


def _status(pid: int) -> dict[str, str]:
    with open(f"/proc/{pid}/status") as f:
        return dict(line.split(":\t", 1) for line in f.read().splitlines() if ":\t" in line)


def _sandbox_children(broker_pid: int) -> list[int]:
    zygote = [
        p for p in descendants(broker_pid) if "sandbox.zygote" in _cmdline(p) and _ppid(p) == broker_pid
    ]
    assert len(zygote) == 1, "expected exactly one zygote"
    return sandboxes_below(zygote[0])


def test_pool_children_are_locked_down(make_broker) -> None:
    b = make_broker({"7.lua": "deadend.send('x')"}, "--warm", "3")
    deadline = time.monotonic() + 5
    children: list[int] = []
    while time.monotonic() < deadline and len(children) < 3:
        children = _sandbox_children(b.proc.pid)
        time.sleep(0.05)
    assert len(children) >= 3
    time.sleep(0.3)  # let the start-up compile checks' children be reaped; warm ones stay
    children = _sandbox_children(b.proc.pid)
    assert len(children) >= 3
    for pid in children:
        status = _status(pid)
        assert status["Seccomp"].strip() == "2", status  # filter mode
        assert status["NoNewPrivs"].strip() == "1"
        assert int(status["Seccomp_filters"]) >= 1
        # nothing inherited: only the two pipes and /dev/null
        assert sorted(int(fd) for fd in os.listdir(f"/proc/{pid}/fd")) == [0, 1, 2]
        assert os.readlink(f"/proc/{pid}/fd/2") == "/dev/null"
        with open(f"/proc/{pid}/limits") as f:
            limits = f.read()
        assert "Max open files            3                    3" in limits
        assert "Max file size             0                    0" in limits
        assert "Max core file size        0                    0" in limits
        # its own session, away from the operator's terminal
        assert os.getsid(pid) != os.getsid(0)


PRELUDE = """
import ctypes, os, socket, sys, mmap, time
from sandbox.lockdown import Rlimits, lockdown
libc = ctypes.CDLL(None, use_errno=True)
libc.mmap.restype = ctypes.c_void_p
c_int = ctypes.c_int
libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, c_int, c_int, c_int, ctypes.c_long]
lockdown(Rlimits(address_space=1 << 31, cpu_seconds=10), os.getppid())
"""

# Each forbidden family, tried once after lockdown: the process must die by SIGSYS.
FORBIDDEN = {
    "open a file": "os.open('/etc/hostname', os.O_RDONLY)",
    "create a socket": "socket.socket()",
    "execve": "os.execv('/bin/true', ['true'])",
    "fork": "os.fork()",
    "kill another process": "os.kill(1, 0)",
    "ptrace": "libc.ptrace(0, 0, 0, 0)",
    "executable mmap": "libc.mmap(None, 4096, mmap.PROT_READ | mmap.PROT_EXEC, 0x22, -1, 0)",  # private|anon
    "mprotect to executable": "libc.mprotect(libc.mmap(None, 4096, 3, 0x22, -1, 0), 4096, 5)",
    "ioctl on the terminal": "libc.ioctl(0, 0x5412, ctypes.c_char_p(b'x'))",  # TIOCSTI
    "unshare namespaces": "libc.unshare(0x40000000)",  # CLONE_NEWNET
    "write to stderr": "os.write(2, b'x')",
    "read another fd": "os.read(1, 1)",
    "getpid (anything unlisted)": "os.getpid()",
}


def _run_locked(code: str, stdin: bytes = b"") -> subprocess.CompletedProcess[bytes]:
    source = PRELUDE + textwrap.dedent(code) + "\nos._exit(0)\n"
    return subprocess.run(
        [sys.executable, "-c", source], input=stdin, capture_output=True, timeout=20, cwd=REPO
    )


@pytest.mark.parametrize("attempt", list(FORBIDDEN))
def test_forbidden_syscalls_kill_the_child(attempt: str) -> None:
    result = _run_locked(FORBIDDEN[attempt])
    assert result.returncode == -signal.SIGSYS, (result.returncode, result.stderr[-500:])


def test_what_a_child_needs_still_works() -> None:
    # read fd 0, write fd 1, large non-executable allocations, the CPU clock, exit
    result = _run_locked(
        """
        data = os.read(0, 10)
        block = bytearray(64 << 20)
        block[-1] = 1
        del block
        t = time.process_time() + time.time()
        os.write(1, b"ok " + data)
        """,
        stdin=b"ping",
    )
    assert result.returncode == 0, result.stderr[-500:]
    assert result.stdout == b"ok ping"


def test_lockdown_layers_below_the_filter() -> None:
    # The same lockdown() with an allow-all filter, so the process can inspect itself afterwards.
    code = PRELUDE.replace(
        "os.getppid())", "os.getppid(), __import__('pyseccomp').SyscallFilter(__import__('pyseccomp').ALLOW))"
    ) + textwrap.dedent(
        """
        import resource
        assert libc.prctl(3, 0, 0, 0, 0) == 0, "still dumpable"  # PR_GET_DUMPABLE
        assert libc.prctl(2, ctypes.byref(sig := ctypes.c_int()), 0, 0, 0) == 0 and sig.value == 9
        for fd in range(3, 256):  # every inherited descriptor above stderr is closed
            try:
                os.fstat(fd)
                raise AssertionError(f"fd {fd} still open")
            except OSError as e:
                assert e.errno == 9  # EBADF
        assert resource.getrlimit(resource.RLIMIT_NOFILE) == (3, 3)
        assert resource.getrlimit(resource.RLIMIT_CPU) == (10, 11)
        assert resource.getrlimit(resource.RLIMIT_AS) == (1 << 31, 1 << 31)
        try:
            open("/dev/null")  # any new descriptor; nothing created if it wrongly succeeds
        except OSError as e:
            assert e.errno == 24  # EMFILE: rlimits alone already refuse new files
        else:
            raise AssertionError("a file was opened past RLIMIT_NOFILE")
        os.write(1, b"ok")
        os._exit(0)
        """
    )
    inherited_r, inherited_w = os.pipe()  # something a careless spawn would leak into the child
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code],
            capture_output=True,
            timeout=20,
            cwd=REPO,
            pass_fds=(inherited_r, inherited_w),
        )
    finally:
        os.close(inherited_r)
        os.close(inherited_w)
    assert proc.returncode == 0 and proc.stdout == b"ok", proc.stderr[-800:]


def test_lockdown_refuses_when_the_parent_is_gone() -> None:
    result = _run_locked("pass").returncode
    assert result == 0
    code = PRELUDE.replace("os.getppid())", "os.getppid() + 1)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=20, cwd=REPO)
    assert proc.returncode != 0
    assert b"LockdownError" in proc.stderr
