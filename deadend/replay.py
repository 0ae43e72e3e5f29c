"""`deadend replay`: a session recording read back as a conversation, against a server, or as a transcript.

A recording is hostile input: it holds an attacker's bytes, and anyone who could write the file could have
edited it. It is streamed (memory stays about one line whatever its size), every value is checked as it
is read (deadend.recording), everything from it is escaped before it reaches a terminal, and a transcript
made from it can hold no directive its bytes did not mean: their bytes only ever become escaped data.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import ipaddress
import math
import os
import re
import socket
import ssl
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Final

from deadend.clienthello import ClientHello, ClientHelloError, Complete, read_client_hello
from deadend.logs import sanitize, utc_timestamp
from deadend.recording import (
    MAX_OFFSET,
    Data,
    End,
    Gap,
    RecordingError,
    RecordingReader,
    Tls,
    Truncated,
    open_recording,
)
from deadend.transcript import DEFAULT_TIMEOUT_MS, MAX_MS

QUIET: Final = 1.0  # --to: seconds of silence from the server, after the last client bytes, that end it
CONNECT_TIMEOUT: Final = 10.0
TIMEOUT_MARGIN_MS: Final = 2000.0  # --transcript: slack over a recorded wait for the server
SERVER_CLOSED: Final = ("script", "limit")  # closed_by values that mean the server ended the connection
_PIECE = re.compile(rb"[^\n]*\n|[^\n]+")


def add_replay_parser(commands: argparse._SubParsersAction[Any]) -> None:
    replay = commands.add_parser(
        "replay",
        help="show a session recording, or replay it against a server",
        description="Show the conversation in a recording made with `broker --record` (see "
        "docs/recording.md), replay the client's side of it against a server, or turn it into a "
        "transcript for `deadend test`.",
    )
    replay.add_argument("file", type=Path, metavar="FILE", help="a .jsonl recording")
    mode = replay.add_mutually_exclusive_group()
    mode.add_argument(
        "--to", metavar="HOST:PORT", help="send the client's bytes to this server with the recorded timing"
    )
    mode.add_argument("--transcript", action="store_true", help="print a transcript for `deadend test`")
    replay.add_argument(
        "--speed",
        type=float,
        default=1.0,
        metavar="X",
        help="with --to: divide the recorded delays by X; 0 sends without waiting (default 1)",
    )


def run_replay(args: argparse.Namespace) -> int:
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="backslashreplace")  # never lose a line to the locale's encoding
    target: tuple[str, int] | None = None
    if args.to is not None:
        parsed = parse_target(args.to)
        if isinstance(parsed, str):
            return _fail(parsed)
        target = parsed
        if not math.isfinite(args.speed) or args.speed < 0:
            return _fail(f"--speed must be a number >= 0, not {args.speed}")
    try:
        if target is not None or args.transcript:
            check(args.file)  # a malformed file sends nothing and writes no half transcript
        with open_recording(args.file) as reader:
            if target is not None:
                problem = asyncio.run(replay_to(reader, *target, args.speed, _print_now))
                return _fail(problem) if problem else 0
            for line in transcript_of(reader) if args.transcript else conversation(reader):
                print(line)
            sys.stdout.flush()
    except BrokenPipeError:  # `deadend replay FILE | head`: the reader left; nothing to report
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:
        return _fail(sanitize(f"cannot read {args.file}: {e.strerror or e}"))
    except RecordingError as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return 130
    return 0


def check(path: Path) -> None:
    """Read the whole recording once (streamed): RecordingError or OSError if any of it is bad."""
    with open_recording(path) as reader:
        for _entry in reader:
            pass


def _fail(message: str) -> int:
    """Print one error line; `message` is already escaped (RecordingError's text is)."""
    print(f"deadend: error: {message}", file=sys.stderr)
    return 2


def _print_now(line: str) -> None:
    print(line, flush=True)


def parse_target(text: str) -> tuple[str, int] | str:
    """HOST:PORT or [IPv6]:PORT, or what is wrong with it."""
    host, _, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"--to '{sanitize(text, 200)}' is not HOST:PORT (port 1..65535)"
    return host, int(port)


# --- the conversation, for a human -----------------------------------------------------------------


def summary(reader: RecordingReader) -> list[str]:
    meta = reader.meta
    return [
        f"# {sanitize(str(reader.path))}",
        f"# port {meta.port} conn {sanitize(meta.conn)} peer {sanitize(meta.peer)} port {meta.peer_port}",
        f"# script {sanitize(meta.script)} sha256 {sanitize(meta.script_sha256)}",
        f"# started {utc_timestamp(meta.started)}",
    ]


def payload_lines(t: float, arrow: str, payload: bytes) -> list[str]:
    """One line per line of payload, escaped like a log line; the line ends are shown as \\r\\n or \\n."""
    out = []
    for piece in _PIECE.findall(payload):
        body, end = piece, ""
        if piece.endswith(b"\r\n"):
            body, end = piece[:-2], "\\r\\n"
        elif piece.endswith(b"\n"):
            body, end = piece[:-1], "\\n"
        out.append(f"+{t:.3f}s {arrow} {sanitize(body, None)}{end}")
    return out


def conversation(reader: RecordingReader) -> Iterator[str]:
    yield from summary(reader)
    for entry in reader:
        if isinstance(entry, Data):
            yield from payload_lines(entry.t, "<" if entry.dir == "out" else ">", entry.payload)
        elif isinstance(entry, Gap):
            yield f"+{entry.t:.3f}s ! gap: {entry.dropped_bytes} bytes not recorded (disk too slow)"
        elif isinstance(entry, Truncated):
            yield f"+{entry.t:.3f}s ! truncated ({sanitize(entry.reason)}): the rest is not recorded"
        elif isinstance(entry, Tls):
            yield f"+{entry.t:.3f}s ! {_tls_text(entry)}"
        else:
            yield f"+{entry.t:.3f}s ! {_end_text(entry)}"
    if reader.end is None:
        yield "! no end line: the recording was cut short"


def _tls_text(tls: Tls) -> str:
    """The recording's strings come from the file: escaped (again) like everything else shown."""
    shown = " ".join(
        f"{name}={sanitize(value, 300)}"
        for name, value in (
            ("ja4", tls.ja4),
            ("ja3", tls.ja3),
            ("sni", tls.sni or "-"),
            ("alpn", ",".join(tls.alpn) or "-"),
        )
    )
    if tls.error:
        return f"tls failed: {sanitize(tls.error)} {shown}"
    selected = sanitize(tls.alpn_selected or "-", 300)
    return f"tls {sanitize(tls.version, 40)} {sanitize(tls.cipher, 80)} alpn_selected={selected} {shown}"


def recorded_hello(tls: Tls) -> ClientHello | None:
    """The ClientHello of a recording's tls line, parsed again (strictly: the file may have been edited)."""
    try:
        answer = read_client_hello(tls.hello)
    except ClientHelloError:
        return None
    return answer.hello if isinstance(answer, Complete) else None


def client_context(hello: ClientHello | None) -> ssl.SSLContext:
    """A TLS client for replaying a recorded session: it offers the recorded ALPN protocols and checks
    nothing (the server being replayed to is the operator's own)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    offered = [name.decode("ascii") for name in (hello.alpn if hello else ()) if name.isascii() and name]
    if offered:
        with contextlib.suppress(ssl.SSLError, ValueError):
            context.set_alpn_protocols(offered)
    return context


def server_hostname(hello: ClientHello | None) -> str | None:
    """The recorded SNI, when it is a host name Python's ssl can send (an IP address or odd bytes: none)."""
    if hello is None or hello.server_name is None:
        return None
    name = hello.server_name.decode("ascii", "replace")
    if not re.fullmatch(r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,251}[A-Za-z0-9])?", name) or ".." in name:
        return None
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(name)
        return None
    return name


def _end_text(end: End) -> str:
    text = f"end reason={sanitize(end.reason)} bytes_in={end.bytes_in} bytes_out={end.bytes_out}"
    return text if end.closed_by is None else f"{text} closed_by={sanitize(end.closed_by)}"


# --- replaying against a server --------------------------------------------------------------------


async def replay_to(
    reader: RecordingReader, host: str, port: int, speed: float, show: Callable[[str], None]
) -> str:
    """Send the client's bytes with the recorded timing and show both sides; return an error or ""."""
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            stream, writer = await asyncio.open_connection(host, port)
    except OSError as e:  # TimeoutError included
        return f"cannot connect to {sanitize(host)}:{port}: {_why(e)}"
    loop = asyncio.get_running_loop()
    start = loop.time()
    last = [start]  # when bytes last went either way

    async def receive() -> None:
        while True:
            try:
                chunk = await stream.read(65536)
            except OSError:
                return
            if not chunk:
                return
            last[0] = loop.time()
            for line in payload_lines(last[0] - start, "<", chunk):
                show(line)

    show(f"# replaying {sanitize(str(reader.path))} to {sanitize(host)}:{port} at speed {speed:g}")
    receiving = asyncio.create_task(receive())
    try:
        for entry in reader:
            if not (isinstance(entry, Data) and entry.dir == "in") and not isinstance(entry, Tls):
                continue
            delay = min(start + entry.t / speed - loop.time(), MAX_OFFSET) if speed > 0 else 0.0
            if delay > 0:
                await asyncio.wait({receiving}, timeout=delay)
            if receiving.done():
                break
            last[0] = loop.time()
            if isinstance(entry, Tls):
                if not await _start_tls(writer, entry, last[0] - start, show):
                    break
                continue
            for line in payload_lines(last[0] - start, ">", entry.payload):
                show(line)
            writer.write(entry.payload)
            try:
                await writer.drain()
            except OSError:
                break
        while not receiving.done() and (quiet := last[0] + QUIET - loop.time()) > 0:
            await asyncio.wait({receiving}, timeout=quiet)
        why = "the server closed the connection" if receiving.done() else f"{QUIET:g} s of quiet; closing"
        show(f"+{loop.time() - start:.3f}s ! {why}")
    finally:
        receiving.cancel()
        writer.close()
        with contextlib.suppress(asyncio.CancelledError):
            await receiving
        with contextlib.suppress(OSError):
            await writer.wait_closed()
    return ""


async def _start_tls(writer: asyncio.StreamWriter, tls: Tls, t: float, show: Callable[[str], None]) -> bool:
    """Where TLS began: a handshake as the recorded client's (its SNI and ALPN, not its fingerprint). A
    failed one is replayed as the bytes the client sent, which are recorded. False: stop replaying."""
    hello = recorded_hello(tls)
    if tls.error:
        show(f"+{t:.3f}s ! the client's TLS failed here ({sanitize(tls.error)}); sending its bytes")
        writer.write(tls.hello)
        with contextlib.suppress(OSError):
            await writer.drain()
        return True
    show(f"+{t:.3f}s ! starting TLS")
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            await writer.start_tls(client_context(hello), server_hostname=server_hostname(hello))
    except (OSError, ssl.SSLError) as e:  # TimeoutError included
        show(f"+{t:.3f}s ! TLS failed: {sanitize(str(e) or type(e).__name__, 300)}")
        return False
    return True


def _why(e: OSError) -> str:
    if isinstance(e, socket.gaierror) or not e.errno:  # asyncio's own messages carry no errno
        return sanitize(e.strerror or str(e) or "timed out")
    return os.strerror(e.errno)  # not asyncio's "Connect call failed (...)"


# --- as a transcript -------------------------------------------------------------------------------


def _text_escape(byte: int) -> str:
    if byte == 0x5C:
        return "\\\\"
    if byte in (0x0D, 0x0A, 0x09):
        return {0x0D: "\\r", 0x0A: "\\n", 0x09: "\\t"}[byte]
    return chr(byte) if 0x20 <= byte < 0x7F else f"\\x{byte:02x}"


_TEXT_ESCAPES: Final = {byte: _text_escape(byte) for byte in range(256)}


def transcript_text(data: bytes) -> str:
    """Bytes in the transcript's TEXT escapes: printable ASCII as is, everything else escaped."""
    text = data.decode("latin-1").translate(_TEXT_ESCAPES)  # one character per byte, then its escape
    kept = text.rstrip(" ")  # an editor trimming trailing blanks must not change the bytes
    return kept + "\\s" * (len(text) - len(kept))


def transcript_of(reader: RecordingReader) -> Iterator[str]:
    """Client bytes as `>|`, server bytes as `<|`, and how it ended; stops at a gap or a truncation.

    Every line is a comment escaped as in the log, a `%` option from checked values, a step whose TEXT is
    `transcript_text` (printable ASCII only), or `@ within` from a checked number: whatever the file says,
    the transcript holds no other directive. A wait for the server longer than the default allows gets an
    `@ within` of its own.
    """
    meta = reader.meta
    yield f"# from {sanitize(str(reader.path))} by deadend replay --transcript"
    yield (
        f"# session {sanitize(meta.conn)} on port {meta.port} from {sanitize(meta.peer)}, "
        f"started {utc_timestamp(meta.started)}, script {sanitize(meta.script)}"
    )
    yield "# the server's bytes are expected exactly: edit to `<~ REGEX` where they vary"
    yield f"% peer-ip {meta.peer}"
    if meta.seed is not None:  # the script's random numbers, as in the session
        yield f"% seed {meta.seed[0]} {meta.seed[1]}"
    previous = 0.0  # when the last step happened, for the waits
    for entry in reader:
        if isinstance(entry, Data):
            pieces = _PIECE.findall(entry.payload)
            if not pieces:
                continue  # the broker writes no empty chunk; an edited file may
            if entry.dir == "out":
                yield from _within(entry.t - previous)
            previous = entry.t
            prefix = "<|" if entry.dir == "out" else ">|"
            for piece in pieces:
                yield f"{prefix} {transcript_text(piece)}"
        elif isinstance(entry, Gap | Truncated):
            what = "a gap" if isinstance(entry, Gap) else f"truncated ({sanitize(entry.reason)})"
            yield f"# the recording has {what} here: the rest of the session is not known"
            return
        elif isinstance(entry, Tls):
            yield f"# {_tls_text(entry)}"
            if entry.error:
                yield "# the client's TLS failed here: the rest of the session is not replayable"
                return
            yield "! starttls"
            previous = entry.t
        elif entry.closed_by in SERVER_CLOSED or (entry.closed_by is None and entry.reason != "shutdown"):
            # closed_by None: nobody closed the connection before the session ended, so the broker
            # closed it when the script finished (or was ended): the client saw the server close.
            yield from _within(entry.t - previous)
            yield "= eof"
        elif entry.closed_by == "peer":
            yield "! close"
        else:
            yield f"# the session ended: {_end_text(entry)}"
    if reader.end is None:
        yield "# no end line: the recording was cut short"


def _within(wait: float) -> Iterator[str]:
    ms = wait * 1000 + TIMEOUT_MARGIN_MS
    if ms > DEFAULT_TIMEOUT_MS:
        yield f"@ within {min(math.ceil(ms), int(MAX_MS))}"
