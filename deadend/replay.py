"""`deadend replay`: a session recording read back as a conversation, against a server, or as a transcript.

Everything in a recording came from an attacker, so it is escaped before it reaches a terminal.
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
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from deadend.logs import sanitize, utc_timestamp
from deadend.recording import Data, End, Gap, Recording, RecordingError, Truncated, read_recording
from deadend.transcript import DEFAULT_TIMEOUT_MS

QUIET: Final = 1.0  # --to: seconds of silence from the server, after the last client bytes, that end it
CONNECT_TIMEOUT: Final = 10.0
TIMEOUT_MARGIN_MS: Final = 2000.0  # --transcript: slack over the longest recorded wait for the server
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
    try:
        recording = read_recording(args.file)
    except OSError as e:
        return _fail(f"cannot read {args.file}: {e.strerror or e}")
    except RecordingError as e:
        return _fail(str(e))
    if args.to is not None:
        target = parse_target(args.to)
        if isinstance(target, str):
            return _fail(target)
        if not math.isfinite(args.speed) or args.speed < 0:
            return _fail(f"--speed must be a number >= 0, not {args.speed}")
        try:
            problem = asyncio.run(replay_to(recording, *target, args.speed, _print))
        except KeyboardInterrupt:
            return 130
        return _fail(problem) if problem else 0
    lines = transcript_of(recording) if args.transcript else conversation(recording)
    for line in lines:
        _print(line)
    return 0


def _fail(message: str) -> int:
    print(f"deadend: error: {sanitize(message)}", file=sys.stderr)
    return 2


def _print(line: str) -> None:
    print(line, flush=True)


def parse_target(text: str) -> tuple[str, int] | str:
    """HOST:PORT or [IPv6]:PORT, or what is wrong with it."""
    host, _, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        return f"--to {text!r} is not HOST:PORT (port 1..65535)"
    return host, int(port)


# --- the conversation, for a human -----------------------------------------------------------------


def summary(recording: Recording) -> list[str]:
    meta = recording.meta
    return [
        f"# {sanitize(str(recording.path))}",
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


def conversation(recording: Recording) -> list[str]:
    lines = summary(recording)
    for entry in recording.entries:
        if isinstance(entry, Data):
            lines += payload_lines(entry.t, "<" if entry.dir == "out" else ">", entry.payload)
        elif isinstance(entry, Gap):
            lines.append(f"+{entry.t:.3f}s ! gap: {entry.dropped_bytes} bytes not recorded (disk too slow)")
        elif isinstance(entry, Truncated):
            lines.append(f"+{entry.t:.3f}s ! truncated ({sanitize(entry.reason)}): the rest is not recorded")
        else:
            lines.append(f"+{entry.t:.3f}s ! {_end_text(entry)}")
    if recording.end is None:
        lines.append("! no end line: the recording was cut short")
    return lines


def _end_text(end: End) -> str:
    text = f"end reason={sanitize(end.reason)} bytes_in={end.bytes_in} bytes_out={end.bytes_out}"
    return text if end.closed_by is None else f"{text} closed_by={sanitize(end.closed_by)}"


# --- replaying against a server --------------------------------------------------------------------


async def replay_to(
    recording: Recording, host: str, port: int, speed: float, show: Callable[[str], None]
) -> str:
    """Send the client's bytes with the recorded timing and show both sides; return an error or ""."""
    try:
        async with asyncio.timeout(CONNECT_TIMEOUT):
            reader, writer = await asyncio.open_connection(host, port)
    except OSError as e:  # TimeoutError included
        return f"cannot connect to {host}:{port}: {_why(e)}"
    loop = asyncio.get_running_loop()
    start = loop.time()
    last = [start]  # when bytes last went either way

    async def receive() -> None:
        while True:
            try:
                chunk = await reader.read(65536)
            except OSError:
                return
            if not chunk:
                return
            last[0] = loop.time()
            for line in payload_lines(last[0] - start, "<", chunk):
                show(line)

    show(f"# replaying {sanitize(str(recording.path))} to {sanitize(host)}:{port} at speed {speed:g}")
    receiving = asyncio.create_task(receive())
    try:
        for entry in recording.entries:
            if not isinstance(entry, Data) or entry.dir != "in":
                continue
            delay = start + entry.t / speed - loop.time() if speed > 0 else 0.0
            if delay > 0:
                await asyncio.wait({receiving}, timeout=delay)
            if receiving.done():
                break
            last[0] = loop.time()
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


def _why(e: OSError) -> str:
    if isinstance(e, socket.gaierror) or not e.errno:  # asyncio's own messages carry no errno
        return e.strerror or str(e) or "timed out"
    return os.strerror(e.errno)  # not asyncio's "Connect call failed (...)"


# --- as a transcript -------------------------------------------------------------------------------


def transcript_text(data: bytes) -> str:
    """Bytes in the transcript's TEXT escapes: printable ASCII as is, everything else escaped."""
    out = []
    for byte in data:
        if byte == 0x5C:
            out.append("\\\\")
        elif byte in (0x0D, 0x0A, 0x09):
            out.append({0x0D: "\\r", 0x0A: "\\n", 0x09: "\\t"}[byte])
        elif 0x20 <= byte < 0x7F:
            out.append(chr(byte))
        else:
            out.append(f"\\x{byte:02x}")
    text = "".join(out)
    kept = text.rstrip(" ")  # an editor trimming trailing blanks must not change the bytes
    return kept + "\\s" * (len(text) - len(kept))


def transcript_of(recording: Recording) -> list[str]:
    """Client bytes as `>|`, server bytes as `<|`, and how it ended; stops at a gap or a truncation."""
    meta = recording.meta
    head = [
        f"# from {sanitize(str(recording.path))} by deadend replay --transcript",
        f"# session {sanitize(meta.conn)} on port {meta.port} from {sanitize(meta.peer)}, "
        f"started {utc_timestamp(meta.started)}, script {sanitize(meta.script)}",
        "# the server's bytes are expected exactly: edit to `<~ REGEX` where they vary",
    ]
    with contextlib.suppress(ValueError):
        head.append(f"% peer-ip {ipaddress.ip_address(meta.peer)}")
    steps: list[str] = []
    previous = longest = 0.0  # the longest wait for the server, for `% timeout`
    for entry in recording.entries:
        if isinstance(entry, Data):
            if entry.dir == "out":
                longest = max(longest, entry.t - previous)
            previous = entry.t
            prefix = "<|" if entry.dir == "out" else ">|"
            steps += [f"{prefix} {transcript_text(piece)}" for piece in _PIECE.findall(entry.payload)]
        elif isinstance(entry, Gap | Truncated):
            what = "a gap" if isinstance(entry, Gap) else f"truncated ({sanitize(entry.reason)})"
            steps.append(f"# the recording has {what} here: the rest of the session is not known")
            break
        elif entry.closed_by in SERVER_CLOSED or (entry.closed_by is None and entry.reason != "shutdown"):
            # closed_by None: nobody closed the connection before the session ended, so the broker
            # closed it when the script finished (or was ended): the client saw the server close.
            longest = max(longest, entry.t - previous)
            steps.append("= eof")
        elif entry.closed_by == "peer":
            steps.append("! close")
        else:
            steps.append(f"# the session ended: {_end_text(entry)}")
    if recording.end is None:
        steps.append("# no end line: the recording was cut short")
    if longest * 1000 + TIMEOUT_MARGIN_MS > DEFAULT_TIMEOUT_MS:
        head.append(f"% timeout {math.ceil(longest * 1000 + TIMEOUT_MARGIN_MS)}")
    return [*head, *steps]
