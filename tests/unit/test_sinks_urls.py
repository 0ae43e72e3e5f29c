"""Sink URLs (deadend/sinks/urls.py): every form, every refusal, and hostile text."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from deadend.sinks.urls import DEFAULT_MAX_MESSAGE, FACILITIES, SinkSpec, parse_sink_url


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("syslog+tcp://10.0.0.5:514", SinkSpec("syslog+tcp", "syslog+tcp://10.0.0.5:514", "10.0.0.5", 514)),
        (
            "syslog+tls://logs.example.org:6514?ca=/etc/ca.pem&cert=/c.pem&key=/c.key&facility=local4&max_message=65536",
            SinkSpec(
                "syslog+tls",
                "syslog+tls://logs.example.org:6514",
                "logs.example.org",
                6514,
                files=(("ca", Path("/etc/ca.pem")), ("cert", Path("/c.pem")), ("key", Path("/c.key"))),
                facility=FACILITIES["local4"],
                max_message=65536,
            ),
        ),
        (
            "SYSLOG+TCP://[::1]:601/",
            SinkSpec("syslog+tcp", "syslog+tcp://[::1]:601", "::1", 601),
        ),
        (
            "nats://127.0.0.1:4222/deadend.events",
            SinkSpec("nats", "nats://127.0.0.1:4222/deadend.events", "127.0.0.1", 4222, "deadend.events"),
        ),
        (
            "nats://alice@nats.example:4222/a.b?password_file=/run/secrets/nats",
            SinkSpec(
                "nats",
                "nats://alice@nats.example:4222/a.b",
                "nats.example",
                4222,
                "a.b",
                "alice",
                (("password_file", Path("/run/secrets/nats")),),
            ),
        ),
        (
            "nats://h:1/s?token_file=/t",
            SinkSpec("nats", "nats://h:1/s", "h", 1, "s", None, (("token_file", Path("/t")),)),
        ),
        (
            "hpfeeds://sensor-1@feeds.example:10000/deadend.events?secret_file=/s",
            SinkSpec(
                "hpfeeds",
                "hpfeeds://sensor-1@feeds.example:10000/deadend.events",
                "feeds.example",
                10000,
                "deadend.events",
                "sensor-1",
                (("secret_file", Path("/s")),),
            ),
        ),
        (
            "file:///var/log/deadend/events.jsonl",
            SinkSpec("file", "file:///var/log/deadend/events.jsonl", target="/var/log/deadend/events.jsonl"),
        ),
        ("file://localhost/tmp/a%20b", SinkSpec("file", "file:///tmp/a%20b", target="/tmp/a b")),
    ],
)
def test_valid_urls(url: str, expected: SinkSpec) -> None:
    assert parse_sink_url(url) == expected
    assert expected.max_message == DEFAULT_MAX_MESSAGE or "max_message" in url


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://x:1", "unknown sink 'http'"),
        ("", "unknown sink"),
        ("nats://alice:pw@h:4222/s", "no password in a URL"),
        ("syslog+tcp://h", "needs a port"),
        ("syslog+tcp://h:0", "needs a port"),
        ("syslog+tcp://h:70000", "not a URL"),
        ("syslog+tcp://:514", "needs a host"),
        ("syslog+tcp://bad_host!:514", "neither an IP address nor a valid host name"),
        ("syslog+tcp://h:514?ca=/x", "unknown query key 'ca'"),
        ("syslog+tls://h:6514?ca=relative.pem", "ca= needs an absolute path"),
        ("syslog+tls://h:6514?cert=/c", "needs both cert= and key="),
        ("syslog+tcp://h:514?facility=kern", "facility= is one of"),
        ("syslog+tcp://h:514?max_message=100", "max_message= is a whole number"),
        ("syslog+tcp://h:514?facility=daemon&facility=user", "facility= given twice"),
        ("syslog+tcp://u@h:514", "no user@"),
        ("syslog+tcp://h:514/path", "no path"),
        ("syslog+tcp://h:514#frag", "no #fragment"),
        ("nats://h:4222", "needs a subject"),
        ("nats://h:4222/a.*", "needs a subject"),
        ("nats://h:4222/a..b", "needs a subject"),
        ("nats://h:4222/a?password_file=/p", "needs a user"),
        ("nats://u@h:4222/a?token_file=/t", "takes no USER@"),
        ("nats://u@h:4222/a?token_file=/t&password_file=/p", "not both"),
        ("hpfeeds://h:10000/c?secret_file=/s", "needs an ident"),
        ("hpfeeds://i@h:10000/?secret_file=/s", "needs a channel"),
        ("hpfeeds://i@h:10000/c", "secret comes from a file"),
        ("file://host/x", "a file sink is local"),
        ("file:///", "absolute path to a file"),
        ("file:///var/log/", "absolute path to a file"),
        ("file:///var/../etc/x", "no . or .."),
        ("file:///x?y=1", "unknown query key"),
        ("syslog+tcp://h:514 x", "printable ASCII without spaces"),
        ("syslog+tcp://h\x1b[31m:514", "printable ASCII without spaces"),
        ("syslog+tcp://héte:514", "printable ASCII without spaces"),
        ("syslog+tcp://h:514?a", "not key=value pairs"),
        ("syslog+tcp://h:514?=&&", "not key=value pairs"),
    ],
)
def test_invalid_urls_say_why_in_one_line(url: str, reason: str) -> None:
    with pytest.raises(ValueError) as caught:
        parse_sink_url(url)
    message = str(caught.value)
    assert reason in message
    assert "\n" not in message and message.isascii() and message.isprintable()


@given(st.text(max_size=120))
def test_any_text_parses_or_is_one_clean_error(text: str) -> None:
    try:
        spec = parse_sink_url(text)
    except ValueError as e:
        message = str(e)
        assert "\n" not in message and message.isascii() and message.isprintable()
        return
    assert spec.name.isascii() and spec.name.isprintable() and "?" not in spec.name


_TOKEN = st.text(st.sampled_from("abcdefghijklmnopqrstuvwxyz0123456789-_"), min_size=1, max_size=12)


@given(st.sampled_from(["syslog+tcp", "syslog+tls", "nats", "hpfeeds"]), _TOKEN,
       st.integers(1, 65535), st.lists(_TOKEN, min_size=1, max_size=4))  # fmt: skip
def test_a_name_parses_back_to_the_same_place(scheme: str, host: str, port: int, subject: list[str]) -> None:
    """The name shown in reports is a URL for the same collector (the query's files aside)."""
    host = host.strip("-_") or "h"
    if "_" in host:
        host = host.replace("_", "")
    target = ".".join(subject)
    if scheme.startswith("syslog"):
        url = f"{scheme}://{host}:{port}"
    elif scheme == "nats":
        url = f"{scheme}://{host}:{port}/{target}"
    else:
        url = f"{scheme}://ident@{host}:{port}/{target}?secret_file=/s"
    try:
        spec = parse_sink_url(url)
    except ValueError:
        assert not host[0].isalnum() or not host[-1].isalnum()
        return
    again = parse_sink_url(spec.name + ("?secret_file=/s" if scheme == "hpfeeds" else ""))
    assert (again.scheme, again.host, again.port, again.target, again.user) == (
        spec.scheme, spec.host, spec.port, spec.target, spec.user)  # fmt: skip
