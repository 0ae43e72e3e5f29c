"""`--log-format ecs`: every key written is a field of ECS's published list (tests/data/ecs/) or under
`deadend.`, for every event of the catalogue and any fields a script logs; and the values ECS types.
And docs/events.md's table of events is the catalogue."""

from __future__ import annotations

import csv
import io
import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from deadend.ecs import ECS_VERSION, SCRIPT_FIELDS, ecs_document
from deadend.events import EVENTS, events_table
from deadend.logs import EventLog, Where, json_record
from deadend.reasons import ClosedBy, Reason
from tests.conftest import DATA, REPO

with open(DATA / "ecs" / f"fields-{ECS_VERSION}.csv", newline="") as f:
    ECS_TYPES = {row["Field"]: row["Type"] for row in csv.DictReader(f)}

SAMPLES: dict[str, Any] = {
    "reason": Reason.DONE.value,
    "closed_by": ClosedBy.PEER.value,
    "str": "text",
    "int": 7,
    "num": 1.5,
    "bool": True,
    "str?": None,
    "int?": 3,
    "strs": ["a", "b"],
    "strs?": ["h2", "http/1.1"],
    "fields": {"user": "root", "password": "x", "http.path": "/", "http": "clash", "tries": 3},
}
WHERE = Where(25, "0123456789ab", "192.0.2.7", 40000, "198.51.100.1", 25)


def flat_keys(document: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in document.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_keys(value, name + "."))
        else:
            out[name] = value
    return out


def check(document: dict[str, Any]) -> None:
    for key, value in flat_keys(document).items():
        if key.startswith("deadend."):
            continue
        assert key in ECS_TYPES, f"{key} is not an ECS {ECS_VERSION} field"
        kind = ECS_TYPES[key]
        if kind == "long":
            assert type(value) is int, (key, value)
        elif kind in ("keyword", "ip", "date", "wildcard", "match_only_text", "text", "constant_keyword"):
            assert isinstance(value, str) or (
                isinstance(value, list) and all(isinstance(v, str) for v in value)
            )


def document_for(event: str) -> dict[str, Any]:
    fields = {name: SAMPLES[kind] for name, kind in EVENTS[event][1].items()}
    record = json_record("0193a4b2-0000-7000-8000-000000000000", "2026-12-06T10:00:00.000Z", "info",
                         "sensor-1", WHERE, event, "message", fields)  # fmt: skip
    return ecs_document(record)


def test_every_event_of_the_catalogue_maps_to_ecs_fields_or_deadend() -> None:
    for event in EVENTS:
        check(document_for(event))


def test_the_well_known_fields_land_where_ecs_wants_them() -> None:
    end = flat_keys(document_for("session.end"))
    assert end["@timestamp"] == "2026-12-06T10:00:00.000Z" and end["event.action"] == "session.end"
    assert end["source.ip"] == "192.0.2.7" and end["source.port"] == 40000
    assert end["destination.ip"] == "198.51.100.1" and end["destination.port"] == 25
    assert end["observer.hostname"] == "sensor-1" and end["event.id"].startswith("0193a4b2")
    assert end["event.reason"] == "done" and end["event.duration"] == 1_500_000_000
    assert end["source.bytes"] == 7 and end["destination.bytes"] == 7
    assert end["event.category"] == ["network"] and end["event.type"] == ["connection", "end"]
    assert end["deadend.closed_by"] == "peer" and end["deadend.conn"] == "0123456789ab"
    log = flat_keys(document_for("script.log"))
    assert log["user.name"] == "root" and log["url.path"] == "/"
    # every field the script logged stays under deadend.fields, "http" beside "http.path" included
    assert log["deadend.fields.user"] == "root" and log["deadend.fields.password"] == "x"
    assert log["deadend.fields.http"] == "clash" and log["deadend.fields.http_path"] == "/"
    assert log["deadend.fields.tries"] == 3


def test_a_tls_handshake_lands_in_ecs_tls() -> None:
    fields = {name: SAMPLES[kind] for name, kind in EVENTS["tls.handshake"][1].items()}
    fields.update(version="TLSv1.3", cipher="TLS_AES_128_GCM_SHA256", alpn_selected="http/1.1")
    fields.update(ja4="t13d3112h2_e8f1e7e78f70_b26ce05bbdd6", ja3="0149f47eabf9a20d0893e2a44e5a6323")
    fields.update(sni="www.example.com")
    record = json_record("id", "t", "info", "s", WHERE, "tls.handshake", "m", fields)
    tls = flat_keys(ecs_document(record))
    assert tls["tls.version"] == "1.3" and tls["tls.version_protocol"] == "tls" and tls["tls.established"]
    assert tls["tls.cipher"] == "TLS_AES_128_GCM_SHA256" and tls["tls.next_protocol"] == "http/1.1"
    assert tls["tls.client.ja3"] == "0149f47eabf9a20d0893e2a44e5a6323"
    assert tls["tls.client.server_name"] == "www.example.com"
    assert tls["deadend.ja4"] == "t13d3112h2_e8f1e7e78f70_b26ce05bbdd6"  # ECS 8.17 has no JA4 field
    assert tls["deadend.alpn"] == ["h2", "http/1.1"]
    assert tls["event.type"] == ["protocol"]


def test_every_script_field_mapping_targets_an_ecs_field() -> None:
    for target in SCRIPT_FIELDS.values():
        assert target in ECS_TYPES, target


field_names = st.from_regex(r"\A[a-z][a-z0-9_.]{0,31}\Z")
field_values = st.one_of(st.text(max_size=20), st.integers(-(1 << 63), (1 << 64) - 1), st.booleans())


@given(st.dictionaries(field_names, field_values, max_size=16))
def test_any_script_fields_stay_in_ecs_or_deadend(fields: dict[str, object]) -> None:
    record = json_record("id", "t", "info", "s", WHERE, "script.log", "m", {"fields": fields})
    document = ecs_document(record)
    check(document)
    assert json.loads(json.dumps(document)) == document


def test_ecs_lines_from_the_event_log() -> None:
    out = io.StringIO()
    log = EventLog(out, fmt="ecs", sensor="sensor-9")
    log.script_line("warn", WHERE, b"login", False, (("user", b"admin"), ("password", b"\x1b[2J")))
    log.flush()
    document = json.loads(out.getvalue())
    check(document)
    flat = flat_keys(document)
    assert flat["user.name"] == "admin" and flat["deadend.fields.password"] == "\\x1b[2J"
    assert flat["observer.hostname"] == "sensor-9" and flat["log.level"] == "warn"
    assert flat["ecs.version"] == ECS_VERSION


def test_docs_events_table_is_the_catalogue() -> None:
    text = (REPO / "docs" / "events.md").read_text()
    table = text.split("<!-- events:begin -->\n", 1)[1].split("\n<!-- events:end -->", 1)[0]
    assert table == events_table(), "docs/events.md's table is stale: paste deadend.events.events_table()"
