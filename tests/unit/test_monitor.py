"""broker.monitor as a state machine without I/O (h11's way): every request in every state, table-driven,
then the rules that span several requests (limits, tarpit, rates, linger, idle, who closed)."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker import monitor as m
from deadend import wire
from deadend.config import Ceilings
from deadend.reasons import ClosedBy, Reason
from deadend.tlsinfo import TlsInfo

IP = "192.0.2.1"


def monitor(**ceilings: float) -> m.Monitor:
    return m.Monitor(IP, Ceilings(**ceilings), random.Random(1), now=0.0)  # type: ignore[arg-type]


def req(op: str, *args: object) -> wire.Request:
    return wire.parse_request([op, *args], wire.Mode.RUN)


# --- every request in every state ------------------------------------------------------------------------

INFO = TlsInfo(
    "t13d1516h2_8daaf6152771_e5627efa2ab1",
    "1c258ebef8eee2dfa3df6d8d07285af9",
    b"www.example.com",
    (b"h2", b"http/1.1"),
    b"\x16\x03\x01",
    "TLSv1.3",
    "TLS_AES_128_GCM_SHA256",
    "http/1.1",
)


def tls_up(mon: m.Monitor) -> None:
    assert mon.handle(req("starttls", b"http/1.1"), 1.0) == m.StartTls(b"http/1.1")
    assert mon.tls_started(INFO, "", False, 1.0) == m.Reply(True)


def tls_failed(mon: m.Monitor) -> None:
    mon.handle(req("starttls", b""), 1.0)
    assert mon.tls_started(None, "not a TLS handshake record", False, 1.0) == m.Reply(None)


# How to bring a fresh monitor into each state.
STATES: dict[str, Callable[[m.Monitor], object]] = {
    "open": lambda mon: None,
    "peer-left": lambda mon: mon.peer_left(1.0),  # FIN or RST seen by the broker, not yet by the script
    "eof": lambda mon: (mon.handle(req("recv", 5), 1.0), mon.received(b"", 1.0)),  # the script saw the end
    "closed-by-script": lambda mon: mon.handle(req("close"), 1.0),
    "closed-by-limit": lambda mon: mon.close(ClosedBy.LIMIT, 1.0),
    "idled": lambda mon: (mon.handle(req("recv", 5), 1.0), mon.idle(1.0)),
    "shutdown": lambda mon: mon.close(ClosedBy.SHUTDOWN, 1.0),
    "tls": tls_up,
    "tls-failed": tls_failed,
}
REQUESTS = {
    "send": req("send", b"x"),
    "recv": req("recv", 5),
    "sleep": req("sleep", 5),
    "get_ip": req("get_ip"),
    "log": req("log", b"hi", "warn", [b"user", b"root", b"n", 3]),
    "set_tarpit": req("set_tarpit", 1, 0),
    "set_limits": req("set_limits", 0, 0),
    "close": req("close"),
    "starttls": req("starttls", b"http/1.1"),
    "tls_info": req("tls_info"),
    "usage": req("usage", 1 << 20, 5000, 1200),
    "done": req("done", "return", b""),
}
SEND, RECV, SLEEP = m.Send(b"x"), m.Recv(5), m.Sleep(0.005)
IP_REPLY, NIL, FALSE = m.Reply(IP.encode()), m.Reply(None), m.Reply(False)
LOG, DONE = m.Log("warn", b"hi", False, (("user", b"root"), ("n", 3))), m.End(Reason.DONE, b"")
CLOSED_ROW: dict[str, m.Action] = {
    "send": FALSE,
    "recv": NIL,
    "sleep": SLEEP,
    "get_ip": IP_REPLY,
    "log": LOG,
    "set_tarpit": NIL,
    "set_limits": NIL,
    "close": NIL,
    "starttls": NIL,
    "tls_info": NIL,
    "usage": NIL,
    "done": DONE,
}
STARTTLS = m.StartTls(b"http/1.1")
VIOLATION = m.End(Reason.PROTOCOL)  # stands for "raises ProtocolViolation" in the table
# state -> request -> the action; the rows are the whole contract of SPEC.md "The functions" per state
TABLE: dict[str, dict[str, m.Action]] = {
    "open": {**CLOSED_ROW, "send": SEND, "recv": RECV, "starttls": STARTTLS},
    # what it sent before is still readable (a ClientHello, maybe)
    "peer-left": {**CLOSED_ROW, "send": SEND, "recv": RECV, "starttls": STARTTLS},
    "eof": {**CLOSED_ROW, "send": SEND},  # a half-close: replies may still go out
    "closed-by-script": CLOSED_ROW,
    "closed-by-limit": CLOSED_ROW,
    "idled": CLOSED_ROW,
    "shutdown": CLOSED_ROW,
    # the bootstrap never asks twice: a second starttls is a compromised sandbox's
    "tls": {
        **CLOSED_ROW,
        "send": SEND,
        "recv": RECV,
        "starttls": VIOLATION,
        "tls_info": m.Reply(INFO.to_wire()),
    },
    "tls-failed": CLOSED_ROW,  # as after the peer's close; no TLS to describe
}
# the requests that, in a state, count against --linger-calls (I/O on a connection that is done)
CLOSED_STATES = ("closed-by-script", "closed-by-limit", "idled", "shutdown", "tls-failed")
COUNTED = {
    "eof": {"recv", "starttls"},
    **{state: {"send", "recv", "starttls"} for state in CLOSED_STATES},
}


@pytest.mark.parametrize("state", list(STATES))
@pytest.mark.parametrize("op", list(REQUESTS))
def test_every_request_in_every_state(state: str, op: str) -> None:
    mon = monitor()
    STATES[state](mon)
    before = mon.calls_after_close
    if TABLE[state][op] == VIOLATION:
        with pytest.raises(wire.ProtocolViolation, match="already speaks TLS"):
            mon.handle(REQUESTS[op], 2.0)
        return
    assert mon.handle(REQUESTS[op], 2.0) == TABLE[state][op]
    assert mon.calls_after_close - before == (op in COUNTED.get(state, set()))


def test_the_tables_cover_every_session_request() -> None:
    session_rows = {row.name for row in wire.REQUESTS if row.modes & m.SESSION_MODES}
    assert set(REQUESTS) == session_rows
    assert all(set(row) == session_rows for row in TABLE.values())


@pytest.mark.parametrize("op", list(REQUESTS))
def test_a_request_while_one_is_carried_out_is_a_violation(op: str) -> None:
    mon = monitor()
    assert mon.handle(req("recv", 1), 0) == m.Recv(1)  # carried out by the I/O layer: the monitor waits
    with pytest.raises(wire.ProtocolViolation):
        mon.handle(REQUESTS[op], 0)


def test_a_request_outside_the_session_table_is_refused() -> None:
    dump = wire.parse_request(["dump", b"x"], wire.Mode.CHECK)
    with pytest.raises(wire.ProtocolViolation, match="not permitted in a session"):
        monitor().handle(dump, 0)


# --- limits, tarpit, rates ---------------------------------------------------------------------------


def test_recv_then_tarpit_delay() -> None:
    mon = monitor()
    assert mon.handle(req("set_tarpit", 100, 50), 0) == m.Reply(None)
    assert mon.handle(req("recv", 10), 0) == m.Recv(10)
    reply, delay = mon.received(b"abc", 0)
    assert reply == m.Reply(b"abc") and 0.1 <= delay <= 0.15
    assert mon.bytes_in == 3 and mon.recv_calls == 1


def test_recv_calls_limit_counts_from_the_start() -> None:
    mon = monitor()
    mon.handle(req("recv", 10), 0)
    mon.received(b"a", 0)
    mon.handle(req("set_limits", 2, 0), 0)
    mon.handle(req("recv", 10), 0)
    mon.received(b"b", 0)
    assert mon.handle(req("recv", 10), 0) == m.Reply(None)  # the third recv: nil, closed
    assert not mon.open and mon.closed_by == ClosedBy.LIMIT


def test_recv_bytes_limit_refuses_the_crossing_recv() -> None:
    mon = monitor()
    mon.handle(req("set_limits", 0, 5), 0)
    mon.handle(req("recv", 10), 0)
    assert mon.received(b"abcd", 0)[0] == m.Reply(b"abcd")
    mon.handle(req("recv", 10), 0)
    assert mon.received(b"ef", 0)[0] == m.Reply(None)
    assert mon.closed_by == ClosedBy.LIMIT and mon.bytes_in == 4


def test_empty_send_is_true_without_io_while_open() -> None:
    mon = monitor()
    assert mon.handle(req("send", b""), 0) == m.Reply(True)
    assert mon.handle(req("send", b"x"), 0) == m.Send(b"x")
    assert mon.sent(False, 1, 0) == m.Reply(False)
    assert mon.closed_by == ClosedBy.PEER


def test_linger_calls_end_the_session() -> None:
    mon = monitor(linger_calls=3)
    mon.close(ClosedBy.PEER, 0)
    for _ in range(3):
        assert mon.handle(req("recv", 1), 0) == m.Reply(None)
    end = mon.handle(req("recv", 1), 0)
    assert isinstance(end, m.End) and end.reason == Reason.LINGER


def test_log_rate_drops_and_counts() -> None:
    mon = monitor(log_rate=1.0, log_burst=2)
    results = []
    for _ in range(5):
        results.append(mon.handle(req("log", b"x", "info", []), 0.0))
        if isinstance(results[-1], m.Log):
            mon.carried_out()
    assert sum(isinstance(r, m.Log) for r in results) == 2
    assert mon.take_dropped_logs() == 3 and mon.take_dropped_logs() == 0
    assert isinstance(mon.handle(req("log", b"x", "info", []), 1.5), m.Log)  # refilled


def test_log_message_is_cut_with_a_flag() -> None:
    mon = monitor()
    action = mon.handle(req("log", b"y" * (wire.LOG_MAX + 1), "warn", []), 0)
    assert isinstance(action, m.Log) and action.cut and len(action.message) == wire.LOG_MAX


@pytest.mark.parametrize(
    ("kind", "reason"), [("instructions", Reason.INSTRUCTIONS), ("error", Reason.SCRIPT_ERROR)]
)
def test_done_maps_to_reasons(kind: str, reason: Reason) -> None:
    assert monitor().handle(req("done", kind, b"x"), 0) == m.End(reason, b"x")


def test_call_rate_throttles_a_spinning_script() -> None:
    mon = monitor(call_rate=100.0)  # a burst of 200 calls, then 100 a second
    delays = [mon.call_delay(0.0) for _ in range(220)]
    assert delays[:200] == [0.0] * 200
    assert delays[200] == pytest.approx(0.01) and delays[-1] == pytest.approx(0.20)
    assert mon.call_delay(10.0) == 0.0  # refilled after a quiet spell


# --- the peer leaving, idling, who closed -------------------------------------------------------------


def test_a_departure_starts_the_linger_clock_once() -> None:
    mon = monitor()
    mon.peer_left(5.0)
    mon.peer_left(7.0)
    assert mon.gone_at == 5.0 and mon.open and mon.closed_by is None
    assert mon.final_closed_by() == ClosedBy.PEER  # the peer left, even if the script never saw it


def test_a_script_that_closes_before_it_saw_the_end_closed_first() -> None:
    mon = monitor()
    mon.peer_left(1.0)
    mon.handle(req("close"), 2.0)
    assert mon.final_closed_by() == ClosedBy.SCRIPT and mon.gone_at == 1.0


def test_a_script_that_closes_after_the_end_of_input_did_not() -> None:
    mon = monitor()
    mon.handle(req("recv", 5), 1.0)
    mon.received(b"", 1.0)  # the client sent FIN and the script saw it
    mon.handle(req("close"), 2.0)
    assert mon.final_closed_by() == ClosedBy.PEER


def test_idle_ends_the_session_idle_unless_a_ceiling_does() -> None:
    mon = monitor()
    mon.handle(req("recv", 5), 0)
    assert mon.idle(120.0) == m.Reply(None)
    assert not mon.open and mon.closed_by == ClosedBy.LIMIT and mon.gone_at == 120.0
    assert mon.final_reason(Reason.DONE) == Reason.IDLE  # the script returned after its recv gave nil
    assert mon.final_reason(Reason.LINGER) == Reason.LINGER  # it went on too long after that
    assert monitor().final_reason(Reason.DONE) == Reason.DONE


def test_a_sleep_is_answered_with_what_was_slept() -> None:
    mon = monitor()
    assert mon.handle(req("sleep", 10_000), 0) == m.Sleep(10.0)
    assert mon.slept(2345) == m.Reply(2345)
    assert mon.final_closed_by() == ClosedBy.NONE
    assert mon.handle(req("get_ip"), 0) == IP_REPLY  # no longer busy


def test_a_sleep_cut_short_by_the_peer_tells_the_script_who_left() -> None:
    mon = monitor()
    mon.peer_left(1.0)
    assert mon.handle(req("sleep", 5000), 1.0) == m.Sleep(5.0)
    assert mon.slept(0, cut=True) == m.Reply(0)
    mon.handle(req("close"), 1.1)  # the script closes once it saw the short sleep
    assert mon.final_closed_by() == ClosedBy.PEER


def test_log_fields_reach_the_action_named_and_in_order() -> None:
    action = monitor().handle(req("log", b"m", "info", [b"ok", True, b"tries", 3, b"user", b"root"]), 0)
    assert isinstance(action, m.Log)
    assert action.fields == (("ok", True), ("tries", 3), ("user", b"root"))


# --- TLS ---------------------------------------------------------------------------------------------


def test_a_failed_handshake_ends_the_session_tls_handshake_and_keeps_the_fingerprint() -> None:
    mon = monitor()
    mon.handle(req("starttls", b""), 0)
    hello_only = TlsInfo(INFO.ja4, INFO.ja3, None, (), b"\x16")
    assert mon.tls_started(hello_only, "TLS handshake failed: NO_SHARED_CIPHER", False, 1.0) == m.Reply(None)
    assert not mon.open and mon.closed_by == ClosedBy.PEER and mon.gone_at == 1.0
    assert mon.tls is hello_only  # the session-end event carries what the client offered
    assert mon.handle(req("tls_info"), 1.0) == m.Reply(None)
    assert mon.final_reason(Reason.DONE) == Reason.TLS_HANDSHAKE
    assert mon.final_reason(Reason.LINGER) == Reason.LINGER  # a ceiling still names itself


def test_a_handshake_that_timed_out_was_closed_by_a_limit() -> None:
    mon = monitor()
    mon.handle(req("starttls", b""), 0)
    assert mon.tls_started(None, "no ClientHello within 10s", True, 10.0) == m.Reply(None)
    assert mon.closed_by == ClosedBy.LIMIT and mon.tls is None


def test_a_handshake_the_connection_closed_under_fails() -> None:
    mon = monitor()
    mon.handle(req("starttls", b""), 0)
    mon.close(ClosedBy.SHUTDOWN, 0.5)  # the broker shut down meanwhile
    assert mon.tls_started(INFO, "", False, 1.0) == m.Reply(None)
    assert not mon.tls_up and mon.closed_by == ClosedBy.SHUTDOWN


def test_after_tls_the_io_rules_are_unchanged() -> None:
    mon = monitor()
    tls_up(mon)
    mon.handle(req("set_limits", 1, 0), 2.0)
    assert mon.handle(req("recv", 10), 2.0) == m.Recv(10)
    assert mon.received(b"GET / HTTP/1.1\r\n", 2.0)[0] == m.Reply(b"GET / HTTP/1.1\r\n")
    assert mon.handle(req("recv", 10), 2.0) == m.Reply(None)  # the limit counts plaintext recvs
    assert mon.final_reason(Reason.DONE) == Reason.DONE


# --- the tarpit's jitter ------------------------------------------------------------------------------------


@given(st.integers(0, 2**126), st.integers(0, 10_000), st.integers(0, 10_000))
def test_jitter_stays_in_its_range_and_repeats_from_its_seed(seed: int, a: int, span: int) -> None:
    """A session's jitter comes from its seed (a replayed session is paced as it was) and stays within
    [a, a + span], as random.randint would."""
    one, two = m.Jitter(seed), m.Jitter(seed)
    drawn = [one.randint(a, a + span) for _ in range(50)]
    assert drawn == [two.randint(a, a + span) for _ in range(50)]
    assert all(a <= x <= a + span for x in drawn)


def test_jitter_covers_its_range_and_seeds_differ() -> None:
    assert set(_draws(7, 2000)) == set(range(10))  # every value comes, none outside
    assert _draws(7, 50) != _draws(8, 50)


def _draws(seed: int, n: int) -> list[int]:
    jitter = m.Jitter(seed)
    return [jitter.randint(0, 9) for _ in range(n)]
