"""The TLS examples with the clients people use: curl and openssl s_client against 443.lua, 25.lua's
STARTTLS with openssl s_client -starttls smtp and smtplib, imaplib.IMAP4_SSL against 993.lua, slixmpp's
STARTTLS against 5222.lua. Each session's fingerprints (JA4, JA3, SNI) are checked against the ClientHello
the broker recorded, and against the values published for the same client where there are some
(tests/data/tls_clients.json). And 443.lua and 993.lua stay 80.lua and 143.lua plus their TLS block.
"""

from __future__ import annotations

import asyncio
import imaplib
import json
import re
import shutil
import smtplib
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import slixmpp

from deadend.clienthello import Complete, ja3, ja4, read_client_hello
from deadend.recording import Tls, read_recording
from tests.conftest import DATA, EXAMPLES, HOST, NOT_INSTALLED, Broker, finish

CLIENTS = json.loads((DATA / "tls_clients.json").read_text())["clients"]
UNVERIFIED = ssl._create_unverified_context()  # the examples' certificate is generated at start-up
TLS_BLOCK = re.compile(r"\n-- ==== TLS: .*?-- ==== end of TLS =+\n(?=\n)", re.S)


def without_header(source: str) -> str:
    """The script from its first line of code (the header comments describe each file)."""
    return source[re.search(r"^[^-\n]", source, re.M).start() :]  # type: ignore[union-attr]


def test_443_is_80_plus_its_tls_block() -> None:
    tls, plain = (EXAMPLES / "443.lua").read_text(), (EXAMPLES / "80.lua").read_text()
    assert len(TLS_BLOCK.findall(tls)) == 1
    assert without_header(TLS_BLOCK.sub("", tls)) == without_header(plain)


def test_993_is_143_plus_its_tls_block_and_its_starttls_answer() -> None:
    tls, plain = (EXAMPLES / "993.lua").read_text(), (EXAMPLES / "143.lua").read_text()
    tls = TLS_BLOCK.sub("", tls).replace(
        '"BAD TLS is already active.")  -- 993.lua: the one other line that differs',
        '"BAD TLS support isn\'t enabled.")',
    )
    assert without_header(tls) == without_header(plain)


@pytest.fixture(scope="module")
def examples(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Broker, Path]]:
    """One broker for the module: every example, with recordings and JSON events."""
    folder = tmp_path_factory.mktemp("tls") / "rec"
    args = ["--log-format", "json", "--record", str(folder), "--tls-name", "mail.example.com"]
    b = Broker(EXAMPLES, args, [int(p.stem) for p in EXAMPLES.glob("*.lua")])
    b.wait_for(r'"event":"broker.ready"', timeout=30)
    yield b, folder
    finish([b])


def session(b: Broker, folder: Path, port: int, since: int) -> tuple[dict[str, Any], Tls]:
    """The tls.handshake event of the first session on `port` after `since`, checked against the hello the
    recording kept (the same fingerprints, computed again here), and that recording's tls line."""
    line = b.wait_for(rf'"event":"tls\.handshake".*"port":{b.port(port)},', since=since, timeout=15).string
    event = json.loads(line)
    end = json.loads(b.wait_for(rf'"event":"session\.end".*"conn":"{event["conn"]}"', timeout=30).string)
    assert (end["ja4"], end["ja3"], end["sni"]) == (event["ja4"], event["ja3"], event["sni"])
    path = next(folder.glob(f"*-{b.port(port)}-{event['conn']}.jsonl"))
    tls = next(e for e in read_recording(path).entries if isinstance(e, Tls))
    answer = read_client_hello(tls.hello)
    assert isinstance(answer, Complete)
    assert (ja4(answer.hello), ja3(answer.hello)) == (event["ja4"], event["ja3"])
    return event, tls


def run(cmd: list[str], stdin: bytes = b"", timeout: float = 20) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(cmd, input=stdin, capture_output=True, timeout=timeout)


def needs(program: str) -> None:
    if shutil.which(program) is None:
        pytest.skip(f"{program} {NOT_INSTALLED} (.ci/run installs it)")


def test_curl_k_gets_the_nginx_page_over_tls(examples: tuple[Broker, Path]) -> None:
    needs("curl")
    b, folder = examples
    mark = b.mark()
    name, port = "www.example.com", b.port(443)
    curl = [
        "curl",
        "-sk",
        "--max-time",
        "10",
        "--resolve",
        f"{name}:{port}:{HOST}",
        f"https://{name}:{port}/",
    ]
    out = run(curl)
    assert out.returncode == 0, out.stderr
    assert b"<title>Welcome to nginx!</title>" in out.stdout
    event, tls = session(b, folder, 443, mark)
    assert event["sni"] == name and event["alpn_selected"] == "http/1.1" and tls.sni == name
    version = run(["curl", "--version"]).stdout.decode()
    reference = CLIENTS["curl-sni-h2"]
    if reference["when"] in version and event["alpn"] == ["h2", "http/1.1"]:
        assert event["ja3"] == reference["ja3"]  # as published for curl
        assert event["ja4"].startswith(reference["ja4_ab"])
    # the same client twice gives the same fingerprints
    mark = b.mark()
    assert run(curl).returncode == 0
    again, _ = session(b, folder, 443, mark)
    assert (again["ja4"], again["ja3"]) == (event["ja4"], event["ja3"])


def test_openssl_s_client_against_443(examples: tuple[Broker, Path]) -> None:
    needs("openssl")
    b, folder = examples
    mark = b.mark()
    cmd = ["openssl", "s_client", "-connect", f"{HOST}:{b.port(443)}", "-servername", "shop.example.com"]
    out = run([*cmd, "-alpn", "http/1.1", "-quiet"], b"GET / HTTP/1.0\r\n\r\n")
    assert b"HTTP/1.1 200 OK\r\nServer: nginx/1.24.0" in out.stdout, out.stderr
    event, _ = session(b, folder, 443, mark)
    assert event["sni"] == "shop.example.com" and event["alpn"] == ["http/1.1"]
    assert event["ja4"].startswith("t13d")


def test_openssl_s_client_starttls_smtp_against_25(examples: tuple[Broker, Path]) -> None:
    needs("openssl")
    b, folder = examples
    mark = b.mark()
    cmd = ["openssl", "s_client", "-starttls", "smtp", "-connect", f"{HOST}:{b.port(25)}", "-noservername"]
    # -nocommands: a line starting with Q is SMTP's QUIT, not s_client's; -ign_eof: wait for the server
    out = run([*cmd, "-nocommands", "-ign_eof", "-crlf"], b"EHLO probe.example.net\nQUIT\n")
    text = out.stdout.decode("utf-8", "replace")
    assert "Protocol  : TLSv1.3" in text or "New, TLSv1.3" in text, text + out.stderr.decode()
    assert "250 SMTPUTF8" in text and "221 2.0.0 Bye" in text
    assert "250-STARTTLS" not in text.split("---")[-1]  # after TLS the EHLO offers it no more
    event, _ = session(b, folder, 25, mark)
    assert event["sni"] is None and event["ja4"].startswith("t13i")


def test_smtplib_starttls_then_auth_refused(examples: tuple[Broker, Path]) -> None:
    b, folder = examples
    mark = b.mark()
    with smtplib.SMTP(HOST, b.port(25), timeout=10) as smtp:
        smtp.ehlo("relay.example.net")
        assert smtp.has_extn("starttls")
        assert smtp.starttls(context=UNVERIFIED)[0] == 220
        smtp.ehlo("relay.example.net")
        assert not smtp.has_extn("starttls") and smtp.has_extn("auth")
        with pytest.raises(smtplib.SMTPAuthenticationError):
            smtp.login("admin", "hunter2")
    event, _ = session(b, folder, 25, mark)
    reference = CLIENTS["python-no-sni"]
    assert event["sni"] is None  # smtplib sends no SNI for an IP address
    if ssl.OPENSSL_VERSION.startswith(reference["when"]):
        assert event["ja4"] == reference["ja4"]  # the JA4 project's value for Python
    b.wait_for(r'"msg":"auth PLAIN attempt 1".*"user":"admin"', since=mark, timeout=10)  # a field


def test_imaplib_imap4_ssl_against_993(examples: tuple[Broker, Path]) -> None:
    b, folder = examples
    mark = b.mark()
    imap = imaplib.IMAP4_SSL(HOST, b.port(993), ssl_context=UNVERIFIED, timeout=10)
    try:
        assert b"Dovecot ready." in imap.welcome and "AUTH=PLAIN" in imap.capabilities
        with pytest.raises(imaplib.IMAP4.error, match="AUTHENTICATIONFAILED"):
            imap.login("root", "toor")
    finally:
        imap.logout()
    event, tls = session(b, folder, 993, mark)
    reference = CLIENTS["python-no-sni"]
    if ssl.OPENSSL_VERSION.startswith(reference["when"]):
        assert event["ja4"] == reference["ja4"]
    assert tls.version == event["version"] and event["alpn_selected"] is None


def test_slixmpp_starttls_against_5222(examples: tuple[Broker, Path]) -> None:
    b, folder = examples
    mark = b.mark()

    async def login() -> list[str]:
        client = slixmpp.ClientXMPP("mallory@chat.example.org", "hunter2")
        client.enable_direct_tls, client.enable_starttls, client.enable_plaintext = False, True, False
        client.ssl_context = UNVERIFIED
        failures: list[str] = []
        gave_up: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def give_up(_: object) -> None:
            if not gave_up.done():
                gave_up.set_result(None)

        client.add_event_handler("failed_auth", lambda stanza: failures.append(stanza["condition"]))
        client.add_event_handler("failed_all_auth", give_up)
        client.connect(HOST, b.port(5222))
        try:
            await asyncio.wait_for(gave_up, 15)
        finally:
            client.abort()
        return failures

    assert asyncio.run(login()) == ["not-authorized", "not-authorized"]
    event, _ = session(b, folder, 5222, mark)
    assert event["sni"] == "chat.example.org"
    b.wait_for(r"auth PLAIN attempt 2", since=mark, timeout=10)
