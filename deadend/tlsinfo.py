"""What the broker learned of one session's TLS: the client's fingerprints and what was negotiated.

Made once per `deadend.starttls()` from the ClientHello (deadend/clienthello.py) and, when the handshake
completed, the version, cipher and ALPN protocol OpenSSL agreed on. Three readers, three forms, all here:
the log events (`event_fields`: escaped and bounded, as every attacker-made text in a log line), the
script (`to_wire`: the raw bytes of `deadend.tls_info()`, packed as `deadend.wire` describes), and the
recording (`recording_fields`: the same as the events, plus the hello itself, so that anyone can compute
its fingerprints again). Pure: no I/O.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Final

from deadend.clienthello import ClientHello, ja3, ja4
from deadend.logs import sanitize
from deadend.wire import pack_tls_info

SNI_SHOWN: Final = 255  # bytes of the SNI kept: a DNS name has at most 253; the hello allows 64 KiB
ALPN_SHOWN: Final = 16  # ALPN offers kept: real clients send one to three; the hello allows 1,024
ALPN_NAME_SHOWN: Final = 64  # characters of each offer in a log line, escaped (a name may have 255 bytes)


@dataclass(frozen=True, slots=True)
class TlsInfo:
    """One session's TLS. `version` is empty while (or when) no handshake completed."""

    ja4: str
    ja3: str
    sni: bytes | None  # the client's first host_name, raw, cut at SNI_SHOWN bytes
    alpn: tuple[bytes, ...]  # the protocols it offered, in its order, the first ALPN_SHOWN
    hello: bytes  # the records that carried the ClientHello, as received
    version: str = ""  # "TLSv1.3", ...
    cipher: str = ""  # OpenSSL's name: "TLS_AES_256_GCM_SHA384"
    alpn_selected: str = ""  # the protocol the server selected; empty: none

    @classmethod
    def of(cls, hello: ClientHello, records: bytes) -> TlsInfo:
        sni = None if hello.server_name is None else hello.server_name[:SNI_SHOWN]
        return cls(ja4(hello), ja3(hello), sni, hello.alpn[:ALPN_SHOWN], records)

    def event_fields(self) -> dict[str, object]:
        """The `ja4`, `ja3`, `sni`, `alpn` fields every event of a TLS session carries (deadend/events.py)."""
        return {
            "ja4": self.ja4,
            "ja3": self.ja3,
            "sni": None if self.sni is None else sanitize(self.sni, SNI_SHOWN),
            "alpn": [sanitize(name, ALPN_NAME_SHOWN) for name in self.alpn],
        }

    def summary(self) -> str:
        """The fingerprints for a text log line: `ja4=... ja3=... sni=... alpn=h2,http/1.1`, each value one
        token (a space or a comma inside a value is escaped)."""

        def token(text: str) -> str:
            return text.replace(" ", "\\x20").replace(",", "\\x2c")

        sni = "-" if self.sni is None else token(sanitize(self.sni, SNI_SHOWN))
        alpn = ",".join(token(sanitize(name, ALPN_NAME_SHOWN)) for name in self.alpn) or "-"
        return f"ja4={self.ja4} ja3={self.ja3} sni={sni} alpn={alpn}"

    def to_wire(self) -> bytes:
        """The reply to `deadend.tls_info()` (only once the handshake completed)."""
        return pack_tls_info(
            self.version, self.cipher, self.ja4, self.ja3, self.alpn_selected, self.sni, self.alpn
        )

    def recording_fields(self) -> dict[str, object]:
        """A recording's `tls` line (docs/recording.md): the event fields, what was negotiated, and the
        hello in base64."""
        fields = self.event_fields()
        if self.version:
            fields.update(version=self.version, cipher=self.cipher, alpn_selected=self.alpn_selected or None)
        fields["hello"] = base64.b64encode(self.hello).decode("ascii")
        return fields


NO_TLS: Final[dict[str, object]] = {"ja4": None, "ja3": None, "sni": None, "alpn": None}  # a plain session
