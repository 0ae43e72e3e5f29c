"""Event ids: UUIDv7 (RFC 9562), time-ordered and unique, so consumers of an at-least-once stream can
de-duplicate by id and sort by it.

    48 bits  Unix time in milliseconds
     4 bits  version 7
    12 bits  a counter within the millisecond (RFC 9562's method 1), starting at a random value
     2 bits  variant 0b10
    62 bits  random

Ids made by one process are strictly increasing: within one millisecond the counter orders them, and a
counter that runs out borrows the next millisecond. The random bits come from `random`'s generator,
seeded from the operating system and reseeded in a forked child: they make ids of different processes
and sensors differ, and need not be secret (the id is printed in every event).
"""

from __future__ import annotations

import random
import threading
import time
from typing import Final

_COUNTER_MAX: Final = 0xFFF
_lock = threading.Lock()  # events come from the loop and from a few other threads (the recorder)
_last_ms = 0
_counter = 0


def uuid7(now_ns: int | None = None) -> str:
    """A new UUIDv7 as its 36-character text."""
    global _last_ms, _counter
    ms = (time.time_ns() if now_ns is None else now_ns) // 1_000_000
    with _lock:
        if ms > _last_ms:
            _last_ms, _counter = ms, random.getrandbits(11)  # room below the top for many more this ms
        else:
            _counter += 1
            if _counter > _COUNTER_MAX:
                _last_ms, _counter = _last_ms + 1, 0
        ms, counter = _last_ms, _counter
    value = (ms << 80) | (0x7 << 76) | (counter << 64) | (0b10 << 62) | random.getrandbits(62)
    h = f"{value:032x}"
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
