"""Who the broker and its sandboxes run as: `--user`, and the refusal to run sandboxes as root.

Order (DESIGN.md's trust boundary, and why): the zygote switches to the target user once its imports are
done and before its first fork, so no sandbox ever holds root, not even for a moment (it is exec'd as
root because the interpreter may live where that user cannot read); the broker keeps root only until its
listeners are bound, then drops to the same user. With systemd socket activation the ports arrive already
bound and the broker never needs root at all.
"""

from __future__ import annotations

import ctypes
import os
import pwd
from dataclasses import dataclass

from sandbox.lockdown import LockdownError, switch_user

PR_SET_DUMPABLE = 4


class PrivilegeError(Exception):
    """Worded for one log line."""


@dataclass(frozen=True, slots=True)
class RunAs:
    name: str
    uid: int
    gid: int


def resolve_user(name: str | None, allow_root: bool) -> RunAs | None:
    """The user to switch to, or None to stay as we are; refuse root sandboxes unless allowed."""
    euid = os.geteuid()
    if name is None:
        if euid == 0 and not allow_root:
            raise PrivilegeError(
                "refusing to run sandboxes as root: pass --user NAME (e.g. --user nobody), "
                "or --allow-root if you really mean it"
            )
        return None
    try:
        entry = pwd.getpwuid(int(name)) if name.isdigit() else pwd.getpwnam(name)
    except KeyError:
        raise PrivilegeError(f"--user {name}: no such user") from None
    if entry.pw_uid == 0 and not allow_root:
        raise PrivilegeError(f"--user {name} is root; pass --allow-root if you really mean it")
    if euid != 0:
        if entry.pw_uid != euid:
            raise PrivilegeError(f"--user {name} needs root to switch to (running as uid {euid})")
        return None  # already that user
    return RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid)


def drop_privileges(run_as: RunAs) -> None:
    """Become run_as for good (the same switch the zygote makes before its first fork)."""
    try:
        switch_user(run_as.uid, run_as.gid)
    except LockdownError as e:
        raise PrivilegeError(str(e)) from e


def forbid_tracing() -> None:
    """The sandboxes share the broker's uid: keep any same-uid process from ptracing or reading it."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_DUMPABLE): {os.strerror(err)}")
