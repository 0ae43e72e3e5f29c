"""The Linux calls the isolation layers need and Python 3.11's os module lacks, through ctypes.

One home for their numbers and flags (values from the kernel's uapi headers). Every wrapper raises
OSError carrying errno and the call's name, so a layer the kernel refuses becomes one clear line.
"""

from __future__ import annotations

import ctypes
import os
import platform
from typing import Final

libc = ctypes.CDLL(None, use_errno=True)

# unshare(2) flags
CLONE_NEWNS: Final = 0x00020000
CLONE_NEWIPC: Final = 0x08000000
CLONE_NEWUSER: Final = 0x10000000
CLONE_NEWPID: Final = 0x20000000
CLONE_NEWNET: Final = 0x40000000

# mount(2) and umount2(2) flags
MS_RDONLY: Final = 0x1
MS_NOSUID: Final = 0x2
MS_NODEV: Final = 0x4
MS_NOEXEC: Final = 0x8
MS_REC: Final = 0x4000
MS_PRIVATE: Final = 0x40000
MNT_DETACH: Final = 0x2

# prctl(2) options
PR_SET_PDEATHSIG: Final = 1
PR_SET_DUMPABLE: Final = 4
PR_CAPBSET_READ: Final = 23
PR_CAPBSET_DROP: Final = 24
PR_SET_NO_NEW_PRIVS: Final = 38
PR_CAP_AMBIENT: Final = 47
PR_CAP_AMBIENT_CLEAR_ALL: Final = 4

# Calls without a glibc wrapper. Landlock's numbers are the same on every architecture; pivot_root's
# are not (x86_64, and the generic table arm64 uses).
SYS_LANDLOCK_CREATE_RULESET: Final = 444
SYS_LANDLOCK_ADD_RULE: Final = 445
SYS_LANDLOCK_RESTRICT_SELF: Final = 446
SYS_PIVOT_ROOT: Final = {"x86_64": 155, "aarch64": 41}.get(platform.machine())

_LINUX_CAPABILITY_VERSION_3: Final = 0x20080522


def _check(result: int, what: str) -> int:
    if result == -1:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return result


def prctl(option: int, arg2: int = 0, arg3: int = 0) -> int:
    return _check(libc.prctl(ctypes.c_int(option), ctypes.c_ulong(arg2), ctypes.c_ulong(arg3), 0, 0), "prctl")


def unshare(flags: int, what: str) -> None:
    _check(libc.unshare(ctypes.c_int(flags)), what)


def mount(source: bytes | None, target: bytes, fstype: bytes | None, flags: int, data: bytes | None) -> None:
    _check(libc.mount(source, target, fstype, ctypes.c_ulong(flags), data), "mount")


def umount2(target: bytes, flags: int) -> None:
    _check(libc.umount2(target, ctypes.c_int(flags)), "umount2")


def pivot_root(new_root: bytes, put_old: bytes) -> None:
    if SYS_PIVOT_ROOT is None:
        raise OSError(0, f"pivot_root: system call number unknown on {platform.machine()}")
    _check(libc.syscall(ctypes.c_long(SYS_PIVOT_ROOT), new_root, put_old), "pivot_root")


def syscall(number: int, *args: object, what: str) -> int:
    # Integers as longs: syscall(2) reads every argument as a long, and ctypes would pass an int.
    passed = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]
    return int(_check(libc.syscall(ctypes.c_long(number), *passed), what))


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [(name, ctypes.c_uint32) for name in ("effective", "permitted", "inheritable")]


def capget() -> tuple[int, int, int]:
    """This thread's (effective, permitted, inheritable) capability sets, 64 bits each."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(libc.capget(ctypes.byref(header), data), "capget")
    sets = [(data[1].effective << 32) | data[0].effective]
    sets.append((data[1].permitted << 32) | data[0].permitted)
    sets.append((data[1].inheritable << 32) | data[0].inheritable)
    return sets[0], sets[1], sets[2]


def capset_empty() -> None:
    """Empty the effective, permitted and inheritable sets (always allowed: it only lowers them)."""
    header = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _check(libc.capset(ctypes.byref(header), data), "capset")
