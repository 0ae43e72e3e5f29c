"""deadend.scripts: the file-name rule of SPEC.md."""

from __future__ import annotations

import pytest

from deadend.scripts import port_of


@pytest.mark.parametrize(
    ("name", "port"), [("22.lua", 22), ("1.lua", 1), ("65535.lua", 65535), ("5222.lua", 5222)]
)
def test_valid_names(name: str, port: int) -> None:
    assert port_of(name) == port


@pytest.mark.parametrize(
    "name",
    [
        "ssh.lua",
        "22.txt",
        "00000.lua",
        "70000.lua",
        "022.lua",
        "0.lua",
        "65536.lua",
        "123456.lua",
        "22.lua.bak",
        " 22.lua",
        "22.LUA",
        "-1.lua",
    ],
)
def test_ignored_names(name: str) -> None:
    assert isinstance(port_of(name), str)
