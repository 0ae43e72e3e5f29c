"""The seccomp filter's argument checks, tried with native calls after the real `lockdown()`: a child
reads only its own and the system's clocks, never another process's, and resizes memory only the way
realloc does, never moving a mapping to an address of its choosing."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO

PRELUDE = """
import ctypes, mmap, os
from sandbox.lockdown import Rlimits, lockdown
libc = ctypes.CDLL(None, use_errno=True)
class Timespec(ctypes.Structure):
    _fields_ = [("sec", ctypes.c_long), ("nsec", ctypes.c_long)]
def clock(clock_id):
    return libc.clock_gettime(ctypes.c_int(clock_id), ctypes.byref(Timespec()))
libc.mmap.restype = libc.mremap.restype = ctypes.c_void_p
c_int, c_size_t, c_void_p = ctypes.c_int, ctypes.c_size_t, ctypes.c_void_p
libc.mmap.argtypes = [c_void_p, c_size_t, c_int, c_int, c_int, ctypes.c_long]
libc.mremap.argtypes = [c_void_p, c_size_t, c_size_t, c_int, c_void_p]
PAGE = mmap.PAGESIZE
block = libc.mmap(None, PAGE, 3, 0x22, -1, 0)  # read|write, private|anonymous
target = libc.mmap(None, 4 * PAGE, 3, 0x22, -1, 0)
parent = os.getppid()
lockdown(Rlimits(address_space=1 << 31, cpu_seconds=10), parent)
"""

MREMAP_MAYMOVE, MREMAP_FIXED, MREMAP_DONTUNMAP = 1, 2, 4


def cpu_clock_of(pid: int, thread: bool = False) -> int:
    """The clock id naming a process's (or thread's) CPU clock, as the kernel's MAKE_*_CPUCLOCK builds it
    (the child's own parent is named in its code: `(~parent << 3) | 2`)."""
    return (~pid << 3) | (6 if thread else 2)  # CPUCLOCK_SCHED, plus CPUCLOCK_PERTHREAD_MASK for a thread


def run_locked(code: str) -> subprocess.CompletedProcess[bytes]:
    source = PRELUDE + textwrap.dedent(code) + "\nos.write(1, b'survived')\nos._exit(0)\n"
    return subprocess.run([sys.executable, "-c", source], capture_output=True, timeout=20, cwd=REPO)


KILLED = {
    "the parent's CPU clock": "clock((~parent << 3) | 2)",
    "another thread's CPU clock": f"clock({cpu_clock_of(1, thread=True)})",
    "pid 1's CPU clock": f"clock({cpu_clock_of(1)})",
    "a dynamic (fd) clock": "clock((~3 << 3) | 3)",
    "a clock id past CLOCK_TAI": "clock(12)",
    "mremap with MREMAP_FIXED": f"libc.mremap(block, PAGE, PAGE, {MREMAP_MAYMOVE | MREMAP_FIXED}, target)",
    "mremap with MREMAP_DONTUNMAP": f"libc.mremap(block, PAGE, PAGE, {MREMAP_MAYMOVE | MREMAP_DONTUNMAP}, 0)",
}


@pytest.mark.parametrize("attempt", list(KILLED))
def test_the_call_kills_the_child(attempt: str) -> None:
    result = run_locked(KILLED[attempt])
    assert result.returncode == -signal.SIGSYS, (result.returncode, result.stderr[-500:])


def test_the_clocks_and_reallocations_a_child_needs_still_work() -> None:
    # realtime, monotonic, own process and thread CPU clocks, the raw/coarse/boottime ones and TAI; the
    # alarm clocks (8, 9) and the unused 10 pass the filter and fail in the kernel with EINVAL.
    result = run_locked(
        f"""
        for clock_id in (0, 1, 2, 3, 4, 5, 6, 7, 11):
            assert clock(clock_id) == 0, clock_id
        assert clock(10) == -1 and ctypes.get_errno() == 22
        grown = libc.mremap(block, PAGE, 64 * PAGE, {MREMAP_MAYMOVE}, None)
        assert grown not in (None, ctypes.c_void_p(-1).value)
        assert libc.mremap(grown, 64 * PAGE, PAGE, 0, None) == grown  # shrinking in place
        """
    )
    assert result.returncode == 0 and result.stdout == b"survived", result.stderr[-800:]
