"""TLS for a script's connection: the server side of one connection over memory BIOs, and each port's
certificate with the contexts made from it.

The client socket stays the broker's (broker/connection.py reads and writes it); OpenSSL only ever sees
bytes handed to it here, through `ssl.MemoryBIO`s: TlsLayer is bytes in, bytes out, no socket and no
clock, so it is tested against a client SSLObject without any network. No TLS code runs in the sandbox.

What a hostile client can make OpenSSL do is bounded by the context (deadend/tlscert.py): one handshake
per connection (renegotiation off), within --tls-handshake-timeout, after a ClientHello our own strict
parser (deadend/clienthello.py) accepted first.
"""

from __future__ import annotations

import collections
import contextlib
import socket
import ssl
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Final

from deadend.config import Config, TlsSource
from deadend.tlscert import Certificate, TlsCertError, generate_certificate, load_certificate, server_context

CONTEXTS_KEPT: Final = 8  # contexts per port, one per ALPN choice a script asked for (scripts use one)


class TlsLayer:
    """One server-side TLS connection over memory BIOs: `feed` it the client's bytes, send what `output`
    returns, in order. Every method but `output` and `feed` may raise ssl.SSLError (the connection is
    then broken: send `output` once more, for the alert, and give up)."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self.established = False

    def feed(self, data: bytes) -> None:
        """Bytes from the client."""
        self._incoming.write(data)

    def output(self) -> bytes:
        """Bytes for the client, in the order they are to go."""
        return self._outgoing.read()

    @property
    def unread(self) -> int:
        """Client bytes fed and not yet taken by OpenSSL."""
        return self._incoming.pending

    def handshake(self) -> bool:
        """One step of the handshake: True once it is complete, False while it needs more client bytes."""
        try:
            self._tls.do_handshake()
        except ssl.SSLWantReadError:
            return False
        self.established = True
        return True

    def read(self, n: int) -> bytes | None:
        """Up to `n` (> 0) bytes of plaintext: b"" while a record is incomplete, None once the client said
        it is done (close_notify)."""
        try:
            data = self._tls.read(n)
        except ssl.SSLWantReadError:
            return b""
        except ssl.SSLZeroReturnError:
            return None
        return data or None  # Python's ssl answers a close_notify with b"", not SSLZeroReturnError

    def write(self, data: bytes) -> None:
        """Plaintext for the client; its records are then in `output`. (Memory BIOs never refuse bytes, so
        a write never waits.)"""
        self._tls.write(data)

    def close_notify(self) -> None:
        """Say goodbye (close_notify, as a server closing the connection does); never waits for the reply."""
        # SSLWantReadError: sent, and the client's own close_notify is not awaited
        with contextlib.suppress(ssl.SSLError):
            self._tls.unwrap()

    @property
    def version(self) -> str:
        return self._tls.version() or ""

    @property
    def cipher(self) -> str:
        cipher = self._tls.cipher()
        return cipher[0] if cipher else ""

    @property
    def alpn_selected(self) -> str:
        return self._tls.selected_alpn_protocol() or ""


@dataclass(slots=True)
class TlsService:
    """A port's TLS: its certificate and the server contexts made from it, one per ALPN choice.

    A context is made the first time a script asks for its ALPN list (a few milliseconds: the chain is
    loaded again) and kept, at most CONTEXTS_KEPT of them, the least recently used dropped first; the
    one without ALPN is made at once, so that a certificate OpenSSL refuses fails the start-up, not a
    session (deadend.tlscert.TlsCertError). `on_starttls` is the rehearsal's: `deadend try --tls` starts
    its client's handshake when the script asks for TLS (the broker has none).
    """

    certificate: Certificate
    on_starttls: Callable[[], None] | None = None
    _contexts: collections.OrderedDict[bytes, ssl.SSLContext] = field(
        default_factory=collections.OrderedDict, repr=False
    )

    def __post_init__(self) -> None:
        if not self._contexts:
            self.context(b"")

    def context(self, alpn: bytes) -> ssl.SSLContext:
        """The context selecting from `alpn` (deadend.wire.check_alpn's form; b"": no ALPN)."""
        context = self._contexts.get(alpn)
        if context is None:
            protocols = [name.decode("ascii") for name in alpn.split(b",")] if alpn else []
            context = self._contexts[alpn] = server_context(self.certificate, protocols)
            while len(self._contexts) > CONTEXTS_KEPT:
                self._contexts.popitem(last=False)
        else:
            self._contexts.move_to_end(alpn)
        return context


class TlsCertificates:
    """Every port's TLS, made at start-up (before the broker drops its privileges, so that a key only root
    may read can be used): the operator's files, read and checked, or a certificate generated for the
    port's --tls-name. Ports with the same settings share one. Raises TlsCertError, one line, if a file
    is missing or unusable, or a name is not one a certificate can carry.
    """

    def __init__(self, config: Config, ports: Iterable[int]) -> None:
        self.config = config
        self.services: dict[TlsSource, TlsService] = {}
        # The global settings, and each port's own from the config file (a script may come with a reload).
        for source in {config.tls_for(port) for port in (0, *ports, *config.ports)}:
            self.services[source] = TlsService(_certificate(source))

    def service(self, port: int) -> TlsService:
        """The TLS of the script serving `port` (its script port, as the config file names it)."""
        return self.services[self.config.tls_for(port)]

    def shown(self) -> list[str]:
        """One line per certificate for the start-up log (names, key, expiry, origin: no secret)."""
        return [service.certificate.description for service in self.services.values()]


def _certificate(source: TlsSource) -> Certificate:
    if source.cert is not None or source.key is not None:
        if source.cert is None or source.key is None:
            given = "--tls-cert" if source.cert is not None else "--tls-key"
            raise TlsCertError(f"{given} needs --tls-cert and --tls-key both")
        return load_certificate(source.cert, source.key)
    if source.name is not None:
        return generate_certificate(source.name, source.key_type)
    name = socket.gethostname()
    try:
        return generate_certificate(name, source.key_type)
    except TlsCertError as e:
        raise TlsCertError(f"{e} (it is this host's name: give --tls-name)") from None
