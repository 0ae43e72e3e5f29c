"""The collector fixtures of tests/sinks (defined in collectors.py, which the tests import helpers from)."""

from tests.sinks.collectors import hpfeeds_broker, nats_factory, pki, rsyslog

__all__ = ["hpfeeds_broker", "nats_factory", "pki", "rsyslog"]
