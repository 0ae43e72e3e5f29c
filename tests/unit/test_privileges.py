"""--user: who the broker and its sandboxes may run as."""

from __future__ import annotations

import os
import pwd

import pytest

from broker.privileges import PrivilegeError, resolve_user


def test_a_user_whose_primary_group_is_root_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Group root owns much of a system; `nobody`-like users never have it, so the user database is
    what cannot be set up here without changing the machine: it is the one thing replaced."""
    fake = pwd.struct_passwd(("operator", "x", 37, 0, "", "/", "/bin/false"))
    monkeypatch.setattr(pwd, "getpwnam", lambda name: fake)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(PrivilegeError, match=r"--user operator has group root \(gid 0\)"):
        resolve_user("operator", allow_root=False)
    assert resolve_user("operator", allow_root=True) is not None
