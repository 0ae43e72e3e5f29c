"""broker.tls without a network: the broker's side of TLS (TlsLayer) against a client SSLObject, both over
memory BIOs, bytes handed across by the test; the contexts per ALPN choice; each port's certificate."""

from __future__ import annotations

import ssl
from pathlib import Path

import pytest

from broker.tls import CONTEXTS_KEPT, TlsCertificates, TlsLayer, TlsService
from deadend.cli import parse_args
from deadend.clienthello import Complete, ja4, read_client_hello
from deadend.config import Config
from deadend.tlscert import Certificate, TlsCertError, generate_certificate

NAME = "www.example.com"


@pytest.fixture(scope="module")
def certificate() -> Certificate:
    return generate_certificate(NAME, "ecdsa")


@pytest.fixture(scope="module")
def service(certificate: Certificate) -> TlsService:
    return TlsService(certificate)


class Client:
    """A Python ssl client over memory BIOs."""

    def __init__(
        self, alpn: list[str] | None = None, sni: str | None = NAME, **versions: ssl.TLSVersion
    ) -> None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        for name, version in versions.items():
            setattr(context, name, version)
        if versions:
            context.set_ciphers("DEFAULT:@SECLEVEL=0")
        if alpn:
            context.set_alpn_protocols(alpn)
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_side=False, server_hostname=sni)


def handshake(client: Client, server: TlsLayer) -> bytes:
    """Run the handshake to its end, handing bytes across; the bytes of the client's first flight."""
    first = b""
    for _ in range(10):
        try:
            client.tls.do_handshake()
            done = True
        except ssl.SSLWantReadError:
            done = False
        flight = client.outgoing.read()
        first = first or flight
        server.feed(flight)
        server_done = server.handshake()
        client.incoming.write(server.output())
        if done and server_done:
            return first
    raise AssertionError("the handshake did not complete")


def test_a_handshake_then_plaintext_both_ways(service: TlsService) -> None:
    client, server = Client(alpn=["h2", "http/1.1"]), TlsLayer(service.context(b"http/1.1"))
    first = handshake(client, server)
    assert server.established and server.version == "TLSv1.3" and server.alpn_selected == "http/1.1"
    assert server.cipher.startswith("TLS_")
    answer = read_client_hello(first)  # what the broker fingerprints is what OpenSSL then reads
    assert isinstance(answer, Complete) and ja4(answer.hello).startswith("t13d")
    client.tls.write(b"GET / HTTP/1.1\r\n\r\n")
    server.feed(client.outgoing.read())
    assert server.read(4) == b"GET "
    assert server.read(65536) == b"/ HTTP/1.1\r\n\r\n"
    assert server.read(65536) == b""  # nothing more yet: not the end
    server.write(b"HTTP/1.1 200 OK\r\n\r\n")
    client.incoming.write(server.output())
    assert client.tls.read(100) == b"HTTP/1.1 200 OK\r\n\r\n"
    assert server.unread == 0


def test_close_notify_both_ways(service: TlsService) -> None:
    client, server = Client(), TlsLayer(service.context(b""))
    handshake(client, server)
    assert server.alpn_selected == ""  # no ALPN configured: the offer is ignored, as by a server without it
    with pytest.raises(ssl.SSLWantReadError):
        client.tls.unwrap()  # sends its close_notify, then would wait for ours
    server.feed(client.outgoing.read())
    assert server.read(100) is None  # the client is done: the end of input
    server.close_notify()
    client.incoming.write(server.output())
    client.tls.unwrap()  # our close_notify arrived: the client's shutdown completes


def test_a_forged_record_after_the_handshake_is_an_error_with_an_alert(service: TlsService) -> None:
    client, server = Client(), TlsLayer(service.context(b""))
    handshake(client, server)
    server.feed(b"\x17\x03\x03\x00\x20" + bytes(32))  # application data that does not decrypt
    with pytest.raises(ssl.SSLError):
        server.read(100)
    # OpenSSL's session tickets (its first read writes them), then its alert (encrypted, in TLS 1.3): the
    # broker sends them, and the client learns why the connection ends
    client.incoming.write(server.output())
    with pytest.raises(ssl.SSLError, match="ALERT"):
        client.tls.read(100)


def test_a_client_hello_openssl_refuses_fails_the_handshake(service: TlsService) -> None:
    server = TlsLayer(service.context(b""))
    # A well-formed TLS 1.2 hello offering only a cipher nobody serves (NULL_WITH_NULL_NULL).
    body = b"\x03\x03" + bytes(32) + b"\x00" + b"\x00\x02\x00\x00" + b"\x01\x00"
    hello = b"\x01" + len(body).to_bytes(3, "big") + body
    server.feed(b"\x16\x03\x01" + len(hello).to_bytes(2, "big") + hello)
    with pytest.raises(ssl.SSLError):
        server.handshake()
    assert server.output()[:1] == b"\x15" and not server.established


@pytest.mark.skipif(not ssl.HAS_TLSv1_2, reason="this OpenSSL has no TLS 1.2")
def test_an_older_version_is_served(service: TlsService) -> None:
    v12 = ssl.TLSVersion.TLSv1_2
    client, server = Client(minimum_version=v12, maximum_version=v12), TlsLayer(service.context(b""))
    handshake(client, server)
    assert server.version == "TLSv1.2"


def test_alpn_choices_make_their_own_contexts_and_the_cache_is_bounded(service: TlsService) -> None:
    contexts = [service.context(f"p{i},http/1.1".encode()) for i in range(CONTEXTS_KEPT + 2)]
    assert len(set(map(id, contexts))) == CONTEXTS_KEPT + 2
    assert service.context(f"p{CONTEXTS_KEPT + 1},http/1.1".encode()) is contexts[-1]  # kept
    assert service.context(b"p0,http/1.1") is not contexts[0]  # the oldest was dropped: made again
    client, server = Client(alpn=["h2"]), TlsLayer(service.context(b"h2,http/1.1"))
    handshake(client, server)
    assert server.alpn_selected == "h2"


# --- each port's certificate ------------------------------------------------------------------------


def write_pair(tmp_path: Path, certificate: Certificate) -> tuple[Path, Path]:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(certificate.cert_pem)
    key.write_bytes(certificate.key_pem)
    return cert, key


def test_ports_share_a_certificate_unless_they_have_their_own(
    tmp_path: Path, certificate: Certificate
) -> None:
    cert, key = write_pair(tmp_path, certificate)
    config = Config.from_values(
        _values(tmp_path), {443: {"tls-cert": cert, "tls-key": key}, 993: {"tls-name": "imap.example.org"}}
    )
    tls = TlsCertificates(config, [25, 443, 993, 5222])
    assert tls.service(25) is tls.service(5222)
    assert tls.service(443).certificate.cert_pem == certificate.cert_pem
    assert "from " in tls.service(443).certificate.description
    assert "imap.example.org" in tls.service(993).certificate.description
    assert "deadend.example" in tls.service(25).certificate.description
    assert len(tls.shown()) == 3


def _values(tmp_path: Path) -> dict[str, object]:
    """The broker's option values for `--tls-name deadend.example`, as the command line makes them."""
    return vars(parse_args(["broker", "--scripts", str(tmp_path), "--tls-name", "deadend.example"]))


@pytest.mark.parametrize(
    ("ports", "message"),
    [
        ({443: {"tls-cert": Path("cert.pem")}}, "needs --tls-cert and --tls-key both"),
        ({443: {"tls-name": "not a name"}}, "neither a DNS name"),
        ({443: {"tls-cert": Path("missing.pem"), "tls-key": Path("key.pem")}}, "cannot read TLS certificate"),
    ],
)
def test_a_bad_certificate_setting_is_one_line(
    tmp_path: Path, ports: dict[int, dict[str, object]], message: str
) -> None:
    ports = {
        port: {k: tmp_path / v if isinstance(v, Path) else v for k, v in own.items()}
        for port, own in ports.items()
    }
    (tmp_path / "cert.pem").write_text("no certificate here\n")
    (tmp_path / "key.pem").write_text("no key here\n")
    config = Config.from_values(_values(tmp_path), ports)
    with pytest.raises(TlsCertError, match=message) as error:
        TlsCertificates(config, [443])
    assert "\n" not in str(error.value)


def test_this_hosts_name_when_it_cannot_be_a_certificates_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("socket.gethostname", lambda: "my_host")  # an underscore: no DNS name
    config = Config.from_values({**_values(tmp_path), "tls_name": None}, {})
    with pytest.raises(TlsCertError, match="this host's name: give --tls-name"):
        TlsCertificates(config, [443])
