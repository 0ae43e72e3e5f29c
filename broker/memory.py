"""Give the C heap's free pages back to the system.

Bursts (a log flood, 1 MiB frames) raise glibc's heap high-water mark, and glibc keeps those pages unless
asked; for a daemon that runs for months with bursty load that reads as a leak. Asking costs about a
millisecond, so the server does it only when it goes idle.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    with contextlib.suppress(OSError, AttributeError):
        trim: Callable[[int], int] = ctypes.CDLL("libc.so.6").malloc_trim  # glibc only
        return trim
    return None


def return_free_memory() -> None:
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
