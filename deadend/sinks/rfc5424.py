"""Syslog messages (RFC 5424) in octet-counting frames (RFC 6587 section 3.4.1). Pure functions.

    <PRI>1 TIMESTAMP HOSTNAME deadend PROCID MSGID - {"v":…,"id":…,…}

PRI is the sink's facility and the event's level; TIMESTAMP the event's time (already RFC 3339 UTC with
milliseconds); HOSTNAME the sensor's name; APP-NAME `deadend`; PROCID the broker's pid; MSGID the event's
catalogue name. STRUCTURED-DATA is the nil value `-`: an SD-ID of our own would need an IANA enterprise
number, and the JSON in MSG already carries every field (one parser for every consumer, the id to
de-duplicate by included). MSG is that JSON, pure ASCII, so it needs no BOM.
"""

from __future__ import annotations

import re
from typing import Final

from deadend.sinks.event import OutEvent

APP_NAME: Final = b"deadend"
# RFC 5424 section 6.2.1 severities.
SEVERITY: Final = {"debug": 7, "info": 6, "warn": 4, "error": 3}

# Header fields are PRINTUSASCII (33..126) with a length limit; anything else becomes "_" rather than
# letting a sensor name split the header.
_NOT_PRINTUSASCII: Final = re.compile(r"[^\x21-\x7e]")
_LIMITS: Final = {"hostname": 255, "procid": 128, "msgid": 32}


def header_field(value: str, kind: str) -> bytes:
    raw = _NOT_PRINTUSASCII.sub("_", value).encode("ascii")[: _LIMITS[kind]]
    return raw or b"-"


def message(event: OutEvent, facility: int, procid: bytes) -> bytes:
    """One RFC 5424 message for `event` (no framing)."""
    pri = facility * 8 + SEVERITY[event.level]
    host = header_field(event.sensor, "hostname")
    msgid = header_field(event.event, "msgid")
    return b"<%d>1 %s %s %s %s %s - %s" % (
        pri,
        event.time.encode("ascii"),
        host,
        APP_NAME,
        procid,
        msgid,
        event.body,
    )


def frame(msg: bytes) -> bytes:
    """Octet-counting framing: the message's length in decimal, a space, the message."""
    return b"%d %s" % (len(msg), msg)


def parse_frames(data: bytes) -> tuple[list[bytes], bytes]:
    """Split octet-counted frames off `data`: (complete messages, the unparsed rest). For tests and tools.

    ValueError on a malformed length (not 1..9 digits then a space).
    """
    messages: list[bytes] = []
    while data:
        space = data.find(b" ", 0, 11)
        if space < 0:
            if len(data) > 10 or not data.isdigit():
                raise ValueError("octet count is not 1..9 digits and a space")
            break
        count = data[:space]
        if not count.isdigit() or count.startswith(b"0") or len(count) > 9:
            raise ValueError("octet count is not 1..9 digits and a space")
        end = space + 1 + int(count)
        if len(data) < end:
            break
        messages.append(data[space + 1 : end])
        data = data[end:]
    return messages, data
