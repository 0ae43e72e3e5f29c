"""A cheaper fork: what the zygote does so that each worker it forks touches as few pages as it can.

A worker's cost is mostly the kernel's, not Python's: every page the worker writes after the fork is a
copy-on-write fault (about 3 us each on the 2-core VM), and every page it owns must be freed at its exit.
Measured on a worker serving examples/25.lua (minor faults per worker, bench/run.py figure 2), the
zygote takes four steps, each for a reason found with `perf record -e page-faults -d`:

- `warm_up`: one whole session run in the zygote before the first fork (worker.session on pipes of its
  own, a built-in script calling every API function, in both the prepared and the direct way), so what
  a worker does the first time is done once here: lupa's and msgpack's lazy set-up, the type attribute
  caches, the adaptive interpreter's specialised bytecode, interned names. `lockdown.rehearse` does the
  same for lockdown()'s calls, and the seccomp program is generated once (lockdown.compile_filter).
- `seal_heap`: the free chunks the zygote's C heap holds are scattered over pages every worker shares;
  a worker's first mallocs would take them (and sort the unsorted bin), writing to each of those pages.
  Allocating them all in the zygote, and never freeing them, leaves a worker's mallocs the top of the
  heap: fresh, contiguous pages (about 100 faults fewer per worker).
- gc.freeze(): the collector never walks (and so never writes to) the zygote's objects in a worker.
- `fork`: glibc's fork() without os.fork()'s Python after-fork hooks. Those reseed `random` and rebuild
  `threading`'s state in every worker (about 120 faults of pages those modules touch), for modules a
  worker never uses. That is safe here only because the zygote is single-threaded (no lock can be held
  by another thread at the fork) and installs no Python signal handler a worker could inherit pending:
  SIGCHLD, its one handler, is blocked across the fork (see `fork`).
"""

from __future__ import annotations

import ctypes
import gc
import os
import signal
from typing import Any

from deadend import wire
from sandbox import lockdown, worker

_libc = ctypes.CDLL(None, use_errno=True)

# The warm-up's script: every API function once (print too), trusted, built in.
WARM_UP_SCRIPT = b"""
deadend.set_limits(100, 100000)
deadend.set_tarpit(0, 0)
local ip = deadend.get_ip()
deadend.log("warm-up " .. ip, "debug")
deadend.send("hello\\r\\n")
local data = deadend.recv(64)
deadend.sleep(0)
print(string.format("%s %d", tostring(data), #ip))
deadend.close()
"""
# The broker's side of that session: each reply, in order.
WARM_UP_REPLIES: tuple[Any, ...] = (None, None, b"192.0.2.1", None, True, b"x\r\n", 0, None, None)


def warm_up() -> None:
    """Run the built-in script through worker.session, prepared and direct, as a worker would."""
    for mode in (wire.Mode.PREPARE, wire.Mode.RUN):
        start = wire.Start(
            mode=mode.value,
            source=WARM_UP_SCRIPT,
            chunkname="warm-up.lua",
            seed=(1, 2),
            memory=8 << 20,
            instructions=1_000_000,
            clock=False,
        )
        frames: list[Any] = [start.to_frame()]
        if mode == wire.Mode.PREPARE:
            frames.append(wire.go_frame((3, 4)))
        frames += WARM_UP_REPLIES
        to_worker_r, to_worker_w = os.pipe()
        from_worker_r, from_worker_w = os.pipe()
        try:
            # Everything fits in the pipes' buffers: the broker's side is written first, whole.
            worker._write_all(b"".join(wire.pack(f) for f in frames), to_worker_w)
            os.close(to_worker_w)
            to_worker_w = -1
            lua, start_fn = worker.new_runtime()
            worker.session(worker.Pipe(to_worker_r, from_worker_w), lua, start_fn)
        finally:
            for fd in (to_worker_r, to_worker_w, from_worker_r, from_worker_w):
                if fd >= 0:
                    os.close(fd)


class _Mallinfo2(ctypes.Structure):
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",
            "keepcost",
        )
    ]


_sealed: list[int | None] = []  # the zygote's free chunks, taken for good (see the module docstring)
SEAL_STEP = 1000  # allocations between two looks at what is left
SEAL_CHUNK = 24  # bytes: the smallest request, so that no free chunk is left too small to take
SEAL_MAX = 1 << 20  # allocations at most (some 32 MiB): a heap that never runs dry is left as it is


def seal_heap() -> int:
    """Allocate every free chunk of the C heap but its top; return how many allocations it took."""
    mallinfo2 = getattr(_libc, "mallinfo2", None)
    if mallinfo2 is None:  # not glibc, or before 2.33: nothing to seal with
        return 0
    mallinfo2.restype = _Mallinfo2
    malloc = _libc.malloc
    malloc.restype = ctypes.c_void_p
    malloc.argtypes = [ctypes.c_size_t]
    taken = 0
    while taken < SEAL_MAX:
        info = mallinfo2()
        if info.fordblks - info.keepcost < 2 * SEAL_CHUNK:  # free bytes outside the top chunk
            break
        _sealed.extend(malloc(SEAL_CHUNK) for _ in range(SEAL_STEP))
        taken += SEAL_STEP
    return taken


def prepare() -> None:
    """Everything above, once, in the zygote before its first fork."""
    warm_up()
    lockdown.rehearse()
    gc.collect()
    seal_heap()
    gc.freeze()


def fork() -> int:
    """fork(2) as glibc does it, without os.fork()'s Python after-fork hooks: 0 in the child, its pid
    in the parent; OSError if it failed. Only for the single-threaded zygote (the module docstring)."""
    # Blocked so that no SIGCHLD can trip its Python handler between the last check and the fork: the
    # child would otherwise run the parent's handler, and fail, at its first bytecode.
    # The child leaves it blocked until it has reset the handler (zygote.py, _become_worker).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    pid = int(_libc.fork())
    error = ctypes.get_errno()
    if pid != 0:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGCHLD})
    if pid < 0:
        raise OSError(error, os.strerror(error))
    return pid
