"""The isolation layers' pure rules: the hello report's wire form and the broker's lines, Landlock's
rights per ABI, and which environment variables count as inherited."""

from __future__ import annotations

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from broker import isolation as shown
from deadend import wire
from deadend.wire import LAYERS as ORDER
from deadend.wire import Layer
from sandbox import environment, landlock
from sandbox.isolation import _explained


def test_a_report_crosses_the_wire_unchanged() -> None:
    report = [Layer("environment"), Layer("user", "unshare(user): Operation not permitted"), Layer("pid")]
    wired = msgpack.unpackb(msgpack.packb(wire.layers_to_wire(report)))
    assert wire.layers_from_wire(wired) == report


@pytest.mark.parametrize(
    "bad",
    [
        None,
        "user",
        {"user": ""},
        [["user"]],
        [["user", "", ""]],
        [["user", 1]],
        [[b"user", ""]],
        [["uts", ""]],  # not a layer the zygote has
        [["user", ""]] * (len(ORDER) + 1),
    ],
)
def test_a_malformed_report_is_refused(bad: object) -> None:
    with pytest.raises(ValueError):
        wire.layers_from_wire(bad)


# Anything msgpack can carry: decoding either gives layers or says ValueError, never anything else.
wire_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20) | st.binary(max_size=20),
    lambda inner: st.lists(inner, max_size=10),
    max_leaves=30,
)


@given(wire_values)
def test_decoding_any_value_is_a_report_or_a_value_error(value: object) -> None:
    try:
        decoded = wire.layers_from_wire(value)
    except ValueError:
        return
    assert all(layer.name in ORDER and len(layer.skipped) <= wire.LAYER_REASON_MAX for layer in decoded)


def test_a_long_reason_is_cut() -> None:
    [layer] = wire.layers_from_wire([["net", "x" * 10_000]])
    assert layer.skipped == "x" * wire.LAYER_REASON_MAX


def test_the_broker_lines() -> None:
    report = [Layer("environment"), Layer("user"), Layer("net", "unshare(net): Operation not permitted")]
    assert shown.summary(report) == "sandbox isolation: environment, user"
    assert shown.summary([]) == "sandbox isolation: no layer"
    line = "sandbox isolation: net skipped: unshare(net): Operation not permitted"
    assert shown.skipped_line(report[2]) == line
    table = shown.table(report).splitlines()
    assert table[0].split() == ["environment", "active:", *shown.MEANING["environment"].split()]
    assert table[2].split()[:2] == ["net", "skipped:"]


def test_every_layer_has_a_meaning() -> None:
    assert set(shown.MEANING) == set(ORDER)


@pytest.mark.parametrize(
    ("abi", "expected"),
    [
        (1, ((1 << 13) - 1, 0, 0)),
        (2, ((1 << 14) - 1, 0, 0)),
        (3, ((1 << 15) - 1, 0, 0)),
        (4, ((1 << 15) - 1, 3, 0)),
        (5, ((1 << 16) - 1, 3, 0)),
        (6, ((1 << 16) - 1, 3, 3)),
        (7, ((1 << 16) - 1, 3, 3)),  # ABI 7 adds logging flags, no access right
    ],
)
def test_landlock_handles_every_right_the_abi_knows(abi: int, expected: tuple[int, int, int]) -> None:
    assert landlock.handled(abi) == expected


def test_landlock_passes_the_struct_its_abi_knows() -> None:
    assert [landlock.attr_size(abi) for abi in range(1, 8)] == [8, 8, 8, 16, 16, 24, 24]


def test_inherited_variables_are_named_never_valued() -> None:
    block = b"TZ=UTC\0DATABASE_URL=postgres://u:secret@db/x\0LISTEN_FDS=2\0EMPTY=\0NOVALUE\0"
    assert environment.extra(block) == ["DATABASE_URL", "EMPTY", "LISTEN_FDS", "NOVALUE"]
    assert environment.extra(b"TZ=UTC\0") == []
    assert environment.extra(b"") == []
    assert environment.names(b"A=b=c\0") == ["A"]


def test_without_a_user_namespace_a_refusal_says_why() -> None:
    refused = Layer("net", "unshare(net): Operation not permitted")
    assert _explained(refused).skipped.endswith("(no user namespace, not root)")
    denied = "unshare(user): Operation not permitted"  # the user layer itself: no hint to add
    kept = [Layer("landlock", "not in this kernel"), Layer("net"), Layer("user", denied)]
    assert [_explained(layer) for layer in kept] == kept
