"""sandbox/prefork.py: the zygote's warm-up, its sealed heap and its fork, each in a process of its own."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

from sandbox import prefork
from tests.conftest import REPO


def run_python(code: str) -> dict[str, object]:
    proc = subprocess.run(
        [sys.executable, "-I", "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
        env={"TZ": "UTC"},
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert isinstance(result, dict)
    return result


def test_prepare_warms_up_seals_the_heap_and_leaves_no_descriptor() -> None:
    result = run_python(
        """
        import json, os
        from sandbox import prefork
        before = sorted(os.listdir("/proc/self/fd"))
        prefork.prepare()
        info = prefork._libc.mallinfo2()
        print(json.dumps({
            "fds": before == sorted(os.listdir("/proc/self/fd")),
            "free": info.fordblks - info.keepcost,
        }))
        """
    )
    assert result["fds"], "the warm-up left a descriptor open"
    # Nothing free in the C heap but its top: a worker's first mallocs take fresh pages.
    assert isinstance(result["free"], int) and result["free"] < 2 * prefork.SEAL_CHUNK


def test_fork_blocks_sigchld_in_the_child_only_and_costs_fewer_faults_than_os_fork() -> None:
    # os.fork() runs the after-fork hooks of `threading` and `random` in the child: prefork.fork() does
    # not, and a child then touches far fewer pages before its first line of Python.
    result = run_python(
        """
        import json, os, random, resource, signal, threading
        from sandbox import prefork

        def child_reading(fork):
            r, w = os.pipe()
            pid = fork()
            if pid == 0:
                faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                blocked = signal.SIGCHLD in signal.pthread_sigmask(signal.SIG_BLOCK, [])
                os.write(w, json.dumps([faults, blocked]).encode())
                os._exit(0)
            os.close(w)
            os.waitpid(pid, 0)
            reading = json.loads(os.read(r, 100))
            os.close(r)
            return reading

        ours = [child_reading(prefork.fork) for _ in range(3)]
        theirs = [child_reading(os.fork) for _ in range(3)]
        parent_blocked = signal.SIGCHLD in signal.pthread_sigmask(signal.SIG_BLOCK, [])
        print(json.dumps({"ours": ours, "theirs": theirs, "parent_blocked": parent_blocked}))
        """
    )
    ours, theirs = result["ours"], result["theirs"]
    assert isinstance(ours, list) and isinstance(theirs, list)
    assert all(blocked for _faults, blocked in ours), "SIGCHLD must stay blocked until the worker resets it"
    assert result["parent_blocked"] is False
    assert max(f for f, _ in ours) < min(f for f, _ in theirs), (ours, theirs)
