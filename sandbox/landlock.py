"""Landlock: from the zygote on, no file can be opened, created, renamed or removed, no TCP port bound or
connected, no abstract Unix socket reached and no process signalled outside the zygote's own domain.

An empty ruleset that handles every access right this kernel's ABI knows: nothing is allowed. It is
applied after everything the zygote needs is open (its control socket, /dev/null, every module), and
descriptors opened before keep working, which is all a sandbox uses. Not a privileged operation: it
needs only no_new_privs, which every sandbox's seccomp filter sets anyway.
"""

from __future__ import annotations

import ctypes
import errno
import os

from sandbox import syscalls
from sandbox.layers import Skipped

LANDLOCK_CREATE_RULESET_VERSION = 1

# handled_access_fs: the 13 rights of ABI 1, then REFER (2), TRUNCATE (3), IOCTL_DEV (5)
_FS_BY_ABI = ((1, (1 << 13) - 1), (2, 1 << 13), (3, 1 << 14), (5, 1 << 15))
_NET_BIND_TCP, _NET_CONNECT_TCP = 1 << 0, 1 << 1  # ABI 4
_SCOPE_ABSTRACT_UNIX_SOCKET, _SCOPE_SIGNAL = 1 << 0, 1 << 1  # ABI 6


class _RulesetAttr(ctypes.Structure):
    _fields_ = [
        ("handled_access_fs", ctypes.c_uint64),
        ("handled_access_net", ctypes.c_uint64),
        ("scoped", ctypes.c_uint64),
    ]


def handled(abi: int) -> tuple[int, int, int]:
    """(fs, net, scoped) rights to handle at this ABI: all it knows, since handling one it lacks is EINVAL."""
    fs = 0
    for since, bits in _FS_BY_ABI:
        if abi >= since:
            fs |= bits
    net = _NET_BIND_TCP | _NET_CONNECT_TCP if abi >= 4 else 0
    scoped = _SCOPE_ABSTRACT_UNIX_SOCKET | _SCOPE_SIGNAL if abi >= 6 else 0
    return fs, net, scoped


def attr_size(abi: int) -> int:
    """The struct as this ABI knows it: older kernels refuse a longer one with fields they lack."""
    return 8 if abi < 4 else 16 if abi < 6 else 24


def abi() -> int:
    try:
        return syscalls.syscall(
            syscalls.SYS_LANDLOCK_CREATE_RULESET, None, 0, LANDLOCK_CREATE_RULESET_VERSION, what="landlock"
        )
    except OSError as e:
        if e.errno == errno.ENOSYS:
            raise Skipped("not in this kernel") from e
        if e.errno == errno.EOPNOTSUPP:
            raise Skipped("disabled at boot (not in the lsm= list)") from e
        raise


def forbid_all() -> None:
    version = abi()
    fs, net, scoped = handled(version)
    attr = _RulesetAttr(fs, net, scoped)
    ruleset = syscalls.syscall(
        syscalls.SYS_LANDLOCK_CREATE_RULESET, ctypes.byref(attr), attr_size(version), 0, what="landlock"
    )
    try:
        syscalls.prctl(syscalls.PR_SET_NO_NEW_PRIVS, 1)
        syscalls.syscall(syscalls.SYS_LANDLOCK_RESTRICT_SELF, ruleset, 0, what="landlock_restrict_self")
    finally:
        os.close(ruleset)
