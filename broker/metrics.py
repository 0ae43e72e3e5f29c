"""Prometheus metrics (`--metrics HOST:PORT`), served by prometheus_client from its own thread.

Counters follow the log events (EventLog observers see every event, those of ignored peers included), so
a metric and its log line can never disagree; gauges are read from the broker at scrape time. Labels are
of bounded cardinality only: port (one per script), reason and limit (fixed word lists). Never a peer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from deadend import __version__
from deadend.logs import Where
from deadend.reasons import REFUSED, Reason

DURATION_BUCKETS = (0.1, 1.0, 10.0, 60.0, 300.0, 1800.0, 3600.0, 4 * 3600.0)


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
            "Bytes in the --record folder, old recordings included",
            s.recording_bytes,
        )
        yield CounterMetricFamily(
            "deadend_log_lines_dropped", "Log lines lost to a slow log reader", value=s.log_lines_dropped
        )
        yield InfoMetricFamily("deadend_build", "deadend version", value={"version": __version__})


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
        r.register(_LiveCollector(state))
        self._server: WSGIServer | None = None

    def serve(self, host: str, port: int) -> None:
        """Start the HTTP endpoint (a daemon thread); OSError if the address cannot be bound."""
        self._server, _thread = start_http_server(port, host, registry=self.registry)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def observe(self, event: str, where: Where, fields: Mapping[str, object]) -> None:
        port = str(where.port)
        if event == "connect" and not where.quiet:
            self.accepted.labels(port).inc()
        elif event == "session.end":
            reason = str(fields["reason"])
            if where.quiet:
                turned_away = reason == Reason.IGNORED or reason in REFUSED
                self.ignored.labels(port, "refuse" if turned_away else "serve").inc()
                return
            self.ended.labels(port, reason).inc()
            if reason in REFUSED:
                self.refused.labels(port, reason).inc()
                return
            duration = fields["duration"]
            assert isinstance(duration, float)
            self.trapped.labels(port).inc(duration)
            self.durations.labels(port).observe(duration)
            self.bytes_in.labels(port).inc(_int(fields["bytes_in"]))
            self.bytes_out.labels(port).inc(_int(fields["bytes_out"]))
            if fields["limit"] is not None:
                self.limits.labels(str(fields["limit"])).inc()
        elif event == "script.log" and not where.quiet:
            self.script_logs.labels(port).inc()
        elif event == "reload":
            result = "error" if fields["error"] else "some-failed" if fields["failed"] else "ok"
            self.reloads.labels(result).inc()


def _int(value: object) -> int:
    assert isinstance(value, int)
    return value
