"""deadend.tlsinfo: what the broker tells of a session's TLS, to the log, the script and the recording.

The ClientHello is the attacker's: its SNI and ALPN offers reach log lines escaped and bounded, whatever
bytes and however many it holds; the script gets them raw (bounded), through the tls_info wire format."""

from __future__ import annotations

import base64
import json

from hypothesis import given
from hypothesis import strategies as st

from deadend import wire
from deadend.clienthello import ClientHello, Complete, read_client_hello
from deadend.logs import first_hidden
from deadend.tlsinfo import ALPN_NAME_SHOWN, ALPN_SHOWN, NO_TLS, SNI_SHOWN, TlsInfo


def hello_bytes(sni: bytes | None, alpn: list[bytes]) -> bytes:
    """A TLS 1.2 ClientHello with these SNI and ALPN extensions, as records."""
    extensions = b""
    if sni is not None:
        name = b"\x00" + len(sni).to_bytes(2, "big") + sni
        names = len(name).to_bytes(2, "big") + name
        extensions += b"\x00\x00" + len(names).to_bytes(2, "big") + names
    if alpn:
        protocols = b"".join(bytes([len(p)]) + p for p in alpn)
        body = len(protocols).to_bytes(2, "big") + protocols
        extensions += b"\x00\x10" + len(body).to_bytes(2, "big") + body
    body = b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x13\x01" + b"\x01\x00"
    body += len(extensions).to_bytes(2, "big") + extensions
    message = b"\x01" + len(body).to_bytes(3, "big") + body
    records = b""
    for at in range(0, len(message), 16384):
        piece = message[at : at + 16384]
        records += b"\x16\x03\x01" + len(piece).to_bytes(2, "big") + piece
    return records


def parsed(records: bytes) -> ClientHello:
    answer = read_client_hello(records)
    assert isinstance(answer, Complete)
    return answer.hello


names = st.binary(min_size=1, max_size=255)


@given(st.none() | st.binary(min_size=0, max_size=2000), st.lists(names, max_size=40))
def test_hostile_sni_and_alpn_reach_the_log_escaped_and_bounded(sni: bytes | None, alpn: list[bytes]) -> None:
    records = hello_bytes(sni, alpn)
    info = TlsInfo.of(parsed(records), records)
    fields = info.event_fields()
    line = json.dumps(fields, ensure_ascii=True)
    assert len(line) < 16 * (ALPN_NAME_SHOWN * 4 + 20) + SNI_SHOWN * 4 + 200
    shown = [fields["sni"] or "", *fields["alpn"]]  # type: ignore[misc]
    assert all(first_hidden(text) is None for text in shown)
    assert len(fields["alpn"]) == min(len(alpn), ALPN_SHOWN)  # type: ignore[arg-type]
    summary = info.summary()
    assert len(summary.split(" ")) == 4 and first_hidden(summary) is None  # four tokens, one line
    assert fields.keys() == NO_TLS.keys()


@given(st.none() | st.binary(max_size=300), st.lists(names, max_size=20))
def test_the_script_gets_the_raw_values_bounded(sni: bytes | None, alpn: list[bytes]) -> None:
    records = hello_bytes(sni, alpn)
    info = TlsInfo.of(parsed(records), records)
    info = TlsInfo(info.ja4, info.ja3, info.sni, info.alpn, info.hello, "TLSv1.2", "ECDHE-RSA-AES128-SHA", "")
    table = wire.unpack_tls_info(info.to_wire())
    assert table["sni"] == (None if sni is None else sni[:SNI_SHOWN])
    assert table["alpn"] == alpn[:ALPN_SHOWN]
    assert table["alpn_selected"] is None and table["version"] == b"TLSv1.2"
    assert table["ja4"] == info.ja4.encode() and table["ja3"] == info.ja3.encode()


def test_the_recording_keeps_the_hello_itself() -> None:
    records = hello_bytes(b"www.example.com", [b"h2", b"http/1.1"])
    info = TlsInfo.of(parsed(records), records)
    fields = TlsInfo(
        info.ja4, info.ja3, info.sni, info.alpn, info.hello, "TLSv1.3", "TLS_AES_128_GCM_SHA256", "h2"
    ).recording_fields()
    assert base64.b64decode(str(fields["hello"])) == records
    assert fields["version"] == "TLSv1.3" and fields["alpn_selected"] == "h2"
    assert fields["sni"] == "www.example.com" and fields["alpn"] == ["h2", "http/1.1"]
    failed = info.recording_fields()  # no handshake: the hello and its fingerprints only
    assert "version" not in failed and failed["ja4"] == info.ja4


def test_a_hello_without_sni_or_alpn() -> None:
    records = hello_bytes(None, [])
    info = TlsInfo.of(parsed(records), records)
    assert info.event_fields()["sni"] is None and info.event_fields()["alpn"] == []
    assert info.summary().endswith("sni=- alpn=-")
    assert info.ja4.startswith("t12i0100")  # one cipher, no extension
