"""The TLS ClientHello a client opens with, and its JA4 and JA3 fingerprints: a pure parser, no I/O.

Before the broker hands a connection to its TLS handshake it reads the client's first bytes into a buffer
and calls `read_client_hello` after every read, as it does for a PROXY header (deadend/proxy.py). The answer
is `NeedMore(at_least)`: no ClientHello can be complete before the buffer holds that many bytes (calling
sooner is allowed, and can only find an error sooner); `Complete(hello, length)`: the ClientHello, carried
by the first `length` bytes, which the caller then hands on, all of them, to the handshake; or a raised
`ClientHelloError` as soon as the bytes cannot be the start of one, so that a plaintext request on a TLS
port is turned away at its first byte. Error texts carry numbers and fixed words, never the client's bytes.

    record     type 22 (handshake), version 3.x, 2-byte length (1..2^14), then that many bytes
    handshake  type 1 (client_hello), 3-byte length, the body; it may span several records
    body       legacy_version(2) random(32) session_id<0..32> cipher_suites<2-byte length>
               compression_methods<1-byte length> [extensions<2-byte length>: type(2) data<2-byte length>]

The parser is strict about structure (every length must fit its container exactly, record by record and
field by field) and lenient about semantics that a fingerprint wants to see rather than refuse: empty
lists, duplicate extensions, unknown versions and extension types are kept as sent, and the handshake
itself (OpenSSL) is where they get refused. Its bounds (MAX_HELLO, MAX_RECORDS, MAX_ITEMS) keep the
costliest hello it accepts at a few milliseconds. The SSL 2.0-compatible hello of some very old clients
and scanners is refused, not read.

JA4 follows FoxIO's specification ("JA4: TLS Client Fingerprinting", technical_details/JA4.md of
github.com/FoxIO-LLC/ja4, BSD 3-Clause) and JA3 Salesforce's (github.com/salesforce/ja3), both
summarised where they are computed below.
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field
from typing import Final, NamedTuple

MAX_HELLO: Final = 65536  # the largest ClientHello body we accept (its length field allows 16 MiB)
# A 64 KiB hello needs 5 full records; real clients send one, and tools that split the hello to dodge
# middleboxes a handful. The cap bounds the work of one call, which walks every record received so far.
MAX_RECORDS: Final = 64
MAX_RECORD: Final = 16384  # RFC 8446 5.1: a plaintext record carries at most 2^14 bytes
MAX_SPAN: Final = MAX_RECORDS * 5 + 4 + MAX_HELLO  # the most bytes a ClientHello can take from the buffer
# The most items in any one list (ciphers, extensions, ALPN protocols, ...). Real clients send a few
# dozen, scanners that try every cipher a few hundred; beyond this a hello is asking for CPU, not
# offering a fingerprint: the cap keeps the costliest hello under 100 times a browser's, not 1,000.
MAX_ITEMS: Final = 1024

_EXTENSION_HEADER: Final = struct.Struct("!HH")
_HANDSHAKE: Final = 22
_CLIENT_HELLO: Final = 1
_MIN_BODY: Final = 2 + 32 + 1 + 2 + 1  # version, random and three empty lists

EXT_SERVER_NAME: Final = 0x0000
EXT_SUPPORTED_GROUPS: Final = 0x000A
EXT_EC_POINT_FORMATS: Final = 0x000B
EXT_SIGNATURE_ALGORITHMS: Final = 0x000D
EXT_ALPN: Final = 0x0010
EXT_SUPPORTED_VERSIONS: Final = 0x002B
_READ: Final = frozenset(
    {
        EXT_SERVER_NAME,
        EXT_SUPPORTED_GROUPS,
        EXT_EC_POINT_FORMATS,
        EXT_SIGNATURE_ALGORITHMS,
        EXT_ALPN,
        EXT_SUPPORTED_VERSIONS,
    }
)  # the extensions whose contents ClientHello has fields for


class ClientHelloError(ValueError):
    """The bytes are not a TLS ClientHello; the message is one short sentence safe to log."""


class Extension(NamedTuple):
    # A NamedTuple, not a dataclass like the rest: a hello may carry MAX_ITEMS of them, and a frozen
    # dataclass takes nearly twice as long to build.
    type: int
    data: bytes


@dataclass(frozen=True, slots=True)
class ClientHello:
    """A ClientHello as sent: every list in the client's order, GREASE values and duplicates included.

    The fields after `extensions` are read from the first extension of their type (RFC 8446 forbids
    duplicates, so a client that sends two has told us enough); absent, they are None or empty."""

    legacy_version: int
    random: bytes
    session_id: bytes
    cipher_suites: tuple[int, ...]
    compression_methods: tuple[int, ...]
    extensions: tuple[Extension, ...]
    server_name: bytes | None = None  # the first host_name of server_name; raw bytes, for logs.sanitize
    alpn: tuple[bytes, ...] = ()
    supported_versions: tuple[int, ...] = ()
    signature_algorithms: tuple[int, ...] = ()
    supported_groups: tuple[int, ...] = ()
    ec_point_formats: tuple[int, ...] = ()
    extension_types: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "extension_types", tuple(e.type for e in self.extensions))


@dataclass(frozen=True, slots=True)
class NeedMore:
    at_least: int  # call again once the buffer holds at least this many bytes


@dataclass(frozen=True, slots=True)
class Complete:
    hello: ClientHello
    length: int  # how many bytes of the buffer the records carrying it took


# --- framing --------------------------------------------------------------------------------------


def read_client_hello(data: bytes) -> NeedMore | Complete:
    """The ClientHello at the start of `data`, or how many bytes it needs at least. Raises ClientHelloError
    as soon as `data` cannot be the start of one. Until the hello is complete a call costs one step per
    record (at most MAX_RECORDS), whatever the size of `data`, which it never reads past MAX_SPAN."""
    pos = 0
    records = 0
    head = b""  # the handshake header (type and length) as far as it has arrived
    message_end = 0  # the length of the whole handshake message, once its header is known
    spans: list[tuple[int, int]] = []  # where each record's fragment of the message lies in `data`
    received = 0  # handshake bytes in the complete records so far
    while True:
        if len(data) < pos + 5:
            _check_record_header(data[pos:], records)
            return NeedMore(pos + 5)
        size = _check_record_header(data[pos : pos + 5], records)
        records += 1
        if records > MAX_RECORDS:
            raise ClientHelloError(f"ClientHello spans more than {MAX_RECORDS} records")
        start, end = pos + 5, pos + 5 + size
        if len(head) < 4 and len(data) > start:
            head += data[start : start + min(size, 4 - len(head))]
            message_end = _check_handshake_header(head)
        if message_end and received + size > message_end:
            extra = received + size - message_end
            raise ClientHelloError(f"a handshake record carries {extra} bytes past the ClientHello")
        if len(data) < end:
            return NeedMore(end)
        spans.append((start, end))
        received += size
        pos = end
        if received == message_end:
            message = b"".join(data[a:b] for a, b in spans)
            return Complete(parse_client_hello(message[4:]), pos)


def _check_record_header(header: bytes, records: int) -> int:
    """The record's length once all five bytes are there (0 before); raises at the first wrong byte."""
    if header[:1] and header[0] != _HANDSHAKE:
        if records:
            raise ClientHelloError(
                f"a non-handshake record inside the hello (content type 0x{header[0]:02x})"
            )
        if header[0] & 0x80:  # SSL 2.0's 2-byte record header, which TLS 1.0 clients could still send
            raise ClientHelloError(
                f"not a TLS record (first byte 0x{header[0]:02x}: SSL 2.0 style, not read)"
            )
        raise ClientHelloError(f"not a TLS handshake record (content type 0x{header[0]:02x})")
    if header[1:2] and header[1] != 3:
        raise ClientHelloError(f"TLS record major version {header[1]} is not 3")
    if header[2:3] and header[2] > 4:
        raise ClientHelloError(f"TLS record version 3.{header[2]} is unknown")
    if len(header) < 5:
        return 0
    size = int.from_bytes(header[3:5], "big")
    if not 0 < size <= MAX_RECORD:
        raise ClientHelloError(f"TLS handshake record length {size} is not in 1..{MAX_RECORD}")
    return size


def _check_handshake_header(head: bytes) -> int:
    """4 + the body's length once the header is complete (0 before); raises at the first wrong byte."""
    if head[0] != _CLIENT_HELLO:
        raise ClientHelloError(f"handshake message type {head[0]} is not a ClientHello (1)")
    if len(head) < 4:
        return 0
    length = int.from_bytes(head[1:4], "big")
    if length > MAX_HELLO:
        raise ClientHelloError(f"ClientHello length {length} is over our limit of {MAX_HELLO}")
    if length < _MIN_BODY:
        raise ClientHelloError(f"ClientHello length {length} is shorter than its fixed fields ({_MIN_BODY})")
    return 4 + length


# --- the body -------------------------------------------------------------------------------------


class _Cursor:
    """Reads `data[pos:end]` front to back; every read is checked against `end`."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes, pos: int, end: int) -> None:
        self.data, self.pos, self.end = data, pos, end

    def take(self, n: int, what: str) -> bytes:
        if n > self.end - self.pos:
            raise ClientHelloError(f"{what} needs {n} bytes, {self.end - self.pos} left")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def number(self, width: int, what: str) -> int:
        return int.from_bytes(self.take(width, what), "big")

    def vector(self, width: int, what: str) -> _Cursor:
        """The opaque vector with a `width`-byte length that starts here."""
        pos, end = self.pos, self.end
        if width > end - pos:
            raise ClientHelloError(f"{what} length needs {width} bytes, {end - pos} left")
        n = int.from_bytes(self.data[pos : pos + width], "big")
        pos += width
        if n > end - pos:
            raise ClientHelloError(f"{what} length {n} overruns its container ({end - pos} bytes left)")
        self.pos = pos + n
        return _Cursor(self.data, pos, pos + n)

    def rest(self) -> int:
        return self.end - self.pos

    def finish(self, what: str) -> None:
        if self.pos != self.end:
            raise ClientHelloError(f"{what} has {self.end - self.pos} bytes left over")

    def u16s(self, what: str) -> tuple[int, ...]:
        n = self.rest()
        if n % 2:
            raise ClientHelloError(f"{what} length {n} is odd")
        if n > 2 * MAX_ITEMS:
            raise ClientHelloError(f"{what} holds more than {MAX_ITEMS} items")
        values = struct.unpack_from(f"!{n // 2}H", self.data, self.pos)
        self.pos = self.end
        return values

    def remaining(self) -> bytes:
        self.pos, start = self.end, self.pos
        return self.data[start : self.end]


def parse_client_hello(body: bytes) -> ClientHello:
    """A ClientHello from its handshake body (after the 4-byte type and length); raises ClientHelloError."""
    c = _Cursor(body, 0, len(body))
    version = c.number(2, "legacy_version")
    random = c.take(32, "random")
    session_id = c.vector(1, "session_id").remaining()
    if len(session_id) > 32:
        raise ClientHelloError(f"session_id length {len(session_id)} is over 32")
    ciphers = c.vector(2, "cipher_suites").u16s("cipher_suites")
    compression = tuple(c.vector(1, "compression_methods").remaining())
    extensions: list[Extension] = []
    first: dict[int, _Cursor] = {}  # the first extension of each type this module reads
    if c.rest():  # an SSL 3.0 / TLS 1.0 hello may end here, with no extensions block at all
        block = c.vector(2, "extensions")
        c.finish("ClientHello")
        # Inline rather than through the cursor: this loop runs once per extension.
        pos, end = block.pos, block.end
        while pos < end:
            if end - pos < 4:
                raise ClientHelloError(f"an extension header needs 4 bytes, {end - pos} left")
            kind, size = _EXTENSION_HEADER.unpack_from(body, pos)
            pos += 4
            if size > end - pos:
                raise ClientHelloError(f"extension 0x{kind:04x} length {size} overruns its container")
            extensions.append(Extension(kind, body[pos : pos + size]))
            if len(extensions) > MAX_ITEMS:
                raise ClientHelloError(f"ClientHello holds more than {MAX_ITEMS} extensions")
            if kind in _READ and kind not in first:
                first[kind] = _Cursor(body, pos, pos + size)
            pos += size
    return ClientHello(
        legacy_version=version,
        random=random,
        session_id=session_id,
        cipher_suites=ciphers,
        compression_methods=compression,
        extensions=tuple(extensions),
        server_name=_server_name(first[EXT_SERVER_NAME]) if EXT_SERVER_NAME in first else None,
        alpn=_alpn(first[EXT_ALPN]) if EXT_ALPN in first else (),
        supported_versions=_list(first.get(EXT_SUPPORTED_VERSIONS), 1, "supported_versions"),
        signature_algorithms=_list(first.get(EXT_SIGNATURE_ALGORITHMS), 2, "signature_algorithms"),
        supported_groups=_list(first.get(EXT_SUPPORTED_GROUPS), 2, "supported_groups"),
        ec_point_formats=_list(first.get(EXT_EC_POINT_FORMATS), 1, "ec_point_formats", item=1),
    )


def _server_name(c: _Cursor) -> bytes | None:
    # RFC 6066 3: a list of (name_type, opaque name<2-byte length>); host_name is type 0.
    names = c.vector(2, "server_name list")
    c.finish("server_name")
    found, count = None, 0
    while names.rest():
        count += 1
        if count > MAX_ITEMS:
            raise ClientHelloError(f"server_name holds more than {MAX_ITEMS} names")
        kind = names.number(1, "server_name type")
        name = names.vector(2, "server_name entry").remaining()
        if kind == 0 and found is None:
            found = name
    return found


def _alpn(c: _Cursor) -> tuple[bytes, ...]:
    # RFC 7301 3.1: a list of protocol names, each with a 1-byte length.
    names = c.vector(2, "ALPN list")
    c.finish("ALPN")
    protocols = []
    while names.rest():
        protocols.append(names.vector(1, "ALPN protocol").remaining())
        if len(protocols) > MAX_ITEMS:
            raise ClientHelloError(f"ALPN holds more than {MAX_ITEMS} protocols")
    return tuple(protocols)


def _list(c: _Cursor | None, width: int, what: str, item: int = 2) -> tuple[int, ...]:
    """A list of `item`-byte numbers behind a `width`-byte length that fills the extension exactly."""
    if c is None:
        return ()
    values = c.vector(width, what)
    c.finish(what)
    return values.u16s(what) if item == 2 else tuple(values.remaining())


# --- fingerprints ---------------------------------------------------------------------------------


GREASE: Final = frozenset(0x0A0A + 0x1010 * i for i in range(16))  # RFC 8701: 0x0a0a, 0x1a1a, ... 0xfafa


def is_grease(value: int) -> bool:
    """Whether `value` is one of RFC 8701's reserved values, which JA4 and JA3 both leave out."""
    return value in GREASE


_JA4_VERSIONS: Final = {
    0x0304: "13",
    0x0303: "12",
    0x0302: "11",
    0x0301: "10",
    0x0300: "s3",
    0x0002: "s2",
    0xFEFF: "d1",
    0xFEFD: "d2",
    0xFEFC: "d3",
}


def ja4(hello: ClientHello, *, raw: bool = False, original: bool = False) -> str:
    """JA4 over TCP, `t13d1516h2_8daaf6152771_e5627efa2ab1`; `raw` gives the lists instead of their hashes
    (JA4_r), `original` keeps the client's order and SNI and ALPN among the extensions (JA4_o).

    a: "t", the version (the highest of supported_versions, else legacy_version), "d" with a
       server_name extension or "i" without, the counts of ciphers and of extensions (at most 99),
       the first and last characters of the first ALPN protocol ("00" without one)
    b: sha256 of the ciphers as 4-digit hex, sorted, comma-joined; first 12 hex digits
    c: the same of the extensions without SNI (0000) and ALPN (0010), sorted, then "_" and the
       signature algorithms in their order (no "_" when there are none)
    GREASE values are left out everywhere; an empty list hashes to "000000000000"."""
    ciphers = [f"{c:04x}" for c in hello.cipher_suites if c not in GREASE]
    types = [t for t in hello.extension_types if t not in GREASE]
    versions = [v for v in hello.supported_versions if v not in GREASE]
    # A supported_versions holding only GREASE names no version: fall back as if it were absent (decided).
    version = _JA4_VERSIONS.get(max(versions) if versions else hello.legacy_version, "00")
    sni = "d" if EXT_SERVER_NAME in types else "i"
    protocols = [p for p in hello.alpn if len(p) != 2 or int.from_bytes(p, "big") not in GREASE]
    a = f"t{version}{sni}{min(len(ciphers), 99):02d}{min(len(types), 99):02d}{_ja4_alpn(protocols)}"
    others = sorted(t for t in types if t not in (EXT_SERVER_NAME, EXT_ALPN))
    if not original:
        ciphers.sort()
        types = others
    b = ",".join(ciphers)
    c = ",".join(f"{t:04x}" for t in types)
    signatures = ",".join(f"{s:04x}" for s in hello.signature_algorithms if s not in GREASE)
    if signatures:
        c += "_" + signatures
    if raw:
        return f"{a}_{b}_{c}"
    # "No extensions in the sorted list" (SNI and ALPN do not count) gives zeros in JA4_o too, as the
    # reference implementation's published JA4_o values have it.
    return f"{a}_{_hash12(b)}_{_hash12(c) if others else _hash12('')}"


def _ja4_alpn(protocols: list[bytes]) -> str:
    # The spec: first and last byte of the first protocol if both are ASCII letters or digits (one byte
    # counts as both), else the first and last digit of the protocol's hex; "00" for none or an empty one.
    if not protocols or not protocols[0]:
        return "00"
    first, last = protocols[0][:1], protocols[0][-1:]
    if first.isalnum() and last.isalnum() and first.isascii() and last.isascii():
        return (first + last).decode("ascii")
    digits = protocols[0].hex()
    return digits[0] + digits[-1]


def _hash12(text: str) -> str:
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:12] if text else "000000000000"


def ja3_string(hello: ClientHello) -> str:
    """Salesforce's JA3 string: legacy_version, ciphers, extension types, supported groups and EC point
    formats as decimal numbers, "-" within a field and "," between them, GREASE left out, each list in
    the client's order: `771,4865-4866-4867-49195,0-23-65281-10-11,29-23-24,0`."""
    fields = (
        [hello.legacy_version],
        [c for c in hello.cipher_suites if c not in GREASE],
        [t for t in hello.extension_types if t not in GREASE],
        [g for g in hello.supported_groups if g not in GREASE],
        list(hello.ec_point_formats),
    )
    return ",".join("-".join(map(str, values)) for values in fields)


def ja3(hello: ClientHello) -> str:
    """JA3: the MD5 of `ja3_string`, as 32 hex digits."""
    return hashlib.md5(ja3_string(hello).encode("ascii"), usedforsecurity=False).hexdigest()
