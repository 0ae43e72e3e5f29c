"""Capabilities: the zygote, and so every sandbox, holds none in any of the five sets.

Effective and permitted are what a process holds now: everything, inside the user namespace the zygote
creates, which the namespace layers need and nothing after them does. Inheritable and ambient are what an
execve would pass on, and the bounding set caps what any execve could ever grant (seccomp forbids
execve; the bounding set is the kernel's own guarantee behind it). Dropping the bounding set needs
CAP_SETPCAP: root has it before `--user`, the zygote has it inside its user namespace, and an ordinary
user without a user namespace does not, which this layer then reports.
"""

from __future__ import annotations

import errno

from sandbox import syscalls
from sandbox.layers import Skipped

CAP_LAST_POSSIBLE = 63  # the sets are 64 bits wide; the kernel's last one is found by probing


def _known() -> range:
    """Capability numbers this kernel knows (PR_CAPBSET_READ says EINVAL past the last; no /proc needed)."""
    last = -1
    for cap in range(CAP_LAST_POSSIBLE + 1):
        try:
            syscalls.prctl(syscalls.PR_CAPBSET_READ, cap)
        except OSError as e:
            if e.errno == errno.EINVAL:
                break
            raise
        last = cap
    return range(last + 1)


def held() -> dict[str, int]:
    """Each set as a bit mask, read from the kernel (the same numbers /proc/PID/status shows)."""
    effective, permitted, inheritable = syscalls.capget()
    bounding = ambient = 0
    for cap in _known():
        if syscalls.prctl(syscalls.PR_CAPBSET_READ, cap):
            bounding |= 1 << cap
        if syscalls.prctl(syscalls.PR_CAP_AMBIENT, 1, cap):  # PR_CAP_AMBIENT_IS_SET
            ambient |= 1 << cap
    return {
        "bounding": bounding,
        "effective": effective,
        "permitted": permitted,
        "inheritable": inheritable,
        "ambient": ambient,
    }


def drop_bounding_set() -> None:
    for cap in _known():
        if syscalls.prctl(syscalls.PR_CAPBSET_READ, cap):
            syscalls.prctl(syscalls.PR_CAPBSET_DROP, cap)


def drop_all() -> None:
    """Empty all five sets; raise Skipped if one cannot be emptied (the others are emptied anyway)."""
    refused = ""
    try:
        drop_bounding_set()
    except PermissionError:
        refused = "the bounding set needs CAP_SETPCAP to drop (no user namespace)"
    syscalls.prctl(syscalls.PR_CAP_AMBIENT, syscalls.PR_CAP_AMBIENT_CLEAR_ALL)
    syscalls.capset_empty()
    left = [name for name, mask in held().items() if mask]
    if refused or left:
        raise Skipped(refused or f"still held: {', '.join(left)}")
