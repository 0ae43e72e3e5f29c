"""Sink URLs: what an operator writes to name a collector, parsed into a SinkSpec. Pure, no I/O.

    syslog+tcp://HOST:PORT[?facility=daemon&max_message=8192]
    syslog+tls://HOST:PORT[?ca=/ca.pem&cert=/client.pem&key=/client.key&facility=…&max_message=…]
    nats://[USER@]HOST:PORT/SUBJECT[?password_file=/path | ?token_file=/path]
    hpfeeds://IDENT@HOST:PORT/CHANNEL?secret_file=/path
    file:///PATH

Secrets never travel in a URL (URLs end up in process listings, config dumps and these very reports): a
password in the URL is refused, and every secret comes from a file named in the query. So the `name` of
a spec, the URL without its query, is safe to print.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Final

SCHEMES: Final = ("syslog+tcp", "syslog+tls", "nats", "hpfeeds", "file")

# RFC 5424 section 6.2.1 facility codes an operator might route honeypot events by.
FACILITIES: Final = {
    "user": 1,
    "daemon": 3,
    "auth": 4,
    "authpriv": 10,
    "local0": 16,
    "local1": 17,
    "local2": 18,
    "local3": 19,
    "local4": 20,
    "local5": 21,
    "local6": 22,
    "local7": 23,
}
# rsyslog's default maxMessageSize; RFC 5424 lets a receiver refuse more than 480 octets but asks for 2048.
DEFAULT_MAX_MESSAGE: Final = 8192
MAX_MESSAGE_RANGE: Final = (480, 1 << 20)

# Query keys each scheme accepts; the ones ending in _file (and ca, cert, key) name files.
_KEYS: Final = {
    "syslog+tcp": ("facility", "max_message"),
    "syslog+tls": ("ca", "cert", "key", "facility", "max_message"),
    "nats": ("password_file", "token_file"),
    "hpfeeds": ("secret_file",),
    "file": (),
}
_FILE_KEYS: Final = frozenset({"ca", "cert", "key", "password_file", "token_file", "secret_file"})

_LABEL: Final = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME: Final = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(?:\.{_LABEL})*\.?")
# A NATS subject to publish on: dot-separated tokens, no wildcards, no whitespace or controls.
_SUBJECT: Final = re.compile(r"[!-)+-\-/-=?-~]+(?:\.[!-)+-\-/-=?-~]+)*")
# An hpfeeds ident or channel: one length byte on the wire, printable ASCII here.
_HPFEEDS_NAME: Final = re.compile(r"[!-~]{1,255}")


@dataclass(frozen=True, slots=True)
class SinkSpec:
    """One configured sink. `name` is the URL without its query: what reports and stats show."""

    scheme: str
    name: str
    host: str = ""  # an IP literal (no brackets) or a host name; "" for file
    port: int = 0
    target: str = ""  # the file's path, the NATS subject or the hpfeeds channel
    user: str | None = None  # the NATS user or the hpfeeds ident
    files: tuple[tuple[str, Path], ...] = ()  # (query key, absolute path) of CA, certificates and secrets
    facility: int = FACILITIES["daemon"]
    max_message: int = DEFAULT_MAX_MESSAGE

    def file(self, key: str) -> Path | None:
        return next((path for k, path in self.files if k == key), None)


def parse_sink_url(text: str) -> SinkSpec:
    """Parse one sink URL; ValueError with a one-line reason (quoting only safe text) if it is bad."""
    if not text.isascii() or not text.isprintable() or " " in text:
        raise ValueError("a sink URL is printable ASCII without spaces (percent-encode the rest)")
    try:
        parts = urllib.parse.urlsplit(text)
        port = parts.port
    except ValueError as e:
        raise ValueError(f"not a URL: {e}") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError(f"unknown sink {scheme or text[:40]!r}: use one of {', '.join(SCHEMES)}")
    if parts.fragment:
        raise ValueError(f"{scheme}: a sink URL has no #fragment")
    if parts.password is not None:
        raise ValueError(f"{scheme}: no password in a URL; put it in a file and name the file in the query")
    query = _query(scheme, parts.query)
    if scheme == "file":
        return _file_spec(parts)
    host = _host(scheme, parts.hostname)
    if port is None or port == 0:
        raise ValueError(f"{scheme}://HOST:PORT needs a port in 1..65535")
    shown_host = f"[{host}]" if ":" in host else host
    user = urllib.parse.unquote(parts.username) if parts.username is not None else None
    files = tuple((k, Path(v)) for k, v in query.items() if k in _FILE_KEYS)
    if scheme.startswith("syslog"):
        if user is not None:
            raise ValueError(f"{scheme}: no user@ in a syslog URL")
        if parts.path not in ("", "/"):
            raise ValueError(f"{scheme}: a syslog URL has no path")
        if ("cert" in query) != ("key" in query):
            raise ValueError(f"{scheme}: a client certificate needs both cert= and key=")
        return SinkSpec(
            scheme,
            f"{scheme}://{shown_host}:{port}",
            host,
            port,
            files=files,
            facility=_facility(scheme, query.get("facility", "daemon")),
            max_message=_max_message(scheme, query.get("max_message")),
        )
    target = urllib.parse.unquote(parts.path[1:]) if parts.path.startswith("/") else ""
    if scheme == "nats":
        if not _SUBJECT.fullmatch(target):
            raise ValueError("nats://HOST:PORT/SUBJECT needs a subject: dot-separated tokens, no * or >")
        if "password_file" in query and "token_file" in query:
            raise ValueError("nats: either password_file= (with USER@) or token_file=, not both")
        if "password_file" in query and user is None:
            raise ValueError("nats: password_file= needs a user: nats://USER@HOST:PORT/SUBJECT")
        if "token_file" in query and user is not None:
            raise ValueError("nats: token_file= takes no USER@")
        if user is not None and not _HPFEEDS_NAME.fullmatch(user):
            raise ValueError("nats: the user is printable ASCII")
    else:  # hpfeeds
        if user is None or not _HPFEEDS_NAME.fullmatch(user):
            raise ValueError("hpfeeds://IDENT@HOST:PORT/CHANNEL needs an ident: 1..255 printable ASCII")
        if not _HPFEEDS_NAME.fullmatch(target):
            raise ValueError("hpfeeds://IDENT@HOST:PORT/CHANNEL needs a channel: 1..255 printable ASCII")
        if "secret_file" not in query:
            raise ValueError("hpfeeds: the secret comes from a file: ?secret_file=/path")
    at = f"{urllib.parse.quote(user, safe='')}@" if user is not None else ""
    name = f"{scheme}://{at}{shown_host}:{port}/{urllib.parse.quote(target, safe='.-_~!$&()*+,;=:@')}"
    return SinkSpec(scheme, name, host, port, target, user, files)


def _query(scheme: str, query: str) -> dict[str, str]:
    allowed = _KEYS[scheme]
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ValueError(f"{scheme}: the query is not key=value pairs joined by &") from None
    found: dict[str, str] = {}
    for key, value in pairs:
        if key not in allowed:
            known = ", ".join(f"{k}=" for k in allowed) or "none"
            raise ValueError(f"{scheme}: unknown query key {key[:40]!r} (known: {known})")
        if key in found:
            raise ValueError(f"{scheme}: {key}= given twice")
        if key in _FILE_KEYS and not (value.startswith("/") and "\0" not in value):
            raise ValueError(f"{scheme}: {key}= needs an absolute path")
        found[key] = value
    return found


def _host(scheme: str, host: str | None) -> str:
    if not host:
        raise ValueError(f"{scheme}://HOST:PORT needs a host")
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    if not _HOSTNAME.fullmatch(host):
        raise ValueError(f"{scheme}: the host is neither an IP address nor a valid host name")
    return host


def _facility(scheme: str, name: str) -> int:
    if name not in FACILITIES:
        raise ValueError(f"{scheme}: facility= is one of {', '.join(FACILITIES)}")
    return FACILITIES[name]


def _max_message(scheme: str, value: str | None) -> int:
    if value is None:
        return DEFAULT_MAX_MESSAGE
    low, high = MAX_MESSAGE_RANGE
    if not (value.isdigit() and low <= int(value) <= high):
        raise ValueError(f"{scheme}: max_message= is a whole number of bytes in {low}..{high}")
    return int(value)


def _file_spec(parts: urllib.parse.SplitResult) -> SinkSpec:
    if parts.netloc not in ("", "localhost"):
        raise ValueError("file:///PATH: a file sink is local (no host)")
    path = urllib.parse.unquote(parts.path)
    if not path.startswith("/") or path.endswith("/") or "\0" in path:
        raise ValueError("file:///PATH needs an absolute path to a file")
    if any(part in (".", "..") for part in path.split("/")):
        raise ValueError("file:///PATH: no . or .. in the path")
    return SinkSpec("file", f"file://{urllib.parse.quote(path)}", target=path)
