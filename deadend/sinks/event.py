"""The event as the sinks receive it: serialised once by the broker, then only carried.

Every sink frames the same `body`; the other fields are copies of what the body says, kept apart so a sink
can put them in its own envelope (a syslog header, a NATS header) without parsing JSON per event.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

LEVELS: Final = ("debug", "info", "warn", "error")

# What the envelope fields may hold: printable ASCII without spaces. The spool separates them with tabs
# and a syslog header with spaces, so neither may appear; the broker never produces them.
_TOKEN: Final = re.compile(r"[\x21-\x7e]{1,255}")


@dataclass(frozen=True, slots=True)
class OutEvent:
    """What the broker hands over, already serialised once."""

    id: str  # UUIDv7 text, unique per event (consumers de-duplicate by it)
    time: str  # "2026-11-25T16:35:55.259Z" (UTC, ms), as in the JSON line
    level: str  # debug | info | warn | error
    event: str  # catalogue name, e.g. "session.end"
    sensor: str  # the sensor's name (host name by default)
    body: bytes  # the whole event as one JSON object, ASCII only, no trailing newline


def contract_breach(event: OutEvent) -> str | None:
    """Why `event` breaks the contract above (a broker bug, never attacker input), or None.

    Checked once, at publish: a record the spool or a framing could not carry must not get that far.
    """
    if event.level not in LEVELS:
        return "level is not one of debug, info, warn, error"
    for name in ("id", "time", "event", "sensor"):
        value = getattr(event, name)
        if not isinstance(value, str) or not _TOKEN.fullmatch(value):
            return f"{name} is not 1..255 printable ASCII characters without spaces"
    body = event.body
    if not isinstance(body, bytes) or not body.isascii() or b"\n" in body or b"\r" in body:
        return "body is not ASCII bytes without line breaks"
    return None
