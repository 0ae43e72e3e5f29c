"""The ClientHello parser and fingerprints (deadend.clienthello): pure unit tests, no sockets.

Hellos are built here by a small encoder of their own (never by the parser under test), checked against
the published reference captures in tests/data/tls_vectors.json, and fuzzed as the attacker data they are.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deadend.clienthello import (
    MAX_HELLO,
    MAX_ITEMS,
    MAX_RECORD,
    MAX_RECORDS,
    MAX_SPAN,
    ClientHello,
    ClientHelloError,
    Complete,
    Extension,
    NeedMore,
    is_grease,
    ja3,
    ja3_string,
    ja4,
    parse_client_hello,
    read_client_hello,
)

VECTORS: list[dict[str, Any]] = json.loads(
    (Path(__file__).resolve().parent.parent / "data" / "tls_vectors.json").read_text()
)["vectors"]
GREASE = [0x0A0A + 0x1010 * i for i in range(16)]

# --- an encoder of our own ------------------------------------------------------------------------


def u8(n: int) -> bytes:
    return bytes([n])


def u16(n: int) -> bytes:
    return struct.pack("!H", n)


def vec(width: int, data: bytes) -> bytes:
    return len(data).to_bytes(width, "big") + data


def u16s(values: Sequence[int]) -> bytes:
    return b"".join(u16(v) for v in values)


def ext_sni(*names: bytes, kind: int = 0) -> tuple[int, bytes]:
    return 0x0000, vec(2, b"".join(u8(kind) + vec(2, n) for n in names))


def ext_alpn(*protocols: bytes) -> tuple[int, bytes]:
    return 0x0010, vec(2, b"".join(vec(1, p) for p in protocols))


def ext_versions(*versions: int) -> tuple[int, bytes]:
    return 0x002B, vec(1, u16s(versions))


def ext_sigalgs(*algs: int) -> tuple[int, bytes]:
    return 0x000D, vec(2, u16s(algs))


def ext_groups(*groups: int) -> tuple[int, bytes]:
    return 0x000A, vec(2, u16s(groups))


def ext_formats(*formats: int) -> tuple[int, bytes]:
    return 0x000B, vec(1, bytes(formats))


@dataclass
class Spec:
    """What a test wants in a hello; `extensions=None` leaves the extensions block out altogether."""

    version: int = 0x0303
    random: bytes = bytes(range(32))
    session_id: bytes = b""
    ciphers: Sequence[int] = (0x1301, 0x1302, 0xC02F)
    compression: bytes = b"\x00"
    extensions: Sequence[tuple[int, bytes]] | None = field(default_factory=list)

    def body(self) -> bytes:
        out = u16(self.version) + self.random + vec(1, self.session_id)
        out += vec(2, u16s(self.ciphers)) + vec(1, self.compression)
        if self.extensions is not None:
            out += vec(2, b"".join(u16(t) + vec(2, d) for t, d in self.extensions))
        return out

    def wire(self, sizes: Sequence[int] = ()) -> bytes:
        return records(handshake(self.body()), sizes)


def handshake(body: bytes) -> bytes:
    return b"\x01" + len(body).to_bytes(3, "big") + body


def records(message: bytes, sizes: Sequence[int] = (), version: int = 0x0301) -> bytes:
    """`message` in TLS handshake records of the given sizes (the rest in records of at most 2^14)."""
    out, pos = b"", 0
    for n in [*sizes, *[MAX_RECORD] * (len(message) // MAX_RECORD + 1)]:
        if pos >= len(message):
            break
        chunk = message[pos : pos + n]
        out += b"\x16" + u16(version) + u16(len(chunk)) + chunk
        pos += len(chunk)
    return out


def parse(data: bytes) -> ClientHello:
    result = read_client_hello(data)
    assert isinstance(result, Complete) and result.length == len(data), result
    return result.hello


def outcome(data: bytes) -> NeedMore | Complete | str:
    try:
        return read_client_hello(data)
    except ClientHelloError as e:
        assert_safe(str(e))
        return "error"


def assert_safe(message: str) -> None:
    # Fixed words and numbers only: nothing a client sent can reach a log line through an error.
    assert len(message) <= 100 and re.fullmatch(r"[A-Za-z0-9 _.,()/:'-]+", message), message


CHROME = next(v for v in VECTORS if v["name"] == "chrome-tls13-grease-h2")
CHROME_WIRE = bytes.fromhex(CHROME["records"])


# --- the reference captures -----------------------------------------------------------------------


def unescape(text: str) -> bytes:
    return text.encode("latin-1").decode("unicode_escape").encode("latin-1")


@pytest.mark.parametrize("vector", VECTORS, ids=[v["name"] for v in VECTORS])
def test_reference_vector(vector: dict[str, Any]) -> None:
    hello = parse(bytes.fromhex(vector["records"]))
    name = vector["server_name"]
    assert hello.server_name == (name.encode() if name is not None else None)
    assert hello.alpn == tuple(unescape(p) for p in vector["alpn"])
    assert ja3_string(hello) == vector["ja3_string"]
    assert ja3(hello) == vector["ja3"]
    expected = vector.get("ja4_spec", vector)
    for key, kwargs in {
        "ja4": {},
        "ja4_r": {"raw": True},
        "ja4_o": {"original": True},
        "ja4_ro": {"raw": True, "original": True},
    }.items():
        if key in vector:
            assert ja4(hello, **kwargs) == expected[key], key


def test_the_published_alpn_disagreement_is_only_the_alpn_characters() -> None:
    # The JA4 implementations print "99" for a first ALPN protocol that is not ASCII; the specification
    # (and deadend) print the first and last hex digits of its bytes, 0xba 0xad -> "bd".
    (vector,) = [v for v in VECTORS if "ja4_spec" in v]
    for key, published in vector["ja4_spec"].items():
        assert vector[key].replace("t13d151699", "t13d1516bd") == published
    assert parse(bytes.fromhex(vector["records"])).alpn[0] == b"\xba\xad"


def test_vectors_cover_what_the_brief_asks_for() -> None:
    a_parts = {v["ja4"][:10] for v in VECTORS if "ja4" in v}
    assert any(p.startswith("t13d") for p in a_parts)  # TLS 1.3 browser (GREASE: chrome-*)
    assert any(p.startswith("t12") for p in a_parts)  # TLS 1.2 only
    assert any(p[3] == "i" for p in a_parts)  # no SNI
    assert any(p.endswith("h2") for p in a_parts) and any(p.endswith("00") for p in a_parts)
    grease = parse(CHROME_WIRE)
    assert any(map(is_grease, grease.cipher_suites)) and any(map(is_grease, grease.extension_types))


# --- the specifications' own examples -------------------------------------------------------------


def test_ja3_readme_examples() -> None:
    # salesforce/ja3 README: a string and its MD5, with and without extensions.
    full = Spec(
        version=769,
        ciphers=[47, 53, 5, 10, 49161, 49162, 49171, 49172, 50, 56, 19, 4],
        extensions=[ext_sni(b"x"), ext_groups(23, 24, 25), ext_formats(0)],
    )
    hello = parse(full.wire())
    assert ja3_string(hello) == "769,47-53-5-10-49161-49162-49171-49172-50-56-19-4,0-10-11,23-24-25,0"
    assert ja3(hello) == "ada70206e40642a3e4461f35503241d5"
    bare = parse(Spec(version=769, ciphers=[4, 5, 10, 9, 100, 98, 3, 6, 19, 18, 99], extensions=None).wire())
    assert ja3_string(bare) == "769,4-5-10-9-100-98-3-6-19-18-99,,,"
    assert ja3(bare) == "de350869b8c85de67a350c8d186f11e6"


def test_ja3_leaves_grease_out_and_keeps_order_and_duplicates() -> None:
    spec = Spec(
        ciphers=[0x0A0A, 2, 1],
        extensions=[
            (0x1A1A, b""),
            ext_groups(0x2A2A, 29, 23),
            ext_formats(0, 1),
            (0x0017, b""),
            (0x0017, b""),
        ],
    )
    assert ja3_string(parse(spec.wire())) == "771,2-1,10-11-23-23,29-23,0-1"


# The JA4 specification's ALPN examples (technical_details/JA4.md), and its edge cases.
ALPN_CASES = [
    (b"h2", "h2"),
    (b"http/1.1", "h1"),
    (b"\xab", "ab"),
    (b"\x20", "20"),
    (b"\xab\xcd", "ad"),
    (b"\x20\x61", "21"),
    (b"\x30\xab", "3b"),
    (b"\x61\x20", "60"),
    (b"\x30\x31\xab\xcd", "3d"),
    (b"\x30\xab\xcd\x31", "01"),
    (b"HTTP/1.1", "H1"),  # capitals are alphanumeric too
    (b"a", "aa"),  # "only a single character: it is both the first and the last"
    (b"", "00"),  # "the first ALPN value is empty"
    (b"\xc3\xa9", "c9"),  # UTF-8 is not ASCII
]


@pytest.mark.parametrize(("protocol", "chars"), ALPN_CASES)
def test_ja4_alpn_characters(protocol: bytes, chars: str) -> None:
    hello = parse(Spec(extensions=[ext_alpn(protocol, b"h2")]).wire())
    assert ja4(hello)[8:10] == chars


def test_ja4_alpn_absent_or_empty_list_is_00_and_grease_is_skipped() -> None:
    assert ja4(parse(Spec().wire()))[8:10] == "00"
    assert ja4(parse(Spec(extensions=[(0x0010, b"\x00\x00")]).wire()))[8:10] == "00"
    assert ja4(parse(Spec(extensions=[ext_alpn(b"\x3a\x3a", b"http/1.1")]).wire()))[8:10] == "h1"


def test_ja4_spec_example_from_its_lists() -> None:
    # JA4.md's worked example: these ciphers, extensions and signature algorithms give
    # t13d1516h2_8daaf6152771_e5627efa2ab1; here with GREASE added everywhere, which must change nothing.
    ciphers = [0x1301, 0x1302, 0x1303, 0xC02B, 0xC02F, 0xC02C, 0xC030, 0xCCA9, 0xCCA8, 0xC013, 0xC014]
    ciphers += [0x009C, 0x009D, 0x002F, 0x0035]
    types = [0x001B, 0x0000, 0x0033, 0x0010, 0x4469, 0x0017, 0x002D, 0x000D, 0x0005, 0x0023, 0x0012]
    types += [0x002B, 0xFF01, 0x000B, 0x000A, 0x0015]
    sigalgs = [0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601]
    data = {
        0x0000: ext_sni(b"a.example")[1],
        0x0010: ext_alpn(b"h2")[1],
        0x002B: ext_versions(0x7A7A, 0x0304)[1],
    }
    data |= {0x000D: ext_sigalgs(*sigalgs)[1], 0x000A: ext_groups(29)[1], 0x000B: ext_formats(0)[1]}
    exts = [(0xDADA, b""), *[(t, data.get(t, b"")) for t in types], (0x2A2A, b"\x00")]
    hello = parse(Spec(ciphers=[0xBABA, *ciphers], extensions=exts).wire())
    assert ja4(hello) == "t13d1516h2_8daaf6152771_e5627efa2ab1"
    assert ja4(hello, raw=True).endswith(
        "0005,000a,000b,000d,0012,0015,0017,001b,0023,002b,002d,0033,4469,ff01_"
        + "0403,0804,0401,0503,0805,0501,0806,0601"
    )
    assert ja4(hello, original=True) == "t13d1516h2_acb858a92679_18f69afefd3d"  # JA4.md's JA4_o


def test_ja4_version_rules() -> None:
    def version(spec: Spec) -> str:
        return ja4(parse(spec.wire()))[1:3]

    assert version(Spec(version=0x0303)) == "12"
    assert version(Spec(version=0x0301, extensions=None)) == "10"
    assert version(Spec(version=0x0300, extensions=None)) == "s3"
    assert version(Spec(version=0x0305)) == "00"
    assert (
        version(Spec(extensions=[ext_versions(0x0303, 0x0304, 0x0302)])) == "13"
    )  # the highest, not the first
    assert version(Spec(extensions=[ext_versions(0xFAFA, 0x0302)])) == "11"
    assert version(Spec(version=0x0302, extensions=[ext_versions(0x1A1A)])) == "11"  # GREASE alone: legacy
    assert version(Spec(extensions=[ext_versions(0x7F17, 0x0303)])) == "00"  # a draft is the highest, unknown
    assert version(Spec(version=0xFEFD)) == "d2"


def test_ja4_counts_stop_at_99_and_empty_lists_hash_to_zeros() -> None:
    many = Spec(ciphers=range(1, 150), extensions=[(0x100 + i, b"") for i in range(120)])
    assert ja4(parse(many.wire()))[:10] == "t12i999900"
    empty = parse(Spec(ciphers=[], extensions=None).wire())
    assert ja4(empty) == "t12i000000_000000000000_000000000000"
    only_sni_alpn = parse(Spec(extensions=[ext_sni(b"x"), ext_alpn(b"h2")]).wire())
    assert ja4(only_sni_alpn).endswith("_000000000000")
    assert ja4(only_sni_alpn, original=True).endswith(
        "_000000000000"
    )  # as the published JA4_o values have it
    no_sigalgs = parse(Spec(extensions=[(0x0017, b"")]).wire())
    assert ja4(no_sigalgs, raw=True).endswith("_0017")
    assert ja4(no_sigalgs).endswith("_" + hashlib.sha256(b"0017").hexdigest()[:12])


def test_ja4_sni_marker_needs_only_the_extension() -> None:
    assert ja4(parse(Spec(extensions=[(0x0000, u16(0))]).wire()))[3] == "d"  # an empty list of names
    hello = parse(Spec(extensions=[ext_sni(b"x", kind=7)]).wire())
    assert hello.server_name is None and ja4(hello)[3] == "d"


def test_is_grease_is_exactly_rfc_8701() -> None:
    assert [v for v in range(65536) if is_grease(v)] == GREASE


# --- parsing, field by field ----------------------------------------------------------------------


def test_fields_round_trip() -> None:
    spec = Spec(
        version=0x0303,
        session_id=b"\x07" * 32,
        ciphers=[0x0A0A, 0x1301, 0x00FF],
        compression=b"\x01\x00",
        extensions=[
            ext_sni(b"first.example", b"second.example"),
            ext_alpn(b"h2", b"http/1.1"),
            ext_versions(0x0304, 0x0303),
            ext_sigalgs(0x0403, 0x0804),
            ext_groups(0x001D, 0x0017),
            ext_formats(0),
            (0x9999, b"opaque"),
            ext_alpn(b"ignored"),  # a duplicate: the first of a type is the one read
        ],
    )
    hello = parse(spec.wire())
    assert hello == ClientHello(
        legacy_version=0x0303,
        random=bytes(range(32)),
        session_id=b"\x07" * 32,
        cipher_suites=(0x0A0A, 0x1301, 0x00FF),
        compression_methods=(1, 0),
        extensions=tuple(Extension(t, d) for t, d in spec.extensions or ()),
        server_name=b"first.example",
        alpn=(b"h2", b"http/1.1"),
        supported_versions=(0x0304, 0x0303),
        signature_algorithms=(0x0403, 0x0804),
        supported_groups=(0x001D, 0x0017),
        ec_point_formats=(0,),
    )
    assert hello.extension_types == (0, 0x10, 0x2B, 0x0D, 0x0A, 0x0B, 0x9999, 0x10)


def test_no_extensions_block_and_an_empty_one_read_alike() -> None:
    assert parse(Spec(extensions=None).wire()).extensions == ()
    assert parse(Spec(extensions=[]).wire()).extensions == ()


def test_sni_bytes_are_kept_raw_for_the_log_escaper() -> None:
    name = b"\x1b[31mevil\r\n\xff"
    assert parse(Spec(extensions=[ext_sni(name)]).wire()).server_name == name


def test_message_over_several_records_and_any_record_version() -> None:
    message = handshake(Spec(extensions=[ext_sni(b"split.example")]).body())
    for sizes in ([1] * 5, [1, 2, 3, 4], [len(message) - 1], [4]):
        assert parse(records(message, sizes)) == parse(records(message))
    assert parse(records(message, version=0x0300)) == parse(records(message, version=0x0303))


def test_trailing_bytes_after_the_records_are_not_ours() -> None:
    # A TLS 1.3 client may send its ChangeCipherSpec and early data right behind the hello.
    result = read_client_hello(CHROME_WIRE + b"\x14\x03\x03\x00\x01\x01" + b"\x17" * 40)
    assert isinstance(result, Complete) and result.length == len(CHROME_WIRE)


def test_largest_hello_we_accept() -> None:
    padding = MAX_HELLO - len(Spec(extensions=[(0x0015, b"")]).body())
    spec = Spec(extensions=[(0x0015, bytes(padding))])
    assert len(spec.body()) == MAX_HELLO
    wire = spec.wire()
    assert parse(wire).extensions[0].data == bytes(padding) and len(wire) <= MAX_SPAN
    with pytest.raises(ClientHelloError, match="over our limit"):
        read_client_hello(Spec(extensions=[(0x0015, bytes(padding + 1))]).wire()[:9])


def test_most_records_we_accept() -> None:
    message = handshake(Spec(extensions=[(0x0015, bytes(100))]).body())
    sizes = [1] * (MAX_RECORDS - 1) + [len(message)]
    assert parse(records(message, sizes)) == parse(records(message))
    wire = records(message, [1] * MAX_RECORDS + [len(message)])
    with pytest.raises(ClientHelloError, match=f"more than {MAX_RECORDS} records"):
        read_client_hello(wire)


# --- framing: incomplete, and refused at the first impossible byte --------------------------------


def test_every_prefix_waits_for_no_more_than_the_hello_needs() -> None:
    for vector in VECTORS:
        wire = bytes.fromhex(vector["records"])
        previous = 0
        for i in range(len(wire)):
            result = read_client_hello(wire[:i])
            assert isinstance(result, NeedMore) and i < result.at_least <= len(wire), (vector["name"], i)
            assert result.at_least >= previous
            previous = result.at_least


def test_honouring_at_least_takes_few_calls() -> None:
    message = handshake(Spec().body())
    wire = records(message, [3] * 20)
    calls, have = 0, 1
    while True:
        calls += 1
        result = read_client_hello(wire[:have])
        if isinstance(result, Complete):
            break
        have = result.at_least
    assert calls <= 2 * 21 + 1


def header(size: int, kind: int = 0x16, version: int = 0x0301) -> bytes:
    return u8(kind) + u16(version) + u16(size)


HELLO = handshake(Spec().body())


# Each is the shortest rejected prefix: one byte less is still a possible ClientHello.
EARLY = [
    b"G",  # "GET / HTTP/1.1": plaintext HTTP on a TLS port
    b"S",  # "SSH-2.0-..."
    b"\x80",  # an SSLv2-format hello (not supported)
    b"\x15",  # an alert
    b"\x17",  # application data
    b"\x16\x02",
    b"\x16\x03\x05",
    header(0),
    header(MAX_RECORD + 1),
    header(0xFFFF),
    header(10) + b"\x02",  # a ServerHello
    header(10) + b"\x00",
    header(10) + b"\x01\x01\x00\x01",  # a hello length over MAX_HELLO (65537)
    header(10) + b"\x01\xff\xff\xff",
    header(10) + b"\x01\x00\x00\x25",  # shorter than the fixed fields
    header(2) + b"\x01\x00" + b"\x15",  # the handshake header split, and the next record not a handshake
    header(100) + b"\x01\x00\x00\x30",  # the record is longer than the hello it carries
    header(10) + HELLO[:10] + header(len(HELLO) - 10 + 1),  # and so is a later one
]


@pytest.mark.parametrize("data", EARLY)
def test_rejected_at_the_first_impossible_byte(data: bytes) -> None:
    assert isinstance(read_client_hello(data[:-1]), NeedMore)
    with pytest.raises(ClientHelloError) as e:
        read_client_hello(data)
    assert_safe(str(e.value))


def test_what_the_errors_say() -> None:
    def error(data: bytes) -> str:
        with pytest.raises(ClientHelloError) as e:
            read_client_hello(data)
        return str(e.value)

    assert error(b"GET / HTTP/1.1\r\n") == "not a TLS handshake record (content type 0x47)"
    assert error(b"\x80\x2e\x01\x00\x02") == "not a TLS record (first byte 0x80: SSL 2.0 style, not read)"
    assert error(b"\x16\x03\x01\x00\x05\x02") == "handshake message type 2 is not a ClientHello (1)"
    assert (
        error(header(2) + b"\x01\x00" + b"\x17")
        == "a non-handshake record inside the hello (content type 0x17)"
    )


def test_empty_buffer_waits_for_a_record_header() -> None:
    assert read_client_hello(b"") == NeedMore(5)
    assert read_client_hello(b"\x16\x03") == NeedMore(5)
    assert read_client_hello(header(300)) == NeedMore(305)


# --- malformed bodies: a wrong length at every level ----------------------------------------------


def body_with(**changes: Any) -> bytes:
    return replace(Spec(extensions=[ext_sni(b"x"), ext_alpn(b"h2")]), **changes).body()


MALFORMED: dict[str, bytes] = {
    "session_id over 32": Spec(session_id=bytes(33)).body(),
    "session_id overruns": u16(0x0303) + bytes(32) + b"\xff" + bytes(10),
    "ciphers odd": u16(0x0303) + bytes(32) + b"\x00" + vec(2, b"\x13\x01\x13") + b"\x01\x00",
    "ciphers overrun": u16(0x0303) + bytes(32) + b"\x00" + u16(0x0400) + bytes(10),
    "compression overruns": u16(0x0303) + bytes(32) + b"\x00" + vec(2, b"\x13\x01") + b"\x09\x00",
    "extensions block short": Spec(extensions=[]).body()[:-2] + b"\x00",
    "extensions block overruns": Spec(extensions=[]).body()[:-2] + u16(8) + bytes(4),
    "extensions block underruns": Spec(extensions=[]).body()[:-2] + u16(2) + bytes(4),
    "extension header cut": Spec(extensions=[]).body()[:-2] + vec(2, b"\x00\x17\x00"),
    "extension overruns": Spec(extensions=[]).body()[:-2] + vec(2, b"\x00\x17\x00\x05xx"),
    "server_name list overruns": body_with(extensions=[(0, u16(9) + b"\x00" + vec(2, b"ab"))]),
    "server_name list underruns": body_with(extensions=[(0, u16(2) + b"\x00" + vec(2, b"ab"))]),
    "server_name entry overruns": body_with(extensions=[(0, vec(2, b"\x00" + u16(7) + b"ab"))]),
    "server_name empty": body_with(extensions=[(0, b"")]),
    "ALPN list overruns": body_with(extensions=[(0x10, u16(9) + vec(1, b"h2"))]),
    "ALPN protocol overruns": body_with(extensions=[(0x10, vec(2, b"\x05h2"))]),
    "supported_versions odd": body_with(extensions=[(0x2B, vec(1, b"\x03\x04\x03"))]),
    "supported_versions overruns": body_with(extensions=[(0x2B, b"\x08\x03\x04")]),
    "signature_algorithms odd": body_with(extensions=[(0x0D, vec(2, b"\x04\x03\x08"))]),
    "supported_groups leftover": body_with(extensions=[(0x0A, vec(2, b"\x00\x1d") + b"\x00")]),
    "ec_point_formats overruns": body_with(extensions=[(0x0B, b"\x05\x00")]),
    "bytes after the extensions": Spec().body() + b"\x00",
}


@pytest.mark.parametrize("body", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_body(body: bytes) -> None:
    with pytest.raises(ClientHelloError) as e:
        read_client_hello(records(handshake(body)))
    assert_safe(str(e.value))


def test_every_truncated_body_is_refused_or_the_same_hello_without_extensions() -> None:
    # Rewrapped with correct outer lengths, a body cut anywhere is an error, except cut exactly where
    # the extensions block begins: that is a valid hello without extensions.
    spec = Spec(session_id=b"s" * 8, extensions=[ext_sni(b"cut.example"), ext_alpn(b"h2"), ext_groups(29)])
    body = spec.body()
    plain = len(replace(spec, extensions=None).body())
    for cut in range(38, len(body)):
        if cut == plain:
            assert parse_client_hello(body[:cut]) == parse(replace(spec, extensions=None).wire())
            continue
        with pytest.raises(ClientHelloError):
            parse_client_hello(body[:cut])


# --- properties -----------------------------------------------------------------------------------

u16_values = st.integers(0, 0xFFFF)
greasy = st.one_of(u16_values, st.sampled_from(GREASE))


@st.composite
def extensions(draw: st.DrawFn) -> list[tuple[int, bytes]]:
    makers = [
        st.builds(
            lambda ns: ext_sni(*ns), st.lists(st.binary(min_size=1, max_size=40), min_size=1, max_size=3)
        ),
        st.builds(lambda ps: ext_alpn(*ps), st.lists(st.binary(max_size=12), max_size=4)),
        st.builds(lambda vs: ext_versions(*vs), st.lists(greasy, max_size=6)),
        st.builds(lambda vs: ext_sigalgs(*vs), st.lists(greasy, max_size=12)),
        st.builds(lambda vs: ext_groups(*vs), st.lists(greasy, max_size=8)),
        st.builds(lambda vs: ext_formats(*vs), st.lists(st.integers(0, 255), max_size=4)),
        st.tuples(
            greasy.filter(lambda t: t not in (0, 0x0A, 0x0B, 0x0D, 0x10, 0x2B)), st.binary(max_size=60)
        ),
    ]
    return draw(st.lists(st.one_of(makers), max_size=20))


specs = st.builds(
    Spec,
    version=st.sampled_from([0x0300, 0x0301, 0x0302, 0x0303, 0xFEFD, 0x7F17]) | u16_values,
    random=st.binary(min_size=32, max_size=32),
    session_id=st.binary(max_size=32),
    ciphers=st.lists(greasy, max_size=120),
    compression=st.binary(max_size=4),
    extensions=st.none() | extensions(),
)


def expected_hello(spec: Spec) -> ClientHello:
    """What the parser must make of `spec`, worked out from the spec, not from its bytes."""
    exts = list(spec.extensions or ())
    first: dict[int, bytes] = {}
    for t, d in exts:
        first.setdefault(t, d)

    def numbers(t: int, skip: int) -> tuple[int, ...]:
        data = first.get(t, b"")[skip:]
        return struct.unpack(f"!{len(data) // 2}H", data)

    sni = first.get(0)
    names, pos = [], 2
    while sni is not None and pos < len(sni):
        size = int.from_bytes(sni[pos + 1 : pos + 3], "big")
        names.append((sni[pos], sni[pos + 3 : pos + 3 + size]))
        pos += 3 + size
    protocols, raw = [], first.get(0x10, b"")[2:]
    while raw:
        protocols.append(raw[1 : 1 + raw[0]])
        raw = raw[1 + raw[0] :]
    return ClientHello(
        legacy_version=spec.version,
        random=spec.random,
        session_id=spec.session_id,
        cipher_suites=tuple(spec.ciphers),
        compression_methods=tuple(spec.compression),
        extensions=tuple(Extension(t, d) for t, d in exts),
        server_name=next((n for kind, n in names if kind == 0), None),
        alpn=tuple(protocols),
        supported_versions=numbers(0x2B, 1),
        signature_algorithms=numbers(0x0D, 2),
        supported_groups=numbers(0x0A, 2),
        ec_point_formats=tuple(first.get(0x0B, b"")[1:]),
    )


JA4_FORM = r"t(1[0-3]|s[23]|d[1-3]|00)[di]\d{4}[0-9A-Za-z]{2}_[0-9a-f]{12}_[0-9a-f]{12}"


@settings(max_examples=300, deadline=None)
@given(specs, st.lists(st.integers(1, 300), max_size=8), st.binary(max_size=30))
def test_any_valid_hello_round_trips(spec: Spec, sizes: list[int], suffix: bytes) -> None:
    wire = spec.wire(sizes)
    result = read_client_hello(wire + suffix)
    assert result == Complete(expected_hello(spec), len(wire))
    hello = result.hello
    assert re.fullmatch(JA4_FORM, ja4(hello))
    assert re.fullmatch(r"[0-9a-f]{32}", ja3(hello))


@settings(max_examples=200, deadline=None)
@given(specs, st.randoms(use_true_random=False))
def test_ja4_ignores_extension_order_and_grease_ja3_does_not(spec: Spec, rnd: random.Random) -> None:
    exts = list(spec.extensions or [])
    shuffled = rnd.sample(exts, len(exts))
    greased = [(0x3A3A, b""), *shuffled, (0x5A5A, b"\x00")]
    ciphers = [0xCACA, *spec.ciphers]
    base = parse(spec.wire())
    other = parse(replace(spec, extensions=greased, ciphers=ciphers).wire())
    # Shuffling may change which duplicate comes first, and so which one is read: JA4 must still agree
    # wherever the first of each type is the same.
    if all(dict(reversed(exts)).get(t) == dict(reversed(shuffled)).get(t) for t, _ in exts):
        assert ja4(base) == ja4(other)
    if shuffled != exts and [t for t, _ in shuffled if not is_grease(t)] != [
        t for t, _ in exts if not is_grease(t)
    ]:
        assert ja3_string(base) != ja3_string(other)


@settings(max_examples=200, deadline=None)
@given(specs, st.lists(st.integers(1, 200), max_size=6))
def test_every_prefix_of_a_valid_hello_needs_more(spec: Spec, sizes: list[int]) -> None:
    wire = spec.wire(sizes)
    for i in range(0, len(wire), max(1, len(wire) // 60)):
        result = read_client_hello(wire[:i])
        assert isinstance(result, NeedMore) and i < result.at_least <= len(wire)


starts = st.sampled_from(
    [b"", b"\x16", b"\x16\x03\x01", header(60), header(60) + b"\x01\x00\x00\x38\x03\x03"]
)


@st.composite
def mangled(draw: st.DrawFn) -> bytes:
    wire = bytearray(draw(specs).wire(draw(st.lists(st.integers(1, 100), max_size=3))))
    for _ in range(draw(st.integers(1, 3))):
        wire[draw(st.integers(0, len(wire) - 1))] = draw(st.integers(0, 255))
    return bytes(wire[: draw(st.integers(0, len(wire)))])


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(st.binary(max_size=300), st.builds(bytes.__add__, starts, st.binary(max_size=300)), mangled())
)
def test_any_bytes_give_need_more_a_hello_or_an_error(data: bytes) -> None:
    # The broker calls again as bytes arrive: once the parser has answered, more bytes change nothing,
    # and while it waits, it never asks for fewer bytes than before.
    outcomes = [outcome(data[:i]) for i in range(len(data) + 1)]
    answers = [o for o in outcomes if not isinstance(o, NeedMore)]
    assert answers == answers[:1] * len(answers)
    waits = [o.at_least for o in outcomes if isinstance(o, NeedMore)]
    assert waits == sorted(waits)
    if answers and isinstance(answers[0], Complete):  # it answers at its last byte, not later
        assert isinstance(outcomes[answers[0].length - 1], NeedMore)
        assert outcomes[answers[0].length] == answers[0]


# --- a corpus of hostile records, and time bounds -------------------------------------------------


def mutate(rnd: random.Random, wire: bytes) -> bytes:
    data = bytearray(wire)
    for _ in range(rnd.randint(1, 4)):
        if not data:
            break
        kind = rnd.random()
        at = rnd.randrange(len(data))
        if kind < 0.5:
            data[at] = rnd.randrange(256)
        elif kind < 0.7:  # a length field at a random place set to an extreme
            data[at : at + 2] = rnd.choice([b"\x00\x00", b"\xff\xff", b"\x40\x00", b"\x00\x01"])
        elif kind < 0.8:
            del data[at : at + rnd.randint(1, 8)]
        elif kind < 0.9:
            data[at:at] = rnd.randbytes(rnd.randint(1, 8))
        else:
            data = data[:at]
    return bytes(data)


def test_every_length_field_of_a_browser_hello_set_to_extremes() -> None:
    # Whatever field a 1- or 2-byte window falls on (the record, handshake, list and extension lengths
    # among them), an extreme value there gives an answer, never an exception or a read past the end.
    seen = set()
    for at in range(len(CHROME_WIRE)):
        for window in (b"\x00", b"\xff", b"\x00\x00", b"\xff\xff", b"\x00\x01", b"\x40\x01"):
            data = CHROME_WIRE[:at] + window + CHROME_WIRE[at + len(window) :]
            result = outcome(data)
            seen.add(type(result).__name__)
            if isinstance(result, Complete):
                assert result.length <= len(data)
    assert seen == {"NeedMore", "Complete", "str"}


def test_fuzzed_corpus_in_bounded_time() -> None:
    rnd = random.Random(4)
    seeds = [bytes.fromhex(v["records"]) for v in VECTORS] + [
        records(handshake(bytes.fromhex(v["records"])[9:]), [rnd.randint(1, 200) for _ in range(4)])
        for v in VECTORS
    ]
    counts = {"need-more": 0, "hello": 0, "error": 0}
    worst = 0.0
    for _ in range(10_000):
        data = mutate(rnd, rnd.choice(seeds))
        start = time.perf_counter()
        result = outcome(data)
        if isinstance(result, Complete):
            ja4(result.hello), ja3(result.hello)
        worst = max(worst, time.perf_counter() - start)
        counts[
            "error" if isinstance(result, str) else "hello" if isinstance(result, Complete) else "need-more"
        ] += 1
    print(f"fuzzed corpus: {counts}, worst {worst * 1e3:.2f} ms")
    assert min(counts.values()) > 100  # the mutations reach every outcome
    assert worst < 0.05


LISTS = {
    "extensions": lambda n: Spec(extensions=[(0x4000 + i, b"") for i in range(n)]),
    "cipher_suites": lambda n: Spec(ciphers=range(n)),
    "signature_algorithms": lambda n: Spec(extensions=[ext_sigalgs(*range(n))]),
    "supported_groups": lambda n: Spec(extensions=[ext_groups(*range(n))]),
    "ALPN": lambda n: Spec(extensions=[ext_alpn(*[b"x"] * n)]),
    "server_name": lambda n: Spec(extensions=[ext_sni(*[b"n"] * n)]),
}


@pytest.mark.parametrize("build", LISTS.values(), ids=LISTS.keys())
def test_every_list_holds_at_most_max_items(build: Any) -> None:
    parse(build(MAX_ITEMS).wire())
    with pytest.raises(ClientHelloError, match=f"more than {MAX_ITEMS}") as e:
        read_client_hello(build(MAX_ITEMS + 1).wire())
    assert_safe(str(e.value))


def test_the_costliest_hello_within_the_bounds_is_cheap() -> None:
    # Every list at MAX_ITEMS and the rest padding, in 5 records: what an attacker can make us do per
    # connection. About 3 ms here (bench/clienthello.py); a quadratic step anywhere would show.
    n = MAX_ITEMS
    spec = Spec(
        ciphers=range(n),
        extensions=[
            ext_sni(*[b""] * n),
            ext_alpn(*[b"a"] * n),
            ext_sigalgs(*range(n)),
            ext_groups(*range(n)),
            ext_versions(*range(127)),
            ext_formats(*range(255)),
            *[(0x4000 + i, b"") for i in range(n - 7)],
        ],
    )
    spec.extensions = [*(spec.extensions or ()), (0x0015, bytes(MAX_HELLO - len(spec.body()) - 4))]
    wire = spec.wire()
    assert len(spec.body()) == MAX_HELLO
    start = time.perf_counter()
    hello = parse(wire)
    ja4(hello), ja3(hello)
    assert len(hello.extensions) == n
    assert time.perf_counter() - start < 0.25


def test_a_caller_that_calls_after_every_byte_costs_little() -> None:
    tiny = records(handshake(Spec(extensions=[(0x0015, bytes(200))]).body()), [1] * (MAX_RECORDS - 1) + [300])
    start = time.perf_counter()
    for i in range(len(tiny) + 1):
        outcome(tiny[:i])
    assert time.perf_counter() - start < 1.0
