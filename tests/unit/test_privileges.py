"""--user: who the broker and its sandboxes may run as."""

from __future__ import annotations

import os
import pwd
from pathlib import Path

import pytest

from broker.privileges import PrivilegeError, RunAs, launcher_tree, resolve_user


def test_a_user_whose_primary_group_is_root_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Group root owns much of a system; `nobody`-like users never have it, so the user database is
    what cannot be set up here without changing the machine: it is the one thing replaced."""
    fake = pwd.struct_passwd(("operator", "x", 37, 0, "", "/", "/bin/false"))
    monkeypatch.setattr(pwd, "getpwnam", lambda name: fake)
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    with pytest.raises(PrivilegeError, match=r"--user operator has group root \(gid 0\)"):
        resolve_user("operator", allow_root=False)
    assert resolve_user("operator", allow_root=True) is not None


def test_an_installation_the_user_could_change_is_refused(tmp_path: Path) -> None:
    """The launcher keeps root to exec the interpreter and import the package: a --user that could write
    either (its own file, a group- or world-writable folder on the way) would become root through it."""
    nobody = RunAs("nobody", 65534, 65534)
    launcher_tree(nobody)  # this installation: root's, not writable by nobody
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # anyone may write, and no sticky bit
    (shared / "python3").write_text("")
    with pytest.raises(PrivilegeError, match=f"could change {shared}"):
        launcher_tree(nobody, [shared / "python3"])
    if os.geteuid() == 0:  # giving a folder away needs root
        own = tmp_path / "own"
        own.mkdir()
        os.chown(own, 65534, 65534)
        with pytest.raises(PrivilegeError, match=f"could change {own}"):
            launcher_tree(nobody, [own])
    assert Path("/tmp").stat().st_mode & 0o1000  # /tmp itself is sticky: not a way in
    launcher_tree(nobody, [Path("/tmp")])
