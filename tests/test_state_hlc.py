"""Hybrid logical clock: monotonic, follows the wall clock, refuses far-future peers."""

from __future__ import annotations

from itertools import pairwise

import msgpack
import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshd.state.hlc import HLC, MAX_COUNTER, ClockDriftError, Timestamp

walls = st.integers(min_value=0, max_value=2**40)


def test_now_follows_the_wall_clock_when_it_moves_forward() -> None:
    clock = HLC("a")
    assert clock.now(1000) == Timestamp(1000, 0, "a")
    assert clock.now(1000) == Timestamp(1000, 1, "a")
    assert clock.now(1005) == Timestamp(1005, 0, "a")


def test_now_stays_ahead_when_the_wall_clock_steps_back() -> None:
    clock = HLC("a")
    first = clock.now(10_000)
    after = [clock.now(wall) for wall in (9_000, 5_000, 9_999, 10_000)]
    assert after == [Timestamp(10_000, i, "a") for i in range(1, 5)]
    assert all(ts > first for ts in after)
    assert clock.now(10_001) == Timestamp(10_001, 0, "a")


@given(st.lists(walls, min_size=1, max_size=200))
def test_now_is_strictly_monotonic_whatever_the_wall_clock_does(wall_readings: list[int]) -> None:
    clock = HLC("a")
    stamps = [clock.now(w) for w in wall_readings]
    assert all(x < y for x, y in pairwise(stamps))
    # The wall part is the largest wall clock reading seen.
    assert stamps[-1].wall_ms == max(wall_readings)


@given(
    st.lists(
        st.tuples(st.booleans(), walls, walls, st.integers(0, 1000)),
        min_size=1,
        max_size=100,
    )
)
def test_sends_and_receives_are_strictly_monotonic(
    events: list[tuple[bool, int, int, int]],
) -> None:
    clock = HLC("a", max_drift_ms=2**41)
    previous = clock.last
    for is_receive, wall, remote_wall, remote_counter in events:
        if is_receive:
            remote = Timestamp(remote_wall, remote_counter, "b")
            ts = clock.observe(remote, wall)
            assert ts > remote
        else:
            ts = clock.now(wall)
        assert ts > previous
        assert ts.wall_ms >= wall
        previous = ts


def test_observe_wall_clock_ahead_of_both_resets_the_counter() -> None:
    clock = HLC("a")
    clock.now(100)
    assert clock.observe(Timestamp(150, 7, "b"), 200) == Timestamp(200, 0, "a")


def test_observe_remote_ahead_takes_its_counter_plus_one() -> None:
    clock = HLC("a")
    clock.now(100)
    assert clock.observe(Timestamp(300, 7, "b"), 200) == Timestamp(300, 8, "a")


def test_observe_local_ahead_bumps_the_local_counter() -> None:
    clock = HLC("a")
    clock.now(500)
    clock.now(500)  # counter 1
    assert clock.observe(Timestamp(300, 7, "b"), 200) == Timestamp(500, 2, "a")


def test_observe_equal_walls_take_the_larger_counter_plus_one() -> None:
    clock = HLC("a")
    clock.now(500)
    assert clock.observe(Timestamp(500, 7, "b"), 200) == Timestamp(500, 8, "a")
    assert clock.observe(Timestamp(500, 3, "b"), 200) == Timestamp(500, 9, "a")


def test_drift_beyond_the_limit_is_refused_and_leaves_the_clock_alone() -> None:
    clock = HLC("a", max_drift_ms=1000)
    clock.now(5000)
    before = clock.last
    with pytest.raises(ClockDriftError, match="1001 ms ahead") as info:
        clock.observe(Timestamp(6001, 0, "evil"), 5000)
    assert info.value.remote.node == "evil"
    assert clock.last == before
    # Exactly at the limit is still accepted.
    assert clock.observe(Timestamp(6000, 0, "b"), 5000) == Timestamp(6000, 1, "a")


def test_a_far_ahead_peer_cannot_drag_the_clock_beyond_the_limit() -> None:
    clock = HLC("a", max_drift_ms=60_000)
    for step in range(1, 100):
        with pytest.raises(ClockDriftError):
            clock.observe(Timestamp(10**9 + step, 0, "evil"), 10**6)
    assert clock.now(10**6).wall_ms == 10**6


def test_counter_overflow_spills_into_the_next_millisecond() -> None:
    clock = HLC("a")
    clock.observe(Timestamp(1000, MAX_COUNTER, "b"), 1000)
    assert clock.last == Timestamp(1001, 0, "a")
    assert clock.now(0) == Timestamp(1001, 1, "a")


def test_total_order_node_breaks_ties() -> None:
    a, b = Timestamp(5, 1, "a"), Timestamp(5, 1, "b")
    assert a < b and a != b
    assert sorted([Timestamp(6, 0, "a"), b, a, Timestamp(5, 0, "z")]) == [
        Timestamp(5, 0, "z"),
        a,
        b,
        Timestamp(6, 0, "a"),
    ]


@given(st.lists(st.tuples(st.sampled_from("abc"), walls), max_size=100))
def test_concurrent_writers_never_issue_equal_timestamps(writes: list[tuple[str, int]]) -> None:
    clocks = {n: HLC(n) for n in "abc"}
    stamps = [clocks[node].now(wall) for node, wall in writes]
    assert len(set(stamps)) == len(stamps)


def test_advance_resumes_past_a_stored_timestamp() -> None:
    clock = HLC("a")
    clock.advance(Timestamp(1000, 5, "z"))
    ts = clock.now(10)
    assert ts > Timestamp(1000, 5, "z")
    clock.advance(Timestamp(1, 0, "a"))  # never moves backwards
    assert clock.now(10) > ts


@given(st.builds(Timestamp, walls, st.integers(0, MAX_COUNTER), st.text(min_size=1, max_size=20)))
def test_pack_roundtrips_through_msgpack_and_bytes(ts: Timestamp) -> None:
    if "\x00" in ts.node:
        return
    assert Timestamp.unpack(msgpack.unpackb(msgpack.packb(ts.pack()))) == ts
    assert Timestamp.from_bytes(ts.to_bytes()) == ts


@pytest.mark.parametrize(
    "data",
    [
        None,
        [],
        [1, 2],
        [1, 2, "a", 4],
        ["1", 0, "a"],
        [True, 0, "a"],
        [1.5, 0, "a"],
        [-1, 0, "a"],
        [2**63, 0, "a"],
        [1, -1, "a"],
        [1, MAX_COUNTER + 1, "a"],
        [1, 0, ""],
        [1, 0, b"a"],
        [1, 0, "x" * 256],
        [1, 0, "a\x00b"],
        [1, 0, "\udcff"],
        {"wall_ms": 1},
    ],
)
def test_unpack_refuses_malformed_input(data: object) -> None:
    with pytest.raises(ValueError):
        Timestamp.unpack(data)


@pytest.mark.parametrize("data", [b"", b"\x00" * 12, b"\x00" * 12 + b"\xff", "text", None])
def test_from_bytes_refuses_malformed_input(data: object) -> None:
    with pytest.raises(ValueError):
        Timestamp.from_bytes(data)  # type: ignore[arg-type]


@given(st.recursive(st.none() | st.integers() | st.text() | st.binary(), st.lists, max_leaves=6))
def test_unpack_of_anything_gives_a_timestamp_or_value_error(data: object) -> None:
    try:
        ts = Timestamp.unpack(data)
    except ValueError:
        return
    ts.check()


def test_bad_node_names_are_refused() -> None:
    for bad in ("", "a\x00", "x" * 256):
        with pytest.raises(ValueError):
            HLC(bad)
