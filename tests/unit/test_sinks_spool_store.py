"""The spool store (deadend/sinks/spool.py) on real files: order, progress, torn and corrupt records,
the size cap, permissions; and a property test of reads against a model."""

from __future__ import annotations

import itertools
import os
import stat
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from deadend.sinks.event import OutEvent
from deadend.sinks.spool import (
    SEGMENT_MIN,
    SpoolStore,
    decode_record,
    encode_record,
    folder_key,
    segment_size,
)


def event(n: int, size: int = 0) -> OutEvent:
    return OutEvent(f"id-{n}", "2026-11-25T16:35:55.259Z", "info", "session.end", "s1",
                    b'{"n":%d,"pad":"%s"}' % (n, b"x" * size))  # fmt: skip


def numbers(store: SpoolStore, start: int, count: int = 10**6) -> list[int]:
    return [seq for seq, _ in store.read(start, count, 1 << 30).records]


def test_record_round_trip_and_corruption() -> None:
    line = encode_record(7, event(7))
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert decode_record(line[:-1]) == (7, event(7))
    flipped = bytearray(line[:-1])
    flipped[20] ^= 1
    assert decode_record(bytes(flipped)) is None
    assert decode_record(line[:-5]) is None


@given(st.binary(max_size=200))
def test_decoding_garbage_never_raises(data: bytes) -> None:
    decode_record(data)


def test_append_read_commit_reopen(tmp_path: Path) -> None:
    store = SpoolStore(tmp_path / "s", 1 << 20)
    assert (store.first_seq, store.next_seq) == (1, 1)
    store.append([(n, event(n, 300)) for n in range(1, 2001)])  # several segments of 128 KiB
    assert len(store.segments) > 3
    assert numbers(store, 1) == list(range(1, 2001))
    assert numbers(store, 1500) == list(range(1500, 2001))
    assert numbers(store, 10, 5) == [10, 11, 12, 13, 14]
    assert numbers(store, 15, 3) == [15, 16, 17]  # goes on where the last read stopped
    store.commit(1000)
    assert store.segments[0].first <= 1001 < store.segments[1].first if len(store.segments) > 1 else True
    store.close()
    again = SpoolStore(tmp_path / "s", 1 << 20)
    assert (again.committed, again.first_seq, again.next_seq) == (1000, 1001, 2001)
    assert numbers(again, again.first_seq) == list(range(1001, 2001))
    again.close()
    folder = tmp_path / "s"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert {stat.S_IMODE(f.stat().st_mode) for f in folder.iterdir()} == {0o600}


def test_a_torn_last_record_is_cut_and_counted(tmp_path: Path) -> None:
    store = SpoolStore(tmp_path, 1 << 20)
    store.append([(n, event(n)) for n in range(1, 11)])
    store.close()
    [segment] = [p for p in tmp_path.iterdir() if p.suffix == ".seg"]
    with segment.open("ab") as f:
        f.write(encode_record(11, event(11))[:-9])  # a crash in the middle of a write
    again = SpoolStore(tmp_path, 1 << 20)
    assert again.torn == 1 and again.next_seq == 11
    again.append([(11, event(11))])
    assert numbers(again, 1) == list(range(1, 12))
    again.close()


def test_a_corrupt_record_in_the_middle_is_skipped_and_counted(tmp_path: Path) -> None:
    store = SpoolStore(tmp_path, 1 << 20)
    store.append([(n, event(n)) for n in range(1, 6)])
    store.close()
    [segment] = [p for p in tmp_path.iterdir() if p.suffix == ".seg"]
    data = bytearray(segment.read_bytes())
    data[data.index(b"id-3") + 1] ^= 0x20  # a flipped bit
    segment.write_bytes(bytes(data))
    again = SpoolStore(tmp_path, 1 << 20)
    result = again.read(1, 100, 1 << 20)
    assert [seq for seq, _ in result.records] == [1, 2, 4, 5] and result.skipped == 1
    again.close()


def test_the_cap_drops_whole_oldest_segments(tmp_path: Path) -> None:
    cap = 256 << 10
    store = SpoolStore(tmp_path, cap)
    assert store.segment_bytes == segment_size(cap) == 32 << 10
    dropped: list[tuple[int, int]] = []
    for start in range(1, 4001, 100):
        dropped += store.append([(n, event(n, 200)) for n in range(start, start + 100)]).dropped
    assert store.total_bytes <= cap
    kept = numbers(store, 1)
    assert kept == list(range(kept[0], 4001))
    assert dropped[0][0] == 1 and dropped[-1][1] == kept[0] - 1
    assert all(b + 1 == c for (_, b), (c, _) in itertools.pairwise(dropped))  # contiguous
    store.commit(kept[0] + 10)
    assert numbers(store, store.first_seq)[0] == kept[0] + 11
    store.close()


def test_an_event_too_large_for_the_spool_is_refused(tmp_path: Path) -> None:
    store = SpoolStore(tmp_path, 256 << 10)
    result = store.append([(1, event(1, 70_000)), (2, event(2))])
    assert result.refused == 1
    assert numbers(store, 1) == [2]
    store.close()


def test_a_symlinked_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(OSError) as caught:
        SpoolStore(tmp_path / "link", 1 << 20)
    assert caught.value.filename == str(tmp_path / "link")


def test_a_planted_symlink_segment_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_bytes(b"precious\n")
    folder = tmp_path / "s"
    folder.mkdir(mode=0o700)
    os.symlink(target, folder / "00000000000000000001.seg")
    store = SpoolStore(folder, 1 << 20)  # not a segment: never read, repaired or written through
    assert store.segments == []
    store.append([(1, event(1))])
    assert numbers(store, 1) == [1]
    store.close()
    assert target.read_bytes() == b"precious\n"
    assert not (folder / "00000000000000000001.seg").is_symlink()


def test_a_garbled_progress_file_means_nothing_known_delivered(tmp_path: Path) -> None:
    store = SpoolStore(tmp_path, 1 << 20)
    store.append([(n, event(n)) for n in range(1, 4)])
    store.commit(2)
    store.close()
    (tmp_path / "progress").write_bytes(b"12x\n")
    again = SpoolStore(tmp_path, 1 << 20)
    assert again.committed == 0 and numbers(again, again.first_seq) == [1, 2, 3]
    again.close()


def test_folder_keys_are_distinct_and_safe() -> None:
    a, b = folder_key("nats://h:1/a.b"), folder_key("nats://h:1/a_b")
    assert a != b and all(c.isalnum() or c in ".-_" for c in a + b)
    assert segment_size(1 << 40) == 4 << 20 and segment_size(0) == SEGMENT_MIN


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["append", "read", "commit", "reopen"]), st.integers(1, 300)),
                max_size=25))  # fmt: skip
def test_reads_match_a_model(tmp_path_factory: pytest.TempPathFactory, ops: list[tuple[str, int]]) -> None:
    folder = tmp_path_factory.mktemp("model")
    store = SpoolStore(folder, 64 << 20)  # no cap drops here: the model is a plain list
    model: list[int] = []
    committed = 0
    try:
        for op, n in ops:
            if op == "append":
                start = store.next_seq
                store.append([(s, event(s, n % 50)) for s in range(start, start + n)])
                model += list(range(start, start + n))
            elif op == "read":
                start = committed + 1 + n % (len(model) + 1)
                got = store.read(start, n, 1 << 30)
                assert got.skipped == 0
                assert [s for s, _ in got.records] == [s for s in model if s >= start][:n]
                assert all(e == event(s, e.body.count(b"x")) for s, e in got.records)
            elif op == "commit" and model:
                committed = max(committed, min(model[-1], committed + n))
                store.commit(committed)
            elif op == "reopen":
                store.close()
                store = SpoolStore(folder, 64 << 20)
                assert store.next_seq == (model[-1] + 1 if model else max(1, committed + 1))
            assert [s for s, _ in store.read(store.first_seq, 10**6, 1 << 30).records] == [
                s for s in model if s > committed
            ]
    finally:
        store.close()
