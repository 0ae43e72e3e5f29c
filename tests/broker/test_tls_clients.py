"""Real TLS clients over loopback against the two TLS building blocks, in the order the broker will use them.

A small server here does what the broker is to do: read the client's raw bytes into a buffer until
`read_client_hello` has the whole ClientHello (honouring `at_least`), fingerprint it, then run the server
side of the handshake with `ssl.SSLObject` over memory BIOs, fed the very same buffer, with a context
from `deadend.tlscert`. The clients are the ones on this machine: `openssl s_client`, `curl`, Python's ssl.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from deadend.clienthello import ClientHello, Complete, ja3, ja4, read_client_hello
from deadend.tlscert import Certificate, generate_certificate, server_context

NAME = "www.deadend.example"
HOST = "127.0.0.1"
TIMEOUT = 10.0
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\nConnection: close\r\n\r\nhello\n"


@dataclass
class Seen:
    hello: ClientHello | None = None
    calls: int = 0  # read_client_hello calls it took
    version: str | None = None
    alpn: str | None = None
    error: str | None = None


class Server:
    """Serves one connection at a time in a thread, as described above, and records what it saw."""

    def __init__(self, context: ssl.SSLContext) -> None:
        self.context = context
        self.listener = socket.create_server((HOST, 0))
        self.listener.settimeout(TIMEOUT)
        self.port = self.listener.getsockname()[1]
        self.seen: list[Seen] = []
        self._thread: threading.Thread | None = None

    def expect(self) -> None:
        self._thread = threading.Thread(target=self._serve_one, daemon=True)
        self._thread.start()

    def result(self) -> Seen:
        assert self._thread is not None
        self._thread.join(TIMEOUT + 5)
        assert not self._thread.is_alive(), "the server thread is stuck"
        return self.seen[-1]

    def _serve_one(self) -> None:
        seen = Seen()
        self.seen.append(seen)
        try:
            conn, _ = self.listener.accept()
        except OSError as e:
            seen.error = f"accept: {e}"
            return
        with conn:
            conn.settimeout(TIMEOUT)
            try:
                self._session(conn, seen)
            except (OSError, ssl.SSLError, AssertionError) as e:
                seen.error = f"{type(e).__name__}: {e}"

    def _session(self, conn: socket.socket, seen: Seen) -> None:
        buffer = b""
        while True:
            seen.calls += 1
            answer = read_client_hello(buffer)
            if isinstance(answer, Complete):
                seen.hello = answer.hello
                break
            while len(buffer) < answer.at_least:
                chunk = conn.recv(65536)
                assert chunk, "the client left before its ClientHello was complete"
                buffer += chunk
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        tls = self.context.wrap_bio(incoming, outgoing, server_side=True)
        incoming.write(buffer)  # the broker only looked: the handshake gets every byte
        self._pump(conn, tls, incoming, outgoing, tls.do_handshake)
        seen.version, seen.alpn = tls.version(), tls.selected_alpn_protocol()
        tls.write(RESPONSE)
        conn.sendall(outgoing.read())
        try:  # read whatever the client says until it leaves, so that we never close first on unread data
            while self._pump(conn, tls, incoming, outgoing, lambda: tls.read(65536)):
                pass
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            pass

    @staticmethod
    def _pump(
        conn: socket.socket,
        tls: ssl.SSLObject,
        incoming: ssl.MemoryBIO,
        outgoing: ssl.MemoryBIO,
        step: object,
    ) -> object:
        assert callable(step)
        while True:
            try:
                result = step()
                conn.sendall(outgoing.read())
                return result
            except ssl.SSLWantReadError:
                conn.sendall(outgoing.read())
                data = conn.recv(65536)
                if not data:
                    return None
                incoming.write(data)

    def close(self) -> None:
        self.listener.close()


@pytest.fixture(scope="module")
def material() -> Certificate:
    return generate_certificate(NAME)


@pytest.fixture(scope="module")
def ca_file(material: Certificate, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tls") / "cert.pem"
    path.write_bytes(material.cert_pem)
    return path


@pytest.fixture
def server(material: Certificate) -> Iterator[Server]:
    s = Server(server_context(material))
    yield s
    s.close()


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=TIMEOUT + 5)


def check(seen: Seen, sni: bytes | None, alpn: tuple[bytes, ...]) -> ClientHello:
    assert seen.error is None, seen.error
    assert seen.hello is not None
    assert seen.hello.server_name == sni
    assert seen.hello.alpn == alpn
    assert ja4(seen.hello).startswith("t13" + ("d" if sni else "i"))
    assert len(ja3(seen.hello)) == 32
    print(f"JA4 {ja4(seen.hello)} JA3 {ja3(seen.hello)} in {seen.calls} calls")
    return seen.hello


# --- Python's ssl ---------------------------------------------------------------------------------


def python_client(port: int, ca_file: Path, name: str | None, alpn: list[str] | None) -> tuple[str, bytes]:
    context = ssl.create_default_context(cafile=str(ca_file))
    if name is None:
        context.check_hostname = False
    if alpn:
        context.set_alpn_protocols(alpn)
    with (
        socket.create_connection((HOST, port), timeout=TIMEOUT) as raw,
        context.wrap_socket(raw, server_hostname=name) as tls,
    ):
        # The certificate checked against the name: the SAN matches, or wrap_socket raised.
        peer = tls.getpeercert()
        assert peer is not None and ("DNS", NAME) in peer["subjectAltName"]
        data = b""
        while chunk := tls.recv(4096):
            data += chunk
            if data.endswith(b"hello\n"):
                break
        return tls.selected_alpn_protocol() or "", data


def test_python_ssl_client_with_sni_and_alpn(server: Server, ca_file: Path) -> None:
    server.expect()
    alpn, data = python_client(server.port, ca_file, NAME, ["h2", "http/1.1"])
    seen = server.result()
    check(seen, NAME.encode(), (b"h2", b"http/1.1"))
    assert data == RESPONSE and alpn == "http/1.1" and seen.alpn == "http/1.1"
    assert seen.version == "TLSv1.3"


def test_python_ssl_client_without_sni_or_alpn(server: Server, ca_file: Path) -> None:
    server.expect()
    alpn, _ = python_client(server.port, ca_file, None, None)
    check(server.result(), None, ())
    assert alpn == ""


def test_a_client_offering_only_h2_still_connects(server: Server, ca_file: Path) -> None:
    server.expect()
    alpn, data = python_client(server.port, ca_file, NAME, ["h2"])
    seen = server.result()
    check(seen, NAME.encode(), (b"h2",))
    assert alpn == "" and seen.alpn is None and data == RESPONSE


def test_the_wrong_name_fails_verification(server: Server, ca_file: Path) -> None:
    server.expect()
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        python_client(server.port, ca_file, "other.example", None)
    assert server.result().hello is not None  # the hello was read all the same


@pytest.mark.parametrize("key_type", ["ecdsa", "rsa"])
def test_both_key_types_complete_a_handshake(key_type: str, tmp_path: Path) -> None:
    material = generate_certificate(NAME, key_type)
    (tmp_path / "ca.pem").write_bytes(material.cert_pem)
    server = Server(server_context(material))
    try:
        server.expect()
        python_client(server.port, tmp_path / "ca.pem", NAME, None)
        assert server.result().error is None
    finally:
        server.close()


# --- openssl s_client -----------------------------------------------------------------------------

needs_openssl = pytest.mark.skipif(
    shutil.which("openssl") is None, reason="the openssl program is not installed"
)


@needs_openssl
def test_openssl_s_client_verifies_the_name(server: Server, ca_file: Path) -> None:
    server.expect()
    offer = ["-servername", NAME, "-alpn", "h2,http/1.1"]
    verify = ["-CAfile", str(ca_file), "-verify_hostname", NAME, "-verify_return_error"]
    out = run(["openssl", "s_client", "-connect", f"{HOST}:{server.port}", *offer, *verify])
    seen = server.result()
    assert out.returncode == 0, out.stderr
    assert "Verification: OK" in out.stdout and "ALPN protocol: http/1.1" in out.stdout
    check(seen, NAME.encode(), (b"h2", b"http/1.1"))


@needs_openssl
def test_openssl_s_client_without_sni(server: Server) -> None:
    server.expect()
    out = run(["openssl", "s_client", "-connect", f"{HOST}:{server.port}", "-noservername"])
    assert out.returncode == 0, out.stderr
    check(server.result(), None, ())


@needs_openssl
@pytest.mark.parametrize("version", ["tls1", "tls1_1", "tls1_2"])
def test_old_versions_are_accepted(server: Server, version: str) -> None:
    # What scanners still offer: the server takes TLS 1.0 and 1.1 where this OpenSSL has them.
    expected = {"tls1": "TLSv1", "tls1_1": "TLSv1.1", "tls1_2": "TLSv1.2"}[version]
    if version != "tls1_2" and not getattr(ssl, f"HAS_{expected.replace('.', '_')}"):
        pytest.skip(f"this OpenSSL was built without {expected}")
    server.expect()
    out = run(
        [
            "openssl",
            "s_client",
            "-connect",
            f"{HOST}:{server.port}",
            f"-{version}",
            "-cipher",
            "DEFAULT@SECLEVEL=0",
        ]
    )
    seen = server.result()
    assert out.returncode == 0, out.stdout + out.stderr
    assert seen.error is None and seen.version == expected
    assert (
        seen.hello is not None
        and ja4(seen.hello)[1:3] == {"tls1": "10", "tls1_1": "11", "tls1_2": "12"}[version]
    )


# --- curl -----------------------------------------------------------------------------------------

needs_curl = pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")


@needs_curl
@pytest.mark.parametrize(
    ("flags", "offered"),
    [(["-k"], (b"h2", b"http/1.1")), (["--http1.1", "--cacert"], (b"http/1.1",))],
    ids=["insecure-h2", "verified-http1.1"],
)
def test_curl(server: Server, ca_file: Path, flags: list[str], offered: tuple[bytes, ...]) -> None:
    if flags[-1] == "--cacert":
        flags = [*flags, str(ca_file)]
    elif b"h2" not in offered or "HTTP2" not in run(["curl", "--version"]).stdout:
        pytest.skip("this curl has no HTTP/2, so it offers no h2")
    server.expect()
    url = f"https://{NAME}:{server.port}/"
    out = run(
        ["curl", "-sS", "--max-time", str(TIMEOUT), "--resolve", f"{NAME}:{server.port}:{HOST}", *flags, url]
    )
    seen = server.result()
    assert out.returncode == 0, out.stderr
    assert out.stdout == "hello\n"
    check(seen, NAME.encode(), offered)
    assert seen.alpn == "http/1.1"
