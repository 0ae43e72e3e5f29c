"""deadend.wire, the contract: the request table, the three dialects, the zygote's configuration."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from deadend import wire
from deadend.wire import Mode

# --- the request table --------------------------------------------------------------------------------

VALID = [
    ["send", b""],
    ["send", b"x" * wire.SEND_MAX],
    ["recv", 1],
    ["recv", 65535],
    ["sleep", 0],
    ["sleep", 3_600_000],
    ["get_ip"],
    ["log", b"m", "debug", []],
    ["log", b"m" * (wire.LOG_MAX + 1), "error", []],
    ["log", b"m", "info", [b"user", b"root", b"tries", 3, b"ok", False, b"http.path", b""]],
    # the largest legal log request: 16 fields of the longest names and values, the longest message
    [
        "log",
        b"m" * (wire.LOG_MAX + 1),
        "warn",
        [x for i in range(16) for x in (b"k" + b"%02d" % i + b"." * 29, b"v" * (wire.FIELD_MAX + 1))],
    ],
    ["log", b"m", "info", [b"n", -(1 << 63), b"m", (1 << 64) - 1]],
    ["set_tarpit", 0, 60000],
    ["set_limits", 0, (1 << 63) - 1],
    ["close"],
    ["starttls", b""],
    ["starttls", b"http/1.1"],
    ["starttls", b"h2,http/1.1"],
    ["starttls", b"x" * wire.ALPN_MAX],
    ["starttls", b"!~," * 10 + b"a"],
    ["tls_info"],
    ["done", "error", b"boom"],
]
INVALID: list[object] = [
    ["usage", -1, 0, 0],
    ["usage", 0, 1 << 63, 0],
    ["usage", 1.5, 0, 0],
    ["usage", True, 0, 0],
    ["usage", 1, 2],
    None,
    5,
    "send",
    [],
    {},
    [b"send", b"x"],
    ["SEND", b"x"],
    ["send"],
    ["send", "text"],
    ["send", b"x" * (wire.SEND_MAX + 1)],
    ["send", b"x", b"y"],
    ["recv", 0],
    ["recv", 65536],
    ["recv", True],
    ["recv", 1.0],
    ["recv", "1"],
    ["sleep", -1],
    ["sleep", 3_600_001],
    ["get_ip", 1],
    ["log", b"m", "critical", []],
    ["log", "m", "info", []],
    ["log", b"m" * (wire.LOG_MAX + 2), "info", []],
    ["log", b"m", "info"],  # the fields are always sent, empty or not
    ["log", b"m", "info", None],
    ["log", b"m", "info", [b"user"]],  # a name without its value
    ["log", b"m", "info", [b"User", b"x"]],
    ["log", b"m", "info", [b"1user", b"x"]],
    ["log", b"m", "info", [b"user-name", b"x"]],
    ["log", b"m", "info", [b"k" * 33, b"x"]],
    ["log", b"m", "info", ["user", b"x"]],  # names are bytes, as Lua strings
    ["log", b"m", "info", [b"user", b"x", b"user", b"y"]],
    ["log", b"m", "info", [b"user", 1.5]],
    ["log", b"m", "info", [b"user", None]],
    ["log", b"m", "info", [b"user", "text"]],
    ["log", b"m", "info", [b"user", b"x" * (wire.FIELD_MAX + 2)]],
    ["log", b"m", "info", [x for i in range(17) for x in (b"k%d" % i, i)]],
    ["set_tarpit", 60001, 0],
    ["set_tarpit", 0],
    ["set_limits", -1, 0],
    ["set_limits", 1 << 63, 0],
    ["close", None],
    ["starttls"],
    ["starttls", "http/1.1"],
    ["starttls", None],
    ["starttls", b"x" * (wire.ALPN_MAX + 1)],
    ["starttls", b","],
    ["starttls", b"h2,"],
    ["starttls", b",h2"],
    ["starttls", b"h2,,http/1.1"],
    ["starttls", b"http 1.1"],
    ["starttls", b"h2\x00"],
    ["starttls", b"h\xc3\xa9"],
    ["tls_info", b""],
    ["done", "pwned", b""],
    ["done", "aborted", b""],  # only the answer to ABORT, which the dense channel routes itself
    ["done", "return", "text"],
    ["exec", b"/bin/sh"],
    ["dump", b"bytecode"],  # only in a check
]


@pytest.mark.parametrize("frame", VALID, ids=repr)
def test_valid_requests_parse_in_a_session(frame: list[object]) -> None:
    for mode in (Mode.RUN, Mode.PREPARE, Mode.DENSE):
        req = wire.parse_request(frame, mode)
        assert req.op == frame[0] and list(req.args) == frame[1:]


@pytest.mark.parametrize("frame", INVALID, ids=lambda f: repr(f)[:40])
def test_invalid_requests_are_violations(frame: object) -> None:
    with pytest.raises(wire.ProtocolViolation):
        wire.parse_request(frame, Mode.RUN)


@pytest.mark.parametrize("row", wire.REQUESTS, ids=lambda r: r.name)
@pytest.mark.parametrize("mode", list(Mode), ids=lambda m: m.value)
def test_every_request_in_every_mode(row: wire.RequestRow, mode: Mode) -> None:
    """The table decides, in one place, which request is permitted where (h11's table-driven style)."""
    frame = [row.name, *SAMPLE_ARGS[row.name]]
    if mode in row.modes:
        assert wire.parse_request(frame, mode).op == row.name
    else:
        with pytest.raises(wire.ProtocolViolation, match="not permitted"):
            wire.parse_request(frame, mode)


SAMPLE_ARGS: dict[str, list[object]] = {
    "send": [b"x"],
    "recv": [10],
    "sleep": [5],
    "get_ip": [],
    "log": [b"m", "info", [b"user", b"root"]],
    "set_tarpit": [1, 2],
    "set_limits": [3, 4],
    "close": [],
    "starttls": [b"http/1.1"],
    "tls_info": [],
    "usage": [1 << 20, 5000, 1200],
    "dump": [b"\x1bLua"],
    "done": ["return", b""],
}


def test_the_table_is_complete_and_consistent() -> None:
    assert set(SAMPLE_ARGS) == set(wire.ROWS), "a request without a sample here"
    for row in wire.REQUESTS:
        assert len(SAMPLE_ARGS[row.name]) == row.arity, row.name
        assert row.modes, f"{row.name} is permitted nowhere"
    # the script API (SPEC.md's table): the requests only a running script makes
    assert wire.API_FUNCTIONS == (
        "send",
        "recv",
        "sleep",
        "get_ip",
        "log",
        "set_tarpit",
        "set_limits",
        "close",
        "starttls",
        "tls_info",
    )
    assert wire.ROWS["done"].modes == frozenset(Mode)
    assert {r.name for r in wire.REQUESTS if r.io} == {"send", "recv", "starttls"}
    assert wire.ROWS["dump"].modes == frozenset({Mode.CHECK})
    assert wire.ROWS["usage"].modes == frozenset({Mode.RUN})  # a measured session: one per worker


def test_wrong_arity_is_refused_for_every_row() -> None:
    for row in wire.REQUESTS:
        args = SAMPLE_ARGS[row.name]
        mode = next(iter(row.modes))
        with pytest.raises(wire.ProtocolViolation, match="bad arguments"):
            wire.parse_request([row.name, *args, 1], mode)
        if args:
            with pytest.raises(wire.ProtocolViolation, match="bad arguments"):
                wire.parse_request([row.name, *args[:-1]], mode)


# --- decoding a worker's frames --------------------------------------------------------------------------


def test_unpacker_refuses_odd_frames() -> None:
    for data in (
        b"\xdd\xff\xff\xff\xff",  # array of 4 billion
        msgpack.packb({"a": 1}),  # maps are never sent by a worker
        msgpack.packb(msgpack.ExtType(1, b"x")),
        msgpack.packb(["send", b"x" * (wire.SEND_MAX + 1)]),  # a bin past SEND_MAX
        msgpack.packb(["log", b"m", "info", [[b"nested"]]]),  # arrays nest one deep at most
        msgpack.packb(["log", b"m", "info", list(range(wire.MAX_ARRAY + 1))]),
    ):
        unpacker = wire.worker_unpacker()
        unpacker.feed(data)
        with pytest.raises(ValueError):
            list(unpacker)


_KEY = st.from_regex(rb"\A[a-z][a-z0-9_.]{0,31}\Z")
_VALUE = st.one_of(
    st.booleans(), st.integers(-(1 << 63), (1 << 64) - 1), st.binary(max_size=wire.FIELD_MAX + 1)
)


@given(st.dictionaries(_KEY, _VALUE, max_size=wire.FIELDS_MAX))
def test_any_legal_fields_pass_through_the_decoder_and_the_table(fields: dict[bytes, object]) -> None:
    frame = ["log", b"m", "info", [x for kv in fields.items() for x in kv]]
    unpacker = wire.worker_unpacker()
    unpacker.feed(wire.pack(frame))
    (decoded,) = list(unpacker)
    assert wire.parse_request(decoded, Mode.RUN).args[2] == frame[3]


@given(
    st.lists(
        st.one_of(st.binary(max_size=40), st.text(max_size=5), st.integers(), st.floats(), st.none()),
        max_size=wire.MAX_ARRAY,
    )
)
def test_fields_the_table_takes_follow_the_rules(pairs: list[object]) -> None:
    """Whatever a compromised worker sends as fields, the table takes it only if every rule holds."""
    keys, values = pairs[0::2], pairs[1::2]
    legal = (
        len(pairs) % 2 == 0
        and all(type(k) is bytes and wire.FIELD_KEY.fullmatch(k) for k in keys)
        and len(set(keys)) == len(keys)
        and all(type(v) in (bool, int) or (type(v) is bytes and len(v) <= wire.FIELD_MAX + 1) for v in values)
    )
    try:
        wire.parse_request(["log", b"m", "info", pairs], Mode.RUN)
    except wire.ProtocolViolation:
        assert not legal
    else:
        assert legal


def test_largest_frame_with_the_next_read_behind_it_fits() -> None:
    """A read that completes a 1 MiB send may carry the start of the next frame: the decoder takes it."""
    big = wire.pack_slot(3, ["send", b"x" * wire.SEND_MAX])
    follow = wire.pack_slot(4, ["send", b"y" * wire.SEND_MAX])
    stream = big + follow
    reader = wire.SlotReader(wire.worker_unpacker())
    got = []
    for i in range(0, len(stream), wire.READ_CHUNK):
        reader.feed(stream[i : i + wire.READ_CHUNK])
        got += list(reader)
    assert [slot for slot, _ in got] == [3, 4]
    assert got[1][1][1] == b"y" * wire.SEND_MAX


def test_largest_start_messages_back_to_back_fit_the_worker() -> None:
    """K start messages of the largest script queued at once: the worker reads them all."""
    start = wire.Start("run", b"-" * wire.MAX_SCRIPT_BYTES, "25.lua", (1, 2), 1 << 20, 1000, False)
    stream = b"".join(wire.pack_slot(slot, start.to_frame()) for slot in range(4))
    reader = wire.SlotReader(wire.broker_unpacker())
    got = []
    for i in range(0, len(stream), wire.READ_CHUNK):
        reader.feed(stream[i : i + wire.READ_CHUNK])
        got += list(reader)
    assert [slot for slot, _ in got] == [0, 1, 2, 3]
    assert all(wire.Start.from_frame(frame) == start for _, frame in got)


SMALL = [frame for frame in VALID if len(wire.pack(frame)) < 100]


@given(
    frames=st.lists(st.tuples(st.integers(0, 2**20), st.sampled_from(SMALL)), min_size=1, max_size=20),
    cuts=st.lists(st.integers(1, 200), min_size=1, max_size=50),
)
def test_slot_reader_reassembles_any_split(frames: list[tuple[int, list[object]]], cuts: list[int]) -> None:
    stream = b"".join(wire.pack_slot(slot, frame) for slot, frame in frames)
    reader = wire.SlotReader(wire.worker_unpacker())
    got, pos, i = [], 0, 0
    while pos < len(stream):
        step = cuts[i % len(cuts)]
        reader.feed(stream[pos : pos + step])
        pos, i = pos + step, i + 1
        got += list(reader)
    assert got == frames


def test_slot_reader_blames_the_slot_whose_frame_is_bad() -> None:
    reader = wire.SlotReader(wire.worker_unpacker())
    reader.feed(wire.pack(7) + b"\xc1")  # a slot number, then garbage
    with pytest.raises(ValueError):
        list(reader)
    assert reader.pending_slot == 7
    other = wire.SlotReader(wire.worker_unpacker())
    other.feed(wire.pack("7") + wire.pack(["get_ip"]))
    with pytest.raises(wire.ProtocolViolation, match="without its slot number"):
        list(other)


# --- the plain dialect and the zygote's ------------------------------------------------------------------


@pytest.mark.parametrize("flags", [(True, False), (False, True), (True, True)])
def test_start_frame_roundtrip(flags: tuple[bool, bool]) -> None:
    """Every field crosses, measure (`deadend audit`) included: a frame built field by field once lost it."""
    clock, measure = flags
    start = wire.Start("run", b"src", "25.lua", (1, 2), 1 << 20, 1000, clock, measure)
    frame = msgpack.unpackb(wire.pack(start.to_frame()), raw=False)
    assert wire.Start.from_frame(frame) == start


@pytest.mark.parametrize("mode", ["dense", "exec", ""])
def test_start_frame_refuses_unknown_modes(mode: str) -> None:
    frame = wire.Start("run", b"src", "25.lua", (1, 2), 1, 1, False).to_frame()
    frame[1]["mode"] = mode
    with pytest.raises(ValueError):
        wire.Start.from_frame(frame)


def test_go_frames() -> None:
    assert wire.is_go(wire.go_frame((1, 2)))
    for frame in (["go", 1], ["go", 1, "2"], ["go", 1, True], ["start", 1, 2], "go"):
        assert not wire.is_go(frame)


def test_zygote_config_roundtrip_and_checks() -> None:
    config = wire.ZygoteConfig(
        parent_pid=10, control_fd=3, libraries={"c": "libc.so.6"}, run_as=(65534, 65534)
    )
    assert wire.ZygoteConfig.decode(config.encode()) == config
    plain = wire.ZygoteConfig(parent_pid=10, control_fd=3, libraries={}, run_as=None)
    assert wire.ZygoteConfig.decode(plain.encode()) == plain
    with pytest.raises(ValueError):
        wire.ZygoteConfig.decode('{"parent_pid": "10", "control_fd": 3, "libraries": {}, "run_as": null}')


def test_fork_request_roundtrip() -> None:
    for request in (wire.ForkRequest(1 << 27, 30), wire.ForkRequest(1 << 30, 4010, 30.0)):
        kind, fields = msgpack.unpackb(request.to_message())
        assert kind == "fork" and wire.ForkRequest.from_fields(fields) == request
    with pytest.raises(ValueError):
        wire.ForkRequest.from_fields({"address_space": "x", "cpu_seconds": 1, "dense_session_cpu": None})


def test_lua_constants_are_plain_values() -> None:
    constants = wire.lua_constants()
    assert all(type(v) in (int, str) for v in constants.values())
    assert "setmetatable" not in str(constants["BASE_NAMES"]).split(",")


# --- the reply to tls_info ---------------------------------------------------------------------------


@given(
    st.sampled_from(["TLSv1", "TLSv1.2", "TLSv1.3"]),
    st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-", max_size=60),
    st.sampled_from(["", "http/1.1", "h2"]),
    st.none() | st.binary(max_size=255),
    st.lists(st.binary(min_size=1, max_size=255), max_size=16),
)
def test_tls_info_packs_and_unpacks(
    version: str, cipher: str, selected: str, sni: bytes | None, alpn: list[bytes]
) -> None:
    ja4, ja3 = "t13d1516h2_8daaf6152771_e5627efa2ab1", "1c258ebef8eee2dfa3df6d8d07285af9"
    blob = wire.pack_tls_info(version, cipher, ja4, ja3, selected, sni, tuple(alpn))
    table = wire.unpack_tls_info(blob)
    assert table == {
        "version": version.encode(),
        "cipher": cipher.encode(),
        "ja4": ja4.encode(),
        "ja3": ja3.encode(),
        "alpn_selected": selected.encode() or None,
        "sni": sni,
        "alpn": alpn,
    }
