"""`deadend.starttls()` and `deadend.tls_info()` in the real broker, with real TLS clients over loopback.

What the script sees (tls_info, plaintext both ways, argument errors), what the log says (tls.handshake,
tls.failed, the fingerprints on session.end, one end line per connection), what the recording keeps (the
hello itself: its fingerprints computed again equal the log's), and that the ceilings, the tarpit, the
byte counts and departures work on the plaintext, in the default mode, dense mode and on uvloop.
"""

from __future__ import annotations

import re
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from deadend.clienthello import Complete, ja3, ja4, read_client_hello
from deadend.recording import Data, Tls, read_recording
from deadend.tlscert import generate_certificate
from tests.broker.test_ops_events import free_port, json_records, wait_event
from tests.conftest import HOST, REPO, Broker, read_all, read_until

SNI = "www.example.org"

INFO_ECHO = """
local ok = deadend.starttls("http/1.1")
if not ok then deadend.log("starttls gave nil") return end
local info = deadend.tls_info()
deadend.send(string.format("version=%s\\ncipher=%s\\nja4=%s\\nja3=%s\\nsni=%s\\nalpn=%s\\nselected=%s\\n.\\n",
  info.version, info.cipher, info.ja4, info.ja3, tostring(info.sni), table.concat(info.alpn, ","),
  tostring(info.alpn_selected)))
while true do
  local d = deadend.recv(4096)
  if not d then break end
  deadend.send("echo:" .. d)
end
"""


def client_context(alpn: list[str] | None = None) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    if alpn:
        context.set_alpn_protocols(alpn)
    return context


def tls_connect(b: Broker, port: int, sni: str | None = SNI, alpn: list[str] | None = None) -> ssl.SSLSocket:
    raw = b.connect(port, timeout=10)
    return client_context(alpn).wrap_socket(raw, server_hostname=sni)


def fields_of(data: bytes) -> dict[str, str]:
    return dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)


def client_hello(sni: str | None = SNI) -> bytes:
    """A real ClientHello (Python's ssl), for clients that then stop talking."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client_context().wrap_bio(incoming, outgoing, server_hostname=sni)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def records(b: Broker) -> list[dict[str, Any]]:
    return json_records([line for line in b.lines if line.startswith("{")])


def by_conn(b: Broker, event: str) -> list[dict[str, Any]]:
    return [r for r in records(b) if r["event"] == event]


@pytest.mark.parametrize(
    "args",
    [[], ["--sessions-per-worker", "4"], ["--event-loop", "uvloop"]],
    ids=["default", "dense", "uvloop"],
)
def test_a_tls_session_end_to_end(make_broker, tmp_path: Path, args: list[str]) -> None:
    folder = tmp_path / "rec"
    b = make_broker({"7.lua": INFO_ECHO}, "--log-format", "json", "--record", str(folder), *args)
    sessions = []
    for _ in range(3 if args else 1):  # dense: sessions that share one sandbox process, one after another
        with tls_connect(b, 7, alpn=["h2", "http/1.1"]) as tls:
            seen = fields_of(read_until(tls, b"\n.\n"))
            tls.sendall(b"ping\n")
            assert read_until(tls, b"echo:ping\n").endswith(b"echo:ping\n")
            assert tls.version() == seen["version"] == "TLSv1.3"
            assert tls.selected_alpn_protocol() == seen["selected"] == "http/1.1"
        sessions.append(seen)
    for seen in sessions:
        assert seen["sni"] == SNI and seen["alpn"] == "h2,http/1.1" and seen["cipher"].startswith("TLS_")
    end = wait_event(b, "session.end")
    handshake = wait_event(b, "tls.handshake")
    assert handshake["ja4"] == sessions[0]["ja4"] and handshake["ja3"] == sessions[0]["ja3"]
    assert handshake["sni"] == SNI and handshake["alpn"] == ["h2", "http/1.1"]
    assert handshake["version"] == "TLSv1.3" and handshake["alpn_selected"] == "http/1.1"
    assert 0 < handshake["cpu_ms"] < 1000 and handshake["handshake_ms"] >= handshake["cpu_ms"] / 2
    assert end["reason"] == "done" and end["ja4"] == handshake["ja4"] and end["sni"] == SNI
    info_bytes = len(read_info_line(sessions[0]))
    assert end["bytes_in"] == len(b"ping\n")  # plaintext, not the TLS records
    assert end["bytes_out"] == info_bytes + len(b"echo:ping\n")
    # the recording: where TLS began, the hello itself (its fingerprints computed again), then plaintext
    b.stop()
    recording = read_recording(next(folder.iterdir()))
    tls_line = next(e for e in recording.entries if isinstance(e, Tls))
    answer = read_client_hello(tls_line.hello)
    assert isinstance(answer, Complete) and answer.length == len(tls_line.hello)
    assert ja4(answer.hello) == handshake["ja4"] and ja3(answer.hello) == handshake["ja3"]
    data = [e for e in recording.entries if isinstance(e, Data)]
    assert [(e.dir, e.payload) for e in data][-2:] == [("in", b"ping\n"), ("out", b"echo:ping\n")]
    assert recording.entries.index(tls_line) == 0  # nothing before it: implicit TLS


def read_info_line(seen: dict[str, str]) -> bytes:
    keys = ("version", "cipher", "ja4", "ja3", "sni", "alpn", "selected")
    return "".join(f"{k}={seen[k]}\n" for k in keys).encode() + b".\n"


ARGUMENTS = """
local function try(f, ...) local ok, e = pcall(f, ...) if ok then return "ok" end return tostring(e) end
local before = tostring(deadend.tls_info())
local r = { try(deadend.starttls, 5), try(deadend.starttls, "h2,,x"), try(deadend.starttls, ("a"):rep(256)),
  try(deadend.starttls, "h2 x") }
local ok = deadend.starttls()
r[#r + 1] = try(deadend.starttls)
r[#r + 1] = tostring(deadend.tls_info().alpn_selected)
deadend.send(before .. "\\n" .. tostring(ok) .. "\\n" .. table.concat(r, "\\n") .. "\\n")
"""


def test_argument_errors_and_a_second_starttls(make_broker) -> None:
    b = make_broker({"7.lua": ARGUMENTS})
    with tls_connect(b, 7, alpn=["h2"]) as tls:
        lines = read_all(tls).decode().splitlines()
    assert lines[:2] == ["nil", "true"]  # tls_info before TLS; starttls
    assert lines[2].endswith("bad argument #1 to 'starttls' (string expected, got number)")
    for line in lines[3:6]:
        assert "bad argument #1 to 'starttls' (ALPN protocols must be printable ASCII names" in line
    assert lines[6].endswith("bad call to 'starttls' (the connection already speaks TLS)")
    assert lines[7] == "nil"  # no ALPN list given: the server selected none
    assert b.session_end(b.conn_ids(at_least=1)[0]).group(1) == "done"


FAILS = 'local ok = deadend.starttls() deadend.log("starttls " .. tostring(ok)) deadend.send("late")'


def test_plaintext_on_a_tls_port(make_broker) -> None:
    b = make_broker({"7.lua": FAILS}, "--log-format", "json")
    with b.connect(7) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert read_all(s) == b""  # closed without a byte: the script's late send failed
    failed = wait_event(b, "tls.failed")
    assert failed["error"] == "not a TLS handshake record (content type 0x47)"
    assert failed["ja4"] is None and failed["sni"] is None and failed["alpn"] is None
    end = wait_event(b, "session.end")
    assert (end["reason"], end["closed_by"], end["bytes_in"], end["bytes_out"]) == (
        "tls-handshake",
        "peer",
        0,
        0,
    )
    assert any(r["event"] == "script.log" and r["msg"] == "starttls nil" for r in records(b))


@pytest.mark.parametrize(
    ("sent", "error", "fingerprinted"),
    [
        (b"", "no ClientHello within 0.5s", False),
        (b"\x16\x03\x01\x02\x00\x01", "the ClientHello was not complete within 0.5s", False),
        (None, "the TLS handshake did not complete within 0.5s", True),  # a whole hello, then silence
    ],
    ids=["silent", "half-a-hello", "hello-then-silence"],
)
def test_a_handshake_that_stalls_times_out(
    make_broker, sent: bytes | None, error: str, fingerprinted: bool
) -> None:
    b = make_broker({"7.lua": FAILS}, "--log-format", "json", "--tls-handshake-timeout", "0.5")
    with b.connect(7) as s:
        s.sendall(client_hello() if sent is None else sent)
        started = time.monotonic()
        data = read_all(s, timeout=10)
        assert 0.4 < time.monotonic() - started < 5
    assert fingerprinted == data.startswith(b"\x16")  # the server's flight came, then nothing more
    failed = wait_event(b, "tls.failed")
    assert failed["error"] == error and (failed["ja4"] is not None) == fingerprinted
    end = wait_event(b, "session.end")
    assert (end["reason"], end["closed_by"]) == ("tls-handshake", "limit")
    assert end["ja4"] == failed["ja4"] and (end["sni"] == SNI) == fingerprinted


STARTTLS_AFTER_PLAINTEXT = """
deadend.send("220 ready\\r\\n")
local line = deadend.recv(10)
deadend.send("220 go\\r\\n")
deadend.log("starttls " .. tostring(deadend.starttls()) .. " after " .. line:gsub("%c", ""))
"""


def test_bytes_pipelined_behind_starttls_are_no_client_hello(make_broker) -> None:
    b = make_broker({"7.lua": STARTTLS_AFTER_PLAINTEXT}, "--log-format", "json")
    with b.connect(7) as s:
        s.sendall(b"STARTTLS\r\nINJECTED\r\n")  # the script reads 10 bytes: the rest reaches the handshake
        assert read_all(s) == b"220 ready\r\n220 go\r\n"
    assert wait_event(b, "tls.failed")["error"] == "not a TLS handshake record (content type 0x49)"
    assert wait_event(b, "session.end")["reason"] == "tls-handshake"
    assert any(r.get("msg") == "starttls nil after STARTTLS" for r in records(b))


CEILINGS = """
deadend.starttls()
deadend.set_tarpit(300)
local first = deadend.recv(100)
deadend.send("got " .. first)
local slept = deadend.sleep(5000)
deadend.log("slept " .. slept)
local again = deadend.recv(100)
deadend.log("then " .. tostring(again))
"""


def test_tarpit_sleep_and_departure_work_on_the_plaintext(make_broker) -> None:
    b = make_broker({"7.lua": CEILINGS}, "--log-format", "json")
    with tls_connect(b, 7) as tls:
        tls.sendall(b"hello")
        started = time.monotonic()
        assert read_until(tls, b"got hello") == b"got hello"
        assert time.monotonic() - started >= 0.28  # the tarpit, after a plaintext recv
        time.sleep(0.5)  # the script sleeps now (a peer gone before a sleep begins is seen at the next recv)
    # the client left (a FIN under TLS) while the script slept: it wakes at once, and recv gives nil
    assert wait_event(b, "session.end")["reason"] == "done"
    log = {r["msg"] for r in records(b) if r["event"] == "script.log"}
    slept = int(next(m for m in log if m.startswith("slept ")).split()[1])
    assert slept < 4000 and "then nil" in log


IDLE = "deadend.starttls() deadend.log('recv ' .. tostring(deadend.recv(10)))"


def test_the_idle_timeout_counts_plaintext(make_broker) -> None:
    b = make_broker({"7.lua": IDLE}, "--log-format", "json", "--idle-timeout", "0.5")
    with tls_connect(b, 7) as tls:
        assert tls.recv(10) == b""  # nothing arrives; the broker closes (after its close_notify)
    end = wait_event(b, "session.end")
    assert (end["reason"], end["limit"]) == ("idle", "idle-timeout")


FLOOD = "deadend.starttls() local chunk = ('x'):rep(65536) while deadend.send(chunk) do end"


def test_a_client_that_stops_reading_tls_ends_idle(make_broker) -> None:
    b = make_broker({"7.lua": FLOOD}, "--log-format", "json", "--idle-timeout", "1")
    with tls_connect(b, 7):  # the handshake, then never a read: the records pile up, then nothing moves
        end = wait_event(b, "session.end", timeout=20)
    assert (end["reason"], end["limit"]) == ("idle", "idle-timeout")
    assert end["ja4"] is not None and end["bytes_out"] > 0


def test_tls_metrics(make_broker) -> None:
    mport = free_port()
    b = make_broker({"7.lua": FAILS}, "--metrics", f"{HOST}:{mport}")
    with tls_connect(b, 7):
        pass
    with b.connect(7) as s:
        s.sendall(b"junk")
        read_all(s)
    b.wait_for("TLS failed")
    with urllib.request.urlopen(f"http://{HOST}:{mport}/metrics", timeout=5) as response:
        text = response.read().decode()
    port = b.port(7)
    assert f'deadend_tls_handshakes_total{{port="{port}",result="ok"}} 1.0' in text
    assert f'deadend_tls_handshakes_total{{port="{port}",result="failed"}} 1.0' in text
    cpu = re.search(rf'deadend_tls_cpu_seconds_total{{port="{port}"}} (\S+)', text)
    assert cpu and 0 < float(cpu.group(1)) < 1


# --- certificates -----------------------------------------------------------------------------------


def peer_certificate(b: Broker, port: int) -> x509.Certificate:
    with tls_connect(b, port) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return x509.load_der_x509_certificate(der)


def test_the_operators_certificate_and_one_per_port(make_broker, tmp_path: Path) -> None:
    material = generate_certificate("ops.example.net", "ecdsa")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_bytes(material.cert_pem)
    key.write_bytes(material.key_pem)
    config = tmp_path / "deadend.toml"
    config.write_text('[port.8]\ntls-name = "other.example"\n')
    script = "deadend.starttls() deadend.send('x')"
    b = make_broker(
        {"7.lua": script, "8.lua": script},
        "--config",
        str(config),
        "--tls-cert",
        str(cert),
        "--tls-key",
        str(key),
    )
    assert peer_certificate(b, 7).public_bytes(Encoding.PEM) == material.cert_pem
    other = peer_certificate(b, 8)
    names = other.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["other.example", "www.other.example"]
    config_line = b.wait_for(r"config: .*").group(0)
    assert f"tls-cert={cert}" in config_line and f"tls-key={key}" in config_line
    assert "port.8.tls-name=other.example" in config_line
    b.wait_for(
        rf"TLS certificate for 7\.lua: ops\.example\.net \(ECDSA secp256r1, valid until .*from {cert}\)"
    )
    b.wait_for(r"TLS certificate for 8\.lua: other\.example, www\.other\.example \(RSA 2048, .*generated\)")
    assert "BEGIN" not in "\n".join(b.lines)  # no key, no certificate in the log


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--tls-cert", "{cert}"], "deadend: error: --tls-cert needs --tls-cert and --tls-key both"),
        (["--tls-cert", "{cert}", "--tls-key", "{other_key}"], "do not match"),
        (["--tls-cert", "{tmp}/missing.pem", "--tls-key", "{key}"], "cannot read TLS certificate"),
        (["--tls-name", "bad_name"], "is neither a DNS name"),
    ],
    ids=["no-key", "mismatch", "missing", "bad-name"],
)
def test_a_bad_certificate_is_one_line_at_start_up(
    make_broker, tmp_path: Path, flags: list[str], message: str
) -> None:
    material, other = generate_certificate("a.example", "ecdsa"), generate_certificate("b.example", "ecdsa")
    paths = {"cert": tmp_path / "c.pem", "key": tmp_path / "k.pem", "other_key": tmp_path / "o.pem"}
    paths["cert"].write_bytes(material.cert_pem)
    paths["key"].write_bytes(material.key_pem)
    paths["other_key"].write_bytes(other.key_pem)
    args = [flag.format(tmp=tmp_path, **paths) for flag in flags]
    b = make_broker({"7.lua": FAILS}, *args, ready=False, expect_exit=1)
    b.proc.wait(30)
    err = b.stderr_closed()
    assert err.count("\n") == 1 and message in err, err


# --- replay of a TLS recording ------------------------------------------------------------------------


def test_a_tls_recording_replays_against_a_live_broker_and_as_a_transcript(
    make_broker, tmp_path: Path
) -> None:
    folder = tmp_path / "rec"
    b = make_broker({"7.lua": INFO_ECHO}, "--record", str(folder))
    with tls_connect(b, 7, alpn=["h2", "http/1.1"]) as tls:
        read_until(tls, b"\n.\n")
        tls.sendall(b"ping\n")
        read_until(tls, b"echo:ping\n")
    b.session_end(b.conn_ids(at_least=1)[0])
    path = next(folder.iterdir())
    time.sleep(0.3)  # the recorder's thread writes the end line
    replay = subprocess.run(
        [sys.executable, "-m", "deadend", "replay", str(path), "--to", f"{HOST}:{b.port(7)}", "--speed", "0"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=REPO,
    )
    assert replay.returncode == 0, replay.stderr
    assert "! starting TLS" in replay.stdout and "> ping\\n" in replay.stdout
    assert "< echo:ping\\n" in replay.stdout  # the live broker answered through TLS
    conn = b.conn_ids(at_least=2)[1]
    b.wait_for(rf"conn={conn} .*TLS TLSv1\.3 .*sni={re.escape(SNI)} alpn=h2,http/1\.1")
    shown = subprocess.run(
        [sys.executable, "-m", "deadend", "replay", str(path)], capture_output=True, text=True, timeout=30
    )
    assert re.search(r"\+\d\.\d{3}s ! tls TLSv1\.3 \S+ alpn_selected=http/1\.1 ja4=t13d", shown.stdout)
    transcript = subprocess.run(
        [sys.executable, "-m", "deadend", "replay", str(path), "--transcript"],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    assert "! starttls" in transcript
