"""The pipe ends of the fake sandbox children (rogue_child, fuzz_child, dense_rogue_child): they speak to
the real broker on fd 0 and 1, as a real child does, and exit quietly when the broker closes fd 0."""

from __future__ import annotations

import os
from typing import Any

import msgpack


def raw(data: bytes) -> None:
    """Write bytes as they are, whole."""
    view = memoryview(data)
    while view:
        view = view[os.write(1, view) :]


unpacker = msgpack.Unpacker(raw=False)


def read() -> Any:
    """The broker's next frame (or slot number, in dense mode); exit when the broker is gone."""
    while True:
        for obj in unpacker:
            return obj
        chunk = os.read(0, 1 << 16)
        if not chunk:
            os._exit(0)
        unpacker.feed(chunk)
