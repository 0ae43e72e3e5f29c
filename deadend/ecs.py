"""`--log-format ecs`: the events in Elastic Common Schema's names, for Elasticsearch, OpenSearch and the
SIEMs that read ECS. A pure mapping from the deadend JSON object (deadend/logs.py `json_record`) to an ECS
document; the field-by-field table is in docs/events.md.

What ECS has a field for goes there (`@timestamp`, `event.*`, `source.*`, `destination.*`,
`observer.*`, `user.name`, `url.path`, `user_agent.original`, `tls.client.*`, ...); everything else of
deadend's stays, under its own name, in `deadend.*` (the connection id, the script's port, an end's
`closed_by`, every field a script logged, ...), so no information is lost and no key collides with a
future ECS field. A test checks every key written against ECS's published field list
(tests/data/ecs/, release ECS_VERSION).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

ECS_VERSION: Final = "8.17.0"

# The deadend base fields an ECS field carries; the rest go under `deadend.`.
_BASE: Final = {
    "time": "@timestamp",
    "msg": "message",
    "level": "log.level",
    "id": "event.id",
    "event": "event.action",
    "sensor": "observer.hostname",
    "peer": "source.ip",
    "peer_port": "source.port",
    "dst_ip": "destination.ip",
    "dst_port": "destination.port",
}
# Event fields with an ECS home (values converted where ECS wants another unit).
_FIELDS: Final = {
    "reason": "event.reason",
    "bytes_in": "source.bytes",
    "bytes_out": "destination.bytes",
    "ja3": "tls.client.ja3",
    "sni": "tls.client.server_name",
    "cipher": "tls.cipher",
    "alpn_selected": "tls.next_protocol",
}
# Names scripts use in deadend.log's fields that ECS has a field for (the examples use these). Every field
# a script logged is also kept under `deadend.fields.`, mapped or not.
SCRIPT_FIELDS: Final = {
    "user": "user.name",
    "http.path": "url.path",
    "http.url": "url.original",
    "http.host": "url.domain",
    "http.method": "http.request.method",
    "http.user_agent": "user_agent.original",
    "email.from": "email.from.address",
}
# event name -> (event.category, event.type), ECS's categorisation; events not listed are broker
# process events of type info.
_CATEGORY: Final[dict[str, tuple[list[str], list[str]]]] = {
    "connect": (["network"], ["connection", "start"]),
    "session.end": (["network"], ["connection", "end"]),
    "refused": (["network"], ["connection", "denied"]),
    "queued": (["network"], ["connection", "info"]),
    "dequeued": (["network"], ["connection", "info"]),
    "proxy.error": (["network"], ["connection", "error"]),
    "session.problem": (["network"], ["connection", "error"]),
    "tls.handshake": (["network"], ["protocol"]),
    "tls.failed": (["network"], ["protocol", "error"]),
    "script.log": (["intrusion_detection"], ["info"]),
    "script.log_dropped": (["intrusion_detection"], ["info"]),
    "broker.ready": (["process"], ["start"]),
    "broker.stopping": (["process"], ["end"]),
    "brokers.ready": (["process"], ["start"]),
    "brokers.exited": (["process"], ["end"]),
    "broker.error": (["process"], ["error"]),
    "accept.error": (["network"], ["error"]),
    "broker.config": (["configuration"], ["info"]),
    "reload": (["configuration"], ["change"]),
    "script.compile_error": (["configuration"], ["error"]),
    "script.ignored": (["configuration"], ["info"]),
}
_DEFAULT_CATEGORY: Final = (["process"], ["info"])


def _put(document: dict[str, object], dotted: str, value: object) -> bool:
    """Set `value` at the nested path `dotted`; False if a value already holds part of that path."""
    *parents, leaf = dotted.split(".")
    node = document
    for name in parents:
        child = node.setdefault(name, {})
        if not isinstance(child, dict):
            return False
        node = child
    if leaf in node:
        return False
    node[leaf] = value
    return True


def ecs_document(record: Mapping[str, object]) -> dict[str, object]:
    """The ECS document for one deadend JSON record (nested objects, as Elasticsearch stores them)."""
    document: dict[str, object] = {}
    category, kind = _CATEGORY.get(str(record["event"]), _DEFAULT_CATEGORY)
    _put(document, "ecs.version", ECS_VERSION)
    _put(document, "event.kind", "event")
    _put(document, "event.module", "deadend")
    _put(document, "event.dataset", "deadend.events")
    _put(document, "event.category", category)
    _put(document, "event.type", kind)
    _put(document, "observer.name", record["sensor"])
    _put(document, "observer.type", "honeypot")
    _put(document, "observer.product", "deadend")
    if record.get("conn") is not None:
        _put(document, "network.transport", "tcp")
    for name, value in record.items():
        if name == "fields" and isinstance(value, dict):
            _script_fields(document, value)
        elif name in _BASE:
            if value is not None:
                _put(document, _BASE[name], value)
        elif name in _FIELDS and value is not None:
            _put(document, _FIELDS[name], value)
        elif name == "version" and record["event"] == "tls.handshake" and isinstance(value, str):
            # ECS: the protocol ("tls") and its version ("1.3") apart; deadend's "TLSv1.3" kept whole
            _put(document, "tls.version_protocol", "tls")
            _put(document, "tls.version", value.removeprefix("TLSv"))
            _put(document, "tls.established", True)
            _put(document, "deadend.tls_version", value)
        elif name == "duration" and isinstance(value, (int, float)):
            _put(document, "event.duration", round(value * 1e9))  # ECS: nanoseconds
            _put(document, "deadend.duration", value)
        else:
            _put(document, f"deadend.{name}", value)  # v, port, conn, closed_by, ja4, alpn, ...
    return document


def _script_fields(document: dict[str, object], fields: Mapping[str, object]) -> None:
    for name, value in sorted(fields.items()):
        if name in SCRIPT_FIELDS:
            _put(document, SCRIPT_FIELDS[name], value)
        # Kept whole under deadend.fields; a name that another one's path runs through ("http" beside
        # "http.path") cannot nest both: in name order the longer one comes second and is written with "_"
        # for "." ("http_path"), unless the script logged that very name too.
        if not _put(document, f"deadend.fields.{name}", value):
            _put(document, f"deadend.fields.{name.replace('.', '_')}", value)
