"""Dense mode at the legal extremes: K siblings in one worker, each using the largest of everything the API
allows at the same time (1 MiB sends, 64 KiB recvs, log lines at the cap with every field, the largest
script), and a property test over interleavings of sibling traffic: every session ends with its own
reason, never protocol-violation, sandbox-crash or worker-lost.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deadend.wire import MAX_SCRIPT_BYTES, RECV_MAX, SEND_MAX
from tests.conftest import Broker, read_all

K = 4
# Each byte received is answered with a 1 MiB send (the legal maximum), until the client closes.
MEGA_ECHO = (
    "while true do local b = deadend.recv(1) if not b then return end "
    "deadend.send(string.rep(b, 1048576)) end"
)


def ends(b: Broker, count: int, timeout: float = 15.0) -> Counter[str]:
    """The session-end reasons, once there are `count` of them (or the timeout passed)."""
    deadline = time.monotonic() + timeout
    while True:
        found = Counter(re.findall(r"session end reason=(\S+)", "\n".join(b.lines)))
        if sum(found.values()) >= count or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


def run_clients(work: Callable[[int], None], count: int) -> list[str]:
    failures: list[str] = []

    def one(i: int) -> None:
        try:
            work(i)
        except Exception as e:  # reported below, with which client
            failures.append(f"client {i}: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=one, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return failures


def read_exactly(s: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = s.recv(min(1 << 20, n - len(data)))
        if not chunk:
            break
        data += chunk
    return bytes(data)


def test_four_siblings_each_answered_with_1_mib_sends_three_rounds(
    make_broker: Callable[..., Broker],
) -> None:
    b = make_broker({"7.lua": MEGA_ECHO}, "--sessions-per-worker", str(K), "--workers", "1", "--warm", "0")

    def client(i: int) -> None:
        with b.connect(7, timeout=20, source=f"127.0.7.{i + 1}") as s:
            for round_ in range(3):
                marker = bytes([65 + i * 3 + round_])
                s.sendall(marker)
                assert read_exactly(s, SEND_MAX) == marker * SEND_MAX, f"round {round_}"

    assert not run_clients(client, K)
    assert ends(b, K) == Counter({"done": K})


def test_four_siblings_running_the_largest_script(make_broker: Callable[..., Broker]) -> None:
    body = 'local l = deadend.recv(100) deadend.send("big:" .. tostring(l))\n'
    padding = MAX_SCRIPT_BYTES - len(body) - len("--\n")
    source = body + "--" + "x" * padding + "\n"
    assert len(source.encode()) == MAX_SCRIPT_BYTES
    b = make_broker({"7.lua": source}, "--sessions-per-worker", str(K), "--workers", "2", "--warm", "0")

    def client(i: int) -> None:
        with b.connect(7, timeout=10, source=f"127.0.8.{i + 1}") as s:
            s.sendall(b"hi%d" % i)
            assert read_all(s, 10) == b"big:hi%d" % i

    for _ in range(3):  # four start messages of the largest script at once, three times
        assert not run_clients(client, K)
    assert ends(b, 3 * K) == Counter({"done": 3 * K})


# --- any legal interleaving -----------------------------------------------------------------------------

# The script obeys a tiny protocol: "S n" sends n bytes, "R n" receives exactly n bytes (in recv calls of
# up to 64 KiB) and answers "ok", "L" logs a line at the cap with 16 fields at theirs, "Q" returns.
PROTOCOL = r"""
local function line()
  local got = ""
  while true do
    local c = deadend.recv(1)
    if not c then return nil end
    if c == "\n" then return got end
    got = got .. c
  end
end
local fields = {}
for i = 1, 16 do fields[string.format("f%02d", i)] = string.rep("v", 1100) end
while true do
  local cmd = line()
  if not cmd or cmd == "Q" then return end
  local op, n = cmd:match("^(%a) ?(%d*)$")
  n = tonumber(n)
  if op == "S" then
    deadend.send(string.rep("s", n))
  elseif op == "R" then
    local left = n
    while left > 0 do
      local part = deadend.recv(math.min(left, 65535))
      if not part then return end
      left = left - #part
    end
    deadend.send("ok")
  elseif op == "L" then
    deadend.log(string.rep("m", 5000), "info", fields)
    deadend.send("ok")
  end
end
"""
steps = st.one_of(
    st.tuples(st.just("S"), st.sampled_from([0, 1, RECV_MAX, SEND_MAX - 1, SEND_MAX])),
    st.tuples(st.just("R"), st.sampled_from([1, RECV_MAX, RECV_MAX + 1, 300_000])),
    st.tuples(st.just("L"), st.just(0)),
)
programs = st.lists(st.lists(steps, min_size=1, max_size=4), min_size=K, max_size=K)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(programs=programs)
def test_any_legal_interleaving_of_siblings_ends_every_session_done(
    make_broker: Callable[..., Broker], programs: list[list[tuple[str, int]]]
) -> None:
    b = make_broker({"7.lua": PROTOCOL}, "--sessions-per-worker", str(K), "--workers", "1", "--warm", "0",
                    "--log-rate", "1000", "--log-burst", "1000")  # fmt: skip

    def client(i: int) -> None:
        with b.connect(7, timeout=20, source=f"127.0.9.{i + 1}") as s:
            for op, n in programs[i]:
                if op == "S":
                    s.sendall(b"S %d\n" % n)
                    assert read_exactly(s, n) == b"s" * n
                elif op == "R":
                    s.sendall(b"R %d\n" % n + b"r" * n)
                    assert read_exactly(s, 2) == b"ok"
                else:
                    s.sendall(b"L\n")
                    assert read_exactly(s, 2) == b"ok"
            s.sendall(b"Q\n")
            assert read_all(s, 10) == b""

    failures = run_clients(client, K)
    assert not failures, (programs, failures)
    assert ends(b, K) == Counter({"done": K}), programs
