"""Prometheus metrics (`--metrics HOST:PORT`), served on the broker's event loop.

Counters follow the log events (EventLog observers see every event, those of ignored peers included), so
a metric and its log line can never disagree; gauges are read from the broker at scrape time, on the loop.
Labels are of bounded cardinality only: port (one per script), reason and limit (fixed word lists). Never
a peer. The text is prometheus_client's `generate_latest`.

Whoever can reach the endpoint's address can talk to it, so it is built to cost the broker little whatever
they send: no thread per connection; at most MAX_CONNECTIONS at once, more are closed at once; a request
head of at most MAX_HEAD bytes (431 past it) within HEAD_TIMEOUT; one response per connection, then close;
only `GET /metrics`; no `Server:` header; the text made at most once per SCRAPE_INTERVAL however fast
requests come. `route` and `response` are the protocol as pure functions.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from deadend import __version__
from deadend.logs import Where
from deadend.reasons import REFUSED, Reason
from deadend.sinks import SinkStats

DURATION_BUCKETS = (0.1, 1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 4 * 3600.0)

MAX_CONNECTIONS: Final = 16  # at once; Prometheus uses one per scrape
MAX_HEAD: Final = 8192  # bytes of request head; a scraper sends a few hundred
HEAD_TIMEOUT: Final = 5.0  # seconds from connect to the end of the request head
SEND_TIMEOUT: Final = 10.0  # seconds a client has to take its response
# Making the text takes the loop ~3 ms with 20 ports. However fast requests come, it is made at most once
# per SCRAPE_INTERVAL: a request that comes sooner waits for its turn (MAX_CONNECTIONS of them at most), and
# its answer is still made after it arrived, so a scrape never shows less than the log already said.
SCRAPE_INTERVAL: Final = 0.05
CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"  # what generate_latest writes
REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
}
_REQUEST_LINE = re.compile(rb"([!-~]+) ([!-~]+) HTTP/1\.[01]\r?")
_HEAD_END = re.compile(rb"\n\r?\n")


def route(head: bytes) -> int | None:
    """The status to answer a request whose first bytes are `head`; None while its head may still come."""
    end = _HEAD_END.search(head)
    if end is None or end.end() > MAX_HEAD:
        return 431 if len(head) > MAX_HEAD else None
    m = _REQUEST_LINE.fullmatch(head[: head.index(b"\n")])
    if m is None:
        return 400
    method, target = m.groups()
    if method != b"GET":
        return 405
    return 200 if target.partition(b"?")[0] == b"/metrics" else 404


def response(status: int, body: bytes = b"") -> bytes:
    """A whole HTTP response that closes the connection; a status other than 200 says only its name."""
    reason = REASONS[status]
    if status != 200:
        body = f"{status} {reason}\n".encode()
    lines = [
        f"HTTP/1.1 {status} {reason}",
        f"Content-Type: {CONTENT_TYPE if status == 200 else 'text/plain; charset=utf-8'}",
        f"Content-Length: {len(body)}",
        "Connection: close",
        *(["Allow: GET"] if status == 405 else []),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii") + body


@dataclass(frozen=True, slots=True)
class LiveState:
    """What the gauges show, taken by the broker when Prometheus scrapes."""

    active_by_port: Mapping[int, int] = field(default_factory=dict)
    sandboxes_busy: int = 0
    sandboxes_warm: int = 0
    workers: int = 0
    queued: int = 0
    sandbox_starts: int = 0
    recording_bytes: int = 0
    log_lines_dropped: int = 0
    sinks: Sequence[SinkStats] = ()


class _LiveCollector(Collector):
    def __init__(self, state: Callable[[], LiveState]) -> None:
        self.state = state

    def collect(self) -> Iterator[Metric]:
        s = self.state()
        active = GaugeMetricFamily("deadend_connections_active", "Connections open now", labels=["port"])
        for port, n in sorted(s.active_by_port.items()):
            active.add_metric([str(port)], n)
        yield active
        pool = GaugeMetricFamily("deadend_sandboxes", "Sandbox children alive, by state", labels=["state"])
        pool.add_metric(["busy"], s.sandboxes_busy)
        pool.add_metric(["warm"], s.sandboxes_warm)
        yield pool
        yield GaugeMetricFamily("deadend_sandboxes_max", "The --workers limit", value=s.workers)
        yield GaugeMetricFamily("deadend_queue_length", "Connections waiting for a sandbox", value=s.queued)
        yield CounterMetricFamily("deadend_sandbox_starts", "Sandbox children forked", value=s.sandbox_starts)
        yield GaugeMetricFamily(
            "deadend_recording_bytes",
            "The --record folder on disk as counted against --record-max-bytes, old recordings included",
            s.recording_bytes,
        )
        yield CounterMetricFamily(
            "deadend_log_lines_dropped", "Log lines lost to a slow log reader", value=s.log_lines_dropped
        )
        yield InfoMetricFamily("deadend_build", "deadend version", value={"version": __version__})
        yield from _sink_metrics(s.sinks)


def _sink_metrics(sinks: Sequence[SinkStats]) -> Iterator[Metric]:
    """Per --sink: labelled by its name (the URL without its query), a handful of series each."""
    up = GaugeMetricFamily("deadend_sink_up", "1 while the sink's collector takes events", labels=["sink"])
    queued = GaugeMetricFamily("deadend_sink_queued", "Events waiting in memory", labels=["sink"])
    spooled = GaugeMetricFamily("deadend_sink_spooled", "Events waiting on disk only", labels=["sink"])
    delivered = CounterMetricFamily(
        "deadend_sink_delivered", "Events the collector confirmed", labels=["sink"]
    )
    dropped = CounterMetricFamily(
        "deadend_sink_dropped", "Events given up (queue or spool full, too large)", labels=["sink"]
    )
    error = InfoMetricFamily("deadend_sink_last_error", "Why the sink was last down", labels=["sink"])
    for stats in sinks:
        labels = [stats.name]
        up.add_metric(labels, 1 if stats.up else 0)
        queued.add_metric(labels, stats.queued)
        spooled.add_metric(labels, stats.spooled)
        delivered.add_metric(labels, stats.delivered)
        dropped.add_metric(labels, stats.dropped)
        error.add_metric(labels, {"error": stats.last_error or ""})
    yield from (up, queued, spooled, delivered, dropped, error)


class BrokerMetrics:
    def __init__(self, state: Callable[[], LiveState]) -> None:
        # `_created` series double the output and nothing here uses them.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.registry = CollectorRegistry()
        r = self.registry
        self.accepted = Counter(
            "deadend_connections_accepted", "Connections admitted (past the caps)", ["port"], registry=r
        )
        self.refused = Counter(
            "deadend_connections_refused",
            "Connections that never reached a script",
            ["port", "reason"],
            registry=r,
        )
        self.ended = Counter(
            "deadend_sessions_ended", "Session ends by reason", ["port", "reason"], registry=r
        )
        self.bytes_in = Counter("deadend_received_bytes", "Bytes received from clients", ["port"], registry=r)
        self.bytes_out = Counter("deadend_sent_bytes", "Bytes sent to clients", ["port"], registry=r)
        self.trapped = Counter(
            "deadend_trapped_seconds", "Time clients spent connected to a script", ["port"], registry=r
        )
        self.durations = Histogram(
            "deadend_session_duration_seconds",
            "How long sessions that reached a script lasted",
            ["port"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.limits = Counter(
            "deadend_limits_hit", "Sessions ended by a ceiling, by its flag name", ["limit"], registry=r
        )
        self.script_logs = Counter("deadend_script_log_lines", "Lines scripts logged", ["port"], registry=r)
        self.ignored = Counter(
            "deadend_ignored_connections",
            "Connections from --ignore networks",
            ["port", "action"],
            registry=r,
        )
        self.reloads = Counter("deadend_reloads", "SIGHUP reloads", ["result"], registry=r)
        self.tls = Counter(
            "deadend_tls_handshakes",
            "deadend.starttls() handshakes, by result",
            ["port", "result"],
            registry=r,
        )
        self.tls_cpu = Counter(
            "deadend_tls_cpu_seconds",
            "Broker CPU spent on TLS handshakes (the ClientHello's parsing included)",
            ["port"],
            registry=r,
        )
        r.register(_LiveCollector(state))
        # --brokers: the supervisor's endpoint shows the sum of its brokers' texts, gathered at each scrape.
        self.gather: Callable[[], Awaitable[bytes]] | None = None
        self._children: dict[tuple[object, ...], Any] = {}
        self._server: asyncio.Server | None = None
        self._open: set[_Exchange] = set()
        self._next_scrape = 0.0  # loop time of the next free turn to make the text

    async def serve(self, host: str, port: int) -> None:
        """Serve the endpoint on the running loop; OSError if the address cannot be bound."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Exchange(self), host, port)

    async def stop(self) -> None:
        """Stop listening and close every connection."""
        if self._server is None:
            return
        self._server.close()
        for exchange in list(self._open):
            exchange.abort()
        await self._server.wait_closed()
        self._server = None

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def _wait_for_turn(self) -> float:
        """Seconds until this request's turn to have the text made (0: now); the turn is taken."""
        now = asyncio.get_running_loop().time()
        turn = max(now, self._next_scrape)
        self._next_scrape = turn + SCRAPE_INTERVAL
        return turn - now

    def _child(self, metric: Counter | Histogram, *labels: str) -> Any:
        """`metric.labels(*labels)`, kept: labels() checks and locks at every call (most of an event's
        cost to the metrics); the label sets are few (ports, reasons, limits), so the cache stays small."""
        key = (id(metric), *labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def observe(self, event: str, where: Where, fields: Mapping[str, object]) -> None:
        port = str(where.port)
        child = self._child
        if event == "connect" and not where.quiet:
            child(self.accepted, port).inc()
        elif event == "session.end":
            reason = str(fields["reason"])
            if where.quiet:
                turned_away = reason == Reason.IGNORED or reason in REFUSED
                child(self.ignored, port, "refuse" if turned_away else "serve").inc()
                return
            child(self.ended, port, reason).inc()
            if reason in REFUSED:
                child(self.refused, port, reason).inc()
                return
            duration = fields["duration"]
            assert isinstance(duration, float)
            child(self.trapped, port).inc(duration)
            child(self.durations, port).observe(duration)
            child(self.bytes_in, port).inc(_int(fields["bytes_in"]))
            child(self.bytes_out, port).inc(_int(fields["bytes_out"]))
            if fields["limit"] is not None:
                child(self.limits, str(fields["limit"])).inc()
        elif event == "script.log" and not where.quiet:
            child(self.script_logs, port).inc()
        elif event in ("tls.handshake", "tls.failed"):
            child(self.tls, port, "ok" if event == "tls.handshake" else "failed").inc()
            cpu_ms = fields["cpu_ms"]
            assert isinstance(cpu_ms, float | int)
            child(self.tls_cpu, port).inc(cpu_ms / 1000)
        elif event == "reload":
            result = "error" if fields["error"] else "some-failed" if fields["failed"] else "ok"
            child(self.reloads, result).inc()


def summed(texts: list[bytes]) -> bytes:
    """The sum of several brokers' exposition texts (--brokers): each series' values added up, by name and
    labels; an `_info` series (the same everywhere) shown once. The comment lines come from the first
    text that has them, in the order series first appear."""
    order: list[bytes] = []  # comment lines and series keys, as they first appear
    values: dict[bytes, float] = {}
    for text in texts:
        for line in text.splitlines():
            if not line:
                continue
            if line.startswith(b"#"):
                if line not in values:
                    values[line] = 0.0
                    order.append(line)
                continue
            key, _, number = line.rpartition(b" ")  # label values never end a line: the value does
            if key not in values:
                order.append(key)
                values[key] = 0.0
            value = float(number)
            info = key.split(b"{", 1)[0].endswith(b"_info")
            values[key] = value if info else values[key] + value
    return b"".join(
        key + b"\n" if key.startswith(b"#") else key + b" " + repr(values[key]).encode() + b"\n"
        for key in order
    )


def _int(value: object) -> int:
    assert isinstance(value, int)
    return value


class _Exchange(asyncio.Protocol):
    """One connection to the endpoint: a request head, one response, close. Nothing else is kept."""

    def __init__(self, metrics: BrokerMetrics) -> None:
        self._metrics = metrics
        self._open = metrics._open
        self._transport: asyncio.Transport | None = None
        self._head: bytearray | None = bytearray()  # None once the head is read
        self._timer: asyncio.TimerHandle | None = None
        self._gathering: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        if len(self._open) >= MAX_CONNECTIONS:
            transport.abort()
            return
        self._open.add(self)
        self._timer = asyncio.get_running_loop().call_later(HEAD_TIMEOUT, transport.abort)

    def data_received(self, data: bytes) -> None:
        if self._head is None:
            return  # the request is read: whatever else the client sends is not
        self._head += data[: MAX_HEAD + 1 - len(self._head)]
        status = route(bytes(self._head))
        if status is None:
            return
        self._head = None
        wait = self._metrics._wait_for_turn() if status == 200 else 0.0
        self._set_timer(wait, lambda: self._answer(status))

    def _answer(self, status: int) -> None:
        if self._transport is None or self._transport.is_closing():
            return
        if status == 200 and self._metrics.gather is not None:
            self._gathering = asyncio.ensure_future(self._answer_gathered(self._metrics.gather))
            return
        body = b""
        if status == 200:
            try:
                body = self._metrics.exposition()
            except Exception:  # a collector's bug costs this scrape, not the broker
                status = 500
        self._respond(status, body)

    async def _answer_gathered(self, gather: Callable[[], Awaitable[bytes]]) -> None:
        try:
            body, status = await gather(), 200
        except Exception:  # a broker that does not answer costs this scrape, not the supervisor
            body, status = b"", 500
        if self._transport is not None and not self._transport.is_closing():
            self._respond(status, body)

    def _respond(self, status: int, body: bytes) -> None:
        assert self._transport is not None
        self._transport.write(response(status, body))
        self._transport.close()  # once the response is out
        self._set_timer(SEND_TIMEOUT, self._transport.abort)  # for a client that does not take it

    def _set_timer(self, delay: float, action: Callable[[], object]) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(delay, action)

    def eof_received(self) -> bool:
        # A client that stops sending before its head is complete gets nothing; one that sent its request
        # and then shut its side down still gets its answer (which may be waiting for its turn).
        return self._head is None

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._gathering is not None:
            self._gathering.cancel()
        self._open.discard(self)

    def abort(self) -> None:
        if self._transport is not None:
            self._transport.abort()
