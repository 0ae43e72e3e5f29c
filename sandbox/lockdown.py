"""Lock a sandbox worker down, in this order (each step relies on the ones before), before it reads a
single untrusted byte.

    parent-death signal (and re-check the parent) -> not dumpable -> close every inherited fd but the
    pipes -> rlimits -> seccomp allowlist with default kill and no executable mappings

After `lockdown()` returns, the process can read fd 0, write fd 1, manage memory without PROT_EXEC, read
its own and the system's clocks, and exit. Everything else kills it with SIGSYS.
"""

from __future__ import annotations

import ctypes
import errno
import os
import resource
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pyseccomp as sc

_libc = ctypes.CDLL(None, use_errno=True)
PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PROT_EXEC = 0x4
MREMAP_MAYMOVE = 0x1
# The clocks a child may read: realtime, monotonic, its own process and thread CPU clocks, and the other
# fixed system clocks up to CLOCK_TAI. A negative id names another process's or thread's CPU clock (the
# pid is encoded in it) or a dynamic clock: compared unsigned, every one of them is above this.
CLOCK_TAI = 11


@dataclass(frozen=True, slots=True)
class Rlimits:
    """Process-level backstops; the broker's own deadlines normally act first."""

    address_space: int  # bytes; bounds the Python side, which max_memory does not count
    cpu_seconds: int  # per session: SIGXCPU at the soft limit, SIGKILL one second later


class LockdownError(Exception):
    pass


def _prctl(option: int, arg: int) -> None:
    if _libc.prctl(option, arg, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise LockdownError(f"prctl({option}) failed: {os.strerror(err)}")


def switch_user(uid: int, gid: int) -> None:
    """Become uid/gid for good (the broker's --user): no supplementary groups, all three ids, no way back.

    A credential change clears the parent-death signal and the dumpable flag; callers set them after.
    """
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise LockdownError(f"could not switch to uid {uid} gid {gid}")
    if uid != 0:
        try:
            os.setuid(0)
        except PermissionError:
            return
        raise LockdownError("root could be regained after switching user")


def build_filter() -> sc.SyscallFilter:
    """The seccomp allowlist, one syscall per line with the reason beside it: each was found needed by a
    worker's own run (Lua, lupa, msgpack, the pipe), nothing else is allowed."""
    import pyseccomp as sc  # imported here: the zygote first points ctypes at the resolved libseccomp

    f = sc.SyscallFilter(defaction=sc.KILL_PROCESS)  # anything unlisted kills the whole process
    f.add_rule(sc.ALLOW, "read", sc.Arg(0, sc.EQ, 0))  # requests' replies: the broker's pipe on fd 0
    f.add_rule(sc.ALLOW, "write", sc.Arg(0, sc.EQ, 1))  # requests: the pipe to the broker on fd 1
    f.add_rule(sc.ALLOW, "mmap", sc.Arg(2, sc.MASKED_EQ, PROT_EXEC, 0))  # large allocations, never exec
    f.add_rule(sc.ALLOW, "brk")  # the main malloc arena
    f.add_rule(sc.ALLOW, "munmap")  # freeing large allocations
    # realloc of large blocks: glibc passes 0 or MREMAP_MAYMOVE. MREMAP_FIXED (place it at an address of
    # the caller's choosing, over an existing mapping) and MREMAP_DONTUNMAP kill.
    f.add_rule(sc.ALLOW, "mremap", sc.Arg(3, sc.EQ, 0))
    f.add_rule(sc.ALLOW, "mremap", sc.Arg(3, sc.EQ, MREMAP_MAYMOVE))
    # os.clock() (the process CPU clock is not served by the vDSO); never another process's clock
    f.add_rule(sc.ALLOW, "clock_gettime", sc.Arg(0, sc.LE, CLOCK_TAI))
    f.add_rule(sc.ALLOW, "gettimeofday")  # vDSO fallback for time()
    f.add_rule(sc.ALLOW, "exit_group")  # os._exit
    f.add_rule(sc.ALLOW, "exit")
    # Benign probes that must fail quietly rather than kill (OpenSSH's approach): glibc may trim or
    # randomise on its own initiative.
    f.add_rule(sc.ERRNO(errno.EPERM), "madvise")
    f.add_rule(sc.ERRNO(errno.EPERM), "getrandom")
    return f


def close_inherited_fds(keep: int = 2) -> None:
    """Close every fd above `keep` (0, 1, 2 are the pipes and /dev/null)."""
    os.closerange(keep + 1, 1 << 20)


def set_rlimits(limits: Rlimits) -> None:
    hard = {
        resource.RLIMIT_NOFILE: 3,  # no new fd can be opened; 0..2 stay usable
        resource.RLIMIT_NPROC: 0,  # no processes (root ignores it: seccomp is the real barrier)
        resource.RLIMIT_FSIZE: 0,  # no file may grow
        resource.RLIMIT_CORE: 0,  # no core dump of a process holding attacker data
        resource.RLIMIT_MEMLOCK: 0,
        resource.RLIMIT_AS: limits.address_space,
    }
    for which, value in hard.items():
        resource.setrlimit(which, (value, value))
    resource.setrlimit(resource.RLIMIT_CPU, (limits.cpu_seconds, limits.cpu_seconds + 1))


def lockdown(limits: Rlimits, parent_pid: int, seccomp_filter: sc.SyscallFilter | None = None) -> None:
    """Apply every layer; raise LockdownError (the caller exits) if any cannot be applied."""
    seccomp_filter = seccomp_filter or build_filter()  # built while imports can still open files
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        raise LockdownError("parent exited during start-up")
    _prctl(PR_SET_DUMPABLE, 0)  # no ptrace attach, no /proc/PID/mem from same-uid processes
    close_inherited_fds()
    set_rlimits(limits)
    seccomp_filter.load()  # libseccomp sets no_new_privs itself
