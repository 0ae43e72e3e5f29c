"""Basic figures of the sandboxed broker, each beside a baseline measured in the same run.

    python bench/basics.py [--connections 300]

1. Child start-to-ready: from the broker's fork request to the child's "ready" frame (imports done in the
   zygote; the child builds its Lua state, locks down and loads the seccomp filter). Baseline: a bare
   `os.fork()` + pipe round trip in this process.
2. Time to first byte of the `examples/25.lua` banner, one client, sequential connections: connect() to
   the first byte received, back to back and paced (10 ms between connections, so the pool's refill is
   not on the measured path). Baseline: an asyncio server in this process that writes the same banner
   from Python (no Lua, no sandbox) — the floor of this machine's loopback and event loop.
   The round trip of one `deadend.*` call is estimated as the TTFB difference between a script that makes
   20 `get_ip()` calls before its banner and one that sends the banner at once, divided by 20.
3. Memory of one idle, warm (pre-forked, locked-down) child: PSS and USS from /proc/PID/smaps_rollup.

Machines here are noisy: read the ratio to the baseline, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import platform
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from broker.channel import WorkerChannel  # noqa: E402
from broker.zygote import DirectSpawner, Zygote  # noqa: E402
from deadend import wire  # noqa: E402
from deadend.config import Ceilings  # noqa: E402
from deadend.logs import EventLog  # noqa: E402

BANNER_PORT = 25


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(p / 100 * (len(values) - 1)))]


# --- 1. start-to-ready ------------------------------------------------------------------------------


async def child_start(n: int) -> tuple[list[float], list[float]]:
    devnull = open(os.devnull, "w")  # noqa: SIM115 (lives as long as the zygote)
    zygote = Zygote(DirectSpawner(), EventLog(devnull), lambda _c: None)
    await zygote.start()
    ceilings = Ceilings()
    request = wire.ForkRequest(address_space=ceilings.address_space, cpu_seconds=ceilings.session_cpu)
    ready: list[float] = []
    try:
        for _ in range(n):
            t = time.perf_counter()
            child = await zygote.fork(request)
            channel = WorkerChannel(child)
            assert await channel.frame(5) == ["ready"]
            ready.append((time.perf_counter() - t) * 1000)
            child.kill()
            channel.close()
            child.release()
            await child.exited
    finally:
        await zygote.stop()
    bare: list[float] = []
    for _ in range(n):
        t = time.perf_counter()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.write(w, b"r")
            os._exit(0)
        os.read(r, 1)
        bare.append((time.perf_counter() - t) * 1000)
        os.waitpid(pid, 0)
        os.close(r)
        os.close(w)
    return ready, bare


# --- 2. time to first byte -------------------------------------------------------------------------


def ttfb(port: int, n: int, pause: float = 0.0) -> list[float]:
    times = []
    for _ in range(n):
        time.sleep(pause)
        t = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            first = s.recv(1)
            times.append((time.perf_counter() - t) * 1000)
            assert first == b"2", first
    return times


def baseline_server(banner: bytes) -> tuple[int, asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    port_box: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(banner)
        await writer.drain()
        writer.close()

    async def main() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port_box.append(server.sockets[0].getsockname()[1])
        ready.set()
        await asyncio.Event().wait()

    threading.Thread(target=lambda: loop.run_until_complete(main()), daemon=True).start()
    ready.wait()
    return port_box[0], loop


BANNER = b"220 mail.example.com ESMTP Postfix (Debian/GNU)\r\n"
SYNTHETIC = {
    "1.lua": 'deadend.send("220 mail.example.com ESMTP Postfix (Debian/GNU)\\r\\n")',
    "2.lua": 'for i = 1, 20 do deadend.get_ip() end deadend.send("220 mail.example.com ESMTP\\r\\n")',
}


def scripts_folder() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="deadend-bench-"))
    (folder / "25.lua").write_bytes((REPO / "examples" / "25.lua").read_bytes())
    for name, source in SYNTHETIC.items():
        (folder / name).write_text(source)
    return folder


def start_broker(offset: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "deadend",
            "broker",
            "--scripts",
            str(scripts_folder()),
            "--host",
            "127.0.0.1",
            "--port-offset",
            str(offset),
            "--log-level",
            "warn",
            "--warm",
            "8",
            *(["--allow-root"] if os.geteuid() == 0 else []),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=REPO,
    )
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", BANNER_PORT + offset), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("broker did not start")


def warm_children(broker_pid: int) -> list[int]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            kids.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    zygotes = kids.get(broker_pid, [])
    # In its own PID namespace the zygote's one child forks the sandboxes (sandbox/namespaces.py).
    servers = [c for z in zygotes for c in kids.get(z, []) if _ns_pid(c) == 1] or zygotes
    return [c for z in servers for c in kids.get(z, [])]


def _ns_pid(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("NSpid:"):
            return int(line.split()[-1])
    return 0


def memory_kib(pid: int) -> tuple[int, int, int]:
    text = Path(f"/proc/{pid}/smaps_rollup").read_text()

    def field(name: str) -> int:
        return sum(int(v) for v in re.findall(rf"^{name}:\s+(\d+) kB", text, re.M))

    return field("Rss"), field("Pss"), field("Private_Clean") + field("Private_Dirty")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--connections", type=int, default=300)
    parser.add_argument("--starts", type=int, default=100)
    args = parser.parse_args()
    print(
        f"# deadend basics — {time.strftime('%Y-%m-%d')}, {platform.machine()}, {os.cpu_count()} cores, "
        f"Python {platform.python_version()}"
    )

    ready, bare = asyncio.run(child_start(args.starts))
    print(f"\n## 1. sandbox child start-to-ready, N={args.starts}")
    print("| | median ms | p90 ms | p99 ms |\n|---|---|---|---|")
    print(
        f"| zygote fork + Lua state + lockdown + seccomp + ready | {statistics.median(ready):.2f} | "
        f"{pct(ready, 90):.2f} | {pct(ready, 99):.2f} |"
    )
    print(
        f"| baseline: bare fork + pipe byte | {statistics.median(bare):.2f} | {pct(bare, 90):.2f} | "
        f"{pct(bare, 99):.2f} |"
    )

    base_port, _loop = baseline_server(BANNER)
    offset = 31000
    broker = start_broker(offset)
    try:
        ttfb(BANNER_PORT + offset, 20)  # warm-up
        ttfb(base_port, 20)
        deadend_t, base_t = [], []
        for _ in range(args.connections // 50):  # interleave so drift hits both alike
            deadend_t += ttfb(BANNER_PORT + offset, 50)
            base_t += ttfb(base_port, 50)
        print(f"\n## 2. connect to first banner byte, one client, N={len(deadend_t)} each")
        print("| | p50 ms | p90 ms | p99 ms |\n|---|---|---|---|")
        print(
            f"| deadend, examples/25.lua, sandboxed | {statistics.median(deadend_t):.3f} | "
            f"{pct(deadend_t, 90):.3f} | {pct(deadend_t, 99):.3f} |"
        )
        print(
            f"| baseline: asyncio server writing the banner | {statistics.median(base_t):.3f} | "
            f"{pct(base_t, 90):.3f} | {pct(base_t, 99):.3f} |"
        )
        print(f"| ratio p50 | {statistics.median(deadend_t) / statistics.median(base_t):.1f}x | | |")
        paced, paced_base = ttfb(BANNER_PORT + offset, 200, 0.01), ttfb(base_port, 200, 0.01)
        print(
            f"| deadend, paced 10 ms apart | {statistics.median(paced):.3f} | {pct(paced, 90):.3f} | "
            f"{pct(paced, 99):.3f} |"
        )
        print(
            f"| baseline, paced 10 ms apart | {statistics.median(paced_base):.3f} | "
            f"{pct(paced_base, 90):.3f} | {pct(paced_base, 99):.3f} |"
        )
        one, twenty = ttfb(1 + offset, 200, 0.01), ttfb(2 + offset, 200, 0.01)
        per_call = (statistics.median(twenty) - statistics.median(one)) / 20 * 1000
        print(
            f"| deadend, a one-line banner script, paced | {statistics.median(one):.3f} | "
            f"{pct(one, 90):.3f} | "
            f"{pct(one, 99):.3f} |"
        )
        print(f"\n## one deadend.* round trip (get_ip), from 20 calls before a banner: {per_call:.0f} µs")

        time.sleep(1.0)  # let the pool refill
        kids = warm_children(broker.pid)
        mems = [memory_kib(pid) for pid in kids]
        print(f"\n## 3. one idle warm child (pre-forked, locked down), {len(mems)} sampled")
        print("| | RSS KiB | PSS KiB | USS KiB |\n|---|---|---|---|")
        rss, pss, uss = (statistics.median(m[i] for m in mems) for i in range(3))
        print(f"| sandbox child | {rss:.0f} | {pss:.0f} | {uss:.0f} |")
    finally:
        broker.terminate()
        broker.wait(10)


if __name__ == "__main__":
    main()
