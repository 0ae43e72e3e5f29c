"""The catalogue of log events: every event the broker emits, with its fields. The one home for the schema.

Text lines show an event's message; JSON lines (`--log-format json`) carry the same message plus the
event name and its fields, so a SIEM never has to parse prose. `docs/events.schema.json` is generated
from this table (`python -m deadend.events > docs/events.schema.json`) and a test keeps the two equal.
Bump SCHEMA_VERSION when a field changes meaning or goes away; adding an event or a field does not.
"""

from __future__ import annotations

import json
import sys
from typing import Any, Final

from deadend.reasons import ClosedBy, Reason
from deadend.wire import FIELD_KEY, FIELDS_MAX

SCHEMA_VERSION: Final = 3

# JSON Schema type for each field kind used below.
_TYPES: Final[dict[str, dict[str, Any]]] = {
    "reason": {"enum": [r.value for r in Reason if r != Reason.IGNORED]},  # ignored peers: never written
    "closed_by": {"enum": [c.value for c in ClosedBy]},
    "str": {"type": "string"},
    "int": {"type": "integer"},
    "num": {"type": "number"},
    "bool": {"type": "boolean"},
    "str?": {"type": ["string", "null"]},
    "int?": {"type": ["integer", "null"]},
    "strs": {"type": "array", "items": {"type": "string"}},
    "strs?": {"type": ["array", "null"], "items": {"type": "string"}},
    # deadend.log's fields (deadend/wire.py holds the rules): escaped strings, integers, booleans
    "fields": {
        "type": "object",
        "maxProperties": FIELDS_MAX,
        "propertyNames": {"pattern": "^" + FIELD_KEY.pattern.decode() + "$"},
        "additionalProperties": {"type": ["string", "integer", "boolean"]},
    },
}

# The client's TLS fingerprints, on every event of a session that began TLS (`deadend.starttls()`), null
# where it did not: JA4 and JA3 of its ClientHello, the server name it asked for (SNI) and the protocols
# it offered (ALPN), escaped as any text a client controls.
TLS_FIELDS: Final[dict[str, str]] = {"ja4": "str?", "ja3": "str?", "sni": "str?", "alpn": "strs?"}

# name -> (what it means, {field: kind}). Every field listed is always present in the JSON object.
EVENTS: Final[dict[str, tuple[str, dict[str, str]]]] = {
    # broker lifecycle
    "broker.ready": ("accepting connections", {"scripts": "int", "workers": "int"}),
    "broker.config": (
        "the effective configuration, at start-up and after every reload (`name=value` pairs)",
        {"config": "str"},
    ),
    "broker.stopping": ("shutdown began (SIGINT/SIGTERM or a fatal pool failure)", {}),
    "brokers.ready": (
        "--brokers: every broker process is serving (the supervisor's line)",
        {"brokers": "int"},
    ),
    "brokers.exited": (
        "--brokers: a broker process exited on its own; the supervisor starts it again in `restart_in` s",
        {"broker": "int", "status": "str", "restart_in": "num"},
    ),
    "broker.privileges": ("privileges dropped to --user", {"user": "str", "uid": "int", "gid": "int"}),
    "broker.warning": ("a broker-wide condition the operator should know", {}),
    "broker.error": ("a broker-wide failure; the broker goes on unless it says otherwise", {}),
    "metrics.listening": ("the Prometheus endpoint is up", {"address": "str"}),
    "tls.certificate": (
        "at start-up, a certificate `deadend.starttls()` presents: its names, key, expiry and origin (the "
        "operator's file or generated), and the scripts it is for",
        {"certificate": "str", "scripts": "strs"},
    ),
    "sandbox.isolation": (
        "the sandbox zygote started; the isolation layers every sandbox lives in, and those skipped",
        {"active": "strs", "skipped": "strs"},
    ),
    "sandbox.layer_skipped": (
        "an isolation layer this kernel or setup refused (the sandboxes run without it), and why",
        {"layer": "str", "reason": "str"},
    ),
    # scripts and listeners
    "script.ignored": ("a file in the scripts folder is not a <port>.lua script", {"file": "str"}),
    "script.compile_error": (
        "a script does not compile; its port is not opened, or on reload keeps its previous version",
        {"script": "str", "error": "str", "kept_previous": "bool"},
    ),
    "script.unreadable": (
        "a <port>.lua file cannot be read as a script (permissions, not a regular file, too large, a "
        "lease); its port is not opened, or on reload keeps its previous version",
        {"script": "str", "error": "str", "kept_previous": "bool"},
    ),
    "listen": ("listening on an address for a script", {"address": "str", "script": "str"}),
    "listen.stopped": ("a listener closed after its script was removed (reload)", {"address": "str"}),
    "reload": (
        "SIGHUP rescan finished; `error` says why it could not run at all (then nothing changed)",
        {"added": "strs", "removed": "strs", "changed": "strs", "failed": "strs", "error": "str?"},
    ),
    "accept.error": ("accept() failed on a listener", {"address": "str", "error": "str"}),
    # connections and sessions
    "connect": (
        "a connection was accepted and will get a sandbox",
        {"script": "str", "proxy": "str?"},
    ),
    "proxy.error": ("a PROXY protocol header was missing or malformed", {"error": "str"}),
    "queued": ("all sandboxes busy; the connection waits", {"waiting": "int"}),
    "dequeued": ("a queued connection got a sandbox", {"waited_ms": "int"}),
    "refused": ("no sandbox for this connection", {"reason": "reason"}),
    "script.log": (
        "a line the script logged with deadend.log(): `msg` is its text, escaped; `fields` what it named",
        {"fields": "fields"},
    ),
    "script.log_dropped": (
        "script log lines dropped: past --log-rate, or too much of this session's waiting for stdout",
        {"dropped": "int"},
    ),
    "session.problem": (
        "why a session ended abnormally (error text, limit detail)",
        {"reason": "reason", "detail": "str"},
    ),
    "tls.handshake": (
        "a `deadend.starttls()` completed: what was negotiated, the client's fingerprints, and what the "
        "handshake cost (wall and broker CPU milliseconds, the ClientHello's parsing included)",
        {
            "version": "str",
            "cipher": "str",
            "alpn_selected": "str?",
            "handshake_ms": "num",
            "cpu_ms": "num",
            **TLS_FIELDS,
        },
    ),
    "tls.failed": (
        "a `deadend.starttls()` failed (the fingerprints are null when no ClientHello was read); the "
        "connection is closed and starttls returns nil",
        {"error": "str", "cpu_ms": "num", **TLS_FIELDS},
    ),
    "session.end": (
        "exactly one per connection, refused ones included",
        {
            "reason": "reason",
            "duration": "num",
            "bytes_in": "int",
            "bytes_out": "int",
            "closed_by": "closed_by",
            "limit": "str?",
            **TLS_FIELDS,
        },
    ),
    # side channels
    "log.dropped": ("log lines dropped because the log output was too slow", {"dropped": "int"}),
    "record.warning": ("a session recording problem (cap reached, write error)", {}),
    "sink.report": (
        "an event sink changed state: down (spooling), up again, dropping, spool trouble (docs/sinks.md)",
        {},
    ),
}

BASE_FIELDS: Final[dict[str, str]] = {
    "v": "int",
    "id": "str",  # UUIDv7, unique per event and time-ordered: de-duplicate an at-least-once stream by it
    "time": "str",
    "level": "str",
    "event": "str",
    "sensor": "str",  # --sensor, the host name by default
    "port": "int?",
    "conn": "str?",
    "peer": "str?",
    "peer_port": "int?",
    "dst_ip": "str?",  # the address the client reached (with --proxy-protocol, the header's)
    "dst_port": "int?",
    "msg": "str",
}


def build_schema() -> dict[str, Any]:
    """A JSON Schema (2020-12) for one JSON log line."""
    base = {name: dict(_TYPES[kind]) for name, kind in BASE_FIELDS.items()}
    base["v"] = {"const": SCHEMA_VERSION}
    base["id"] = {
        "type": "string",
        "pattern": "^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$",
    }
    base["level"] = {"enum": ["debug", "info", "warn", "error"]}
    base["event"] = {"enum": sorted(EVENTS)}
    per_event = []
    for name, (meaning, fields) in sorted(EVENTS.items()):
        per_event.append(
            {
                "if": {"properties": {"event": {"const": name}}},
                "then": {
                    "description": meaning,
                    "properties": {f: _TYPES[kind] for f, kind in fields.items()},
                    "required": sorted(fields),
                    "propertyNames": {"enum": sorted([*BASE_FIELDS, *fields])},
                },
            }
        )
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"https://deadend.invalid/events-v{SCHEMA_VERSION}.schema.json",
        "title": f"deadend log event, schema version {SCHEMA_VERSION}",
        "type": "object",
        "properties": base,
        "required": sorted(BASE_FIELDS),
        "allOf": per_event,
    }


def events_table() -> str:
    """docs/events.md's table of events, generated: a test keeps the document equal to it."""
    rows = ["| event | when | fields |", "|---|---|---|"]
    for name, (meaning, fields) in EVENTS.items():
        shown = ", ".join(f"`{f}` ({kind})" for f, kind in fields.items()) or "—"
        rows.append(f"| `{name}` | {meaning.replace('|', '/')} | {shown} |")
    return "\n".join(rows)


if __name__ == "__main__":
    json.dump(build_schema(), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")
