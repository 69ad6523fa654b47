"""The replicated store: last writer wins, tombstones, digests, convergence, GC, watches."""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator, Mapping, Sequence

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from meshd.state.hlc import Timestamp
from meshd.state.store import (
    BUCKETS,
    DIGEST_SIZE,
    MAX_KEY,
    MAX_VALUE,
    Entry,
    MetaValue,
    PersistenceError,
    Store,
    bucket_of,
    compute_digest,
)

HOUR = 3600 * 1000
DAY = 24 * HOUR


def sync(a: Store, b: Store, wall_ms: int) -> None:
    """One anti-entropy round, as the replication glue runs it: each side
    sends the entries of the buckets where the other's digest differs."""
    digest_a, digest_b = a.digest(), b.digest()
    to_b = a.entries_in(a.diff(digest_b))
    to_a = b.entries_in(b.diff(digest_a))
    b.apply_many(to_b, wall_ms)
    a.apply_many(to_a, wall_ms)


def everything(store: Store) -> list[Entry]:
    return store.list(include_deleted=True)


def assert_digest_consistent(store: Store) -> None:
    assert store.digest() == compute_digest(everything(store))


# ----- local reads and writes ------------------------------------------------------


def test_put_get_list_delete() -> None:
    s = Store("a")
    e = s.put("service/web", b"spec", 1000)
    assert e == Entry("service/web", b"spec", Timestamp(1000, 0, "a"))
    assert s.get("service/web") == e
    s.put("service/api", b"spec2", 1001)
    s.put("status/a/web.1", b"up", 1002)
    assert [x.key for x in s.list()] == ["service/api", "service/web", "status/a/web.1"]
    assert [x.key for x in s.list("service/")] == ["service/api", "service/web"]
    assert [x.key for x in s.list("service/", limit=1)] == ["service/api"]
    assert s.list("nothing/") == []
    assert s.list(limit=0) == []
    assert len(s) == 3

    tomb = s.delete("service/web", 1003)
    assert tomb is not None and tomb.is_tombstone and tomb.ts > e.ts
    assert s.get("service/web") is None
    assert s.get("service/web", include_deleted=True) == tomb
    assert [x.key for x in s.list("service/")] == ["service/api"]
    assert [x.key for x in s.list("service/", include_deleted=True)] == [
        "service/api",
        "service/web",
    ]
    assert len(s) == 2 and s.tombstones == 1


def test_delete_of_a_missing_or_deleted_key_is_none() -> None:
    s = Store("a")
    assert s.delete("nope", 1) is None
    s.put("k", b"v", 1)
    assert s.delete("k", 2) is not None
    assert s.delete("k", 3) is None
    assert s.stats["deletes"] == 1


def test_put_after_delete_brings_the_key_back() -> None:
    s = Store("a")
    s.put("k", b"1", 1)
    s.delete("k", 2)
    e = s.put("k", b"2", 3)
    assert s.get("k") == e and len(s) == 1 and s.tombstones == 0


def test_put_accepts_bytes_like_values_and_empty_values() -> None:
    s = Store("a")
    assert s.put("a", bytearray(b"x"), 1).value == b"x"
    assert s.put("b", memoryview(b"y"), 1).value == b"y"
    empty = s.put("c", b"", 1)
    assert empty.value == b"" and not empty.is_tombstone and s.get("c") == empty


def test_list_sees_keys_added_after_a_previous_listing() -> None:
    s = Store("a")
    for key in ("m", "c", "x"):
        s.put(key, b"", 1)
    assert [e.key for e in s.list()] == ["c", "m", "x"]
    s.put("a", b"", 2)
    s.put("n", b"", 2)
    assert [e.key for e in s.list()] == ["a", "c", "m", "n", "x"]


# ----- hostile input ---------------------------------------------------------------

BAD_KEYS = [
    "",
    "/etc/passwd",
    "a/../b",
    "..",
    "a/..",
    "a\x00b",
    "a\nb",
    "tab\there",
    "bell\x07",
    "nbsp\u00a0",
    "lone\udcff",
    "x" * (MAX_KEY + 1),
    "é" * (MAX_KEY // 2 + 1),  # 514 bytes, 257 characters
]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_keys_are_refused_with_a_clear_error(key: str) -> None:
    s = Store("a")
    with pytest.raises(ValueError, match="key"):
        s.put(key, b"v", 1)
    assert len(s) == 0 and s.index == 0


@pytest.mark.parametrize("key", ["a", "x" * MAX_KEY, "service/café", "a..b/c.d", "a/./b", "a b"])
def test_unusual_but_fine_keys_are_accepted(key: str) -> None:
    s = Store("a")
    assert s.put(key, b"v", 1).key == key


@pytest.mark.parametrize("key", [None, 1, b"bytes"])
def test_keys_of_the_wrong_type_are_refused(key: object) -> None:
    with pytest.raises(TypeError, match="key must be a str"):
        Store("a").put(key, b"v", 1)  # type: ignore[arg-type]


def test_values_too_big_or_of_the_wrong_type_are_refused() -> None:
    s = Store("a")
    assert s.put("k", b"x" * MAX_VALUE, 1).value is not None
    with pytest.raises(ValueError, match="MAX_VALUE"):
        s.put("k", b"x" * (MAX_VALUE + 1), 2)
    for bad in ("text", None, 5):
        with pytest.raises(TypeError, match="value must be bytes"):
            s.put("k", bad, 3)  # type: ignore[arg-type]
    assert s.get("k").ts.wall_ms == 1  # type: ignore[union-attr]


HOSTILE_ENTRIES = [
    Entry("/abs", b"v", Timestamp(1, 0, "b")),
    Entry("a/../b", b"v", Timestamp(1, 0, "b")),
    Entry("k", b"x" * (MAX_VALUE + 1), Timestamp(1, 0, "b")),
    Entry("k", "str value", Timestamp(1, 0, "b")),  # type: ignore[arg-type]
    Entry("k", b"v", Timestamp("1", 0, "b")),  # type: ignore[arg-type]
    Entry("k", b"v", Timestamp(1, -1, "b")),
    Entry("k", b"v", Timestamp(1, 0, "")),
    Entry("k", b"v", (1, 0, "b")),  # type: ignore[arg-type]
    Entry(5, b"v", Timestamp(1, 0, "b")),  # type: ignore[arg-type]
    ("k", b"v", (1, 0, "b")),
    None,
]


@pytest.mark.parametrize("entry", HOSTILE_ENTRIES)
def test_hostile_remote_entries_are_dropped_and_counted(entry: Entry) -> None:
    s = Store("a")
    s.put("k", b"mine", 1)
    before = s.digest()
    assert s.apply(entry, 10) is False
    assert s.apply_many([entry, Entry("ok", b"v", Timestamp(2, 0, "b"))], 10) == [
        Entry("ok", b"v", Timestamp(2, 0, "b"))
    ]
    assert s.stats["invalid"] == 2
    assert s.get("k").value == b"mine"  # type: ignore[union-attr]
    assert s.digest() != before and s.get("ok") is not None


@given(st.recursive(st.none() | st.integers() | st.text() | st.binary(), st.lists, max_leaves=8))
def test_entry_unpack_of_anything_gives_an_entry_or_value_error(data: object) -> None:
    try:
        entry = Entry.unpack(data)
    except ValueError:
        return
    assert Store("a").apply(entry, 2**62) in (True, False)


def test_entry_pack_roundtrips_through_msgpack() -> None:
    for entry in (
        Entry("service/web", b"\x00\xffspec", Timestamp(123, 4, "node-1")),
        Entry("service/web", None, Timestamp(123, 5, "node-1")),
    ):
        assert Entry.unpack(msgpack.unpackb(msgpack.packb(entry.pack()))) == entry


# ----- last writer wins ------------------------------------------------------------


def test_later_timestamp_wins_regardless_of_arrival_order() -> None:
    old = Entry("k", b"old", Timestamp(100, 0, "b"))
    new = Entry("k", b"new", Timestamp(100, 1, "b"))
    tomb = Entry("k", None, Timestamp(100, 0, "c"))  # between old and new: node 'c' > 'b'
    for order in ([old, tomb, new], [new, tomb, old], [tomb, new, old], [new, old, tomb]):
        s = Store("a")
        for entry in order:
            s.apply(entry, 100)
        assert s.get("k", include_deleted=True) == new


def test_apply_is_idempotent() -> None:
    s = Store("a")
    e = Entry("k", b"v", Timestamp(5, 0, "b"))
    assert s.apply(e, 5) is True
    index, digest = s.index, s.digest()
    assert s.apply(e, 5) is False
    assert s.apply_many([e, e], 5) == []
    assert (s.index, s.digest()) == (index, digest)
    assert s.stats["applied"] == 1 and s.stats["stale"] == 3


def test_equal_timestamps_with_different_values_resolve_the_same_everywhere() -> None:
    ts = Timestamp(5, 0, "broken")
    variants = [Entry("k", b"a", ts), Entry("k", b"b", ts), Entry("k", None, ts)]
    winners = set()
    for perm in ([0, 1, 2], [2, 1, 0], [1, 2, 0], [1, 0, 2]):
        s = Store("a")
        for i in perm:
            s.apply(variants[i], 5)
        winners.add(s.get("k", include_deleted=True))
    assert winners == {Entry("k", b"b", ts)}


def test_a_local_write_after_seeing_a_remote_one_wins_even_with_a_slow_clock() -> None:
    s = Store("a")
    s.apply(Entry("k", b"remote", Timestamp(50_000, 3, "b")), 40_000)
    mine = s.put("k", b"local", 1000)  # our wall clock is far behind
    assert mine.ts > Timestamp(50_000, 3, "b") and s.get("k") == mine


def test_apply_many_keeps_the_newest_of_duplicates_in_one_batch() -> None:
    s = Store("a")
    batch = [
        Entry("k", b"1", Timestamp(1, 0, "b")),
        Entry("k", b"3", Timestamp(3, 0, "b")),
        Entry("k", b"2", Timestamp(2, 0, "b")),
        Entry("j", b"x", Timestamp(1, 0, "b")),
    ]
    changed = s.apply_many(batch, 3)
    assert changed == [batch[1], batch[3]]
    assert s.get("k") == batch[1] and s.index == 2


def test_remote_entries_from_far_in_the_future_are_dropped_and_counted() -> None:
    s = Store("a", max_drift_ms=1000)
    assert s.apply(Entry("k", b"v", Timestamp(10_000, 0, "evil")), 5_000) is False
    assert s.apply_many([Entry("k", b"v", Timestamp(10_000, 0, "evil"))], 5_000) == []
    assert s.get("k") is None and s.stats["clock_drift"] == 2
    assert s.put("j", b"v", 5_000).ts.wall_ms == 5_000


# ----- digests and convergence -----------------------------------------------------

KEYS = [f"k{i}" for i in range(12)]

ops = st.lists(
    st.tuples(
        st.sampled_from(["put", "delete", "apply", "gc"]),
        st.sampled_from(KEYS),
        st.integers(0, 10_000),
        st.binary(max_size=8),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(ops)
def test_incremental_digest_equals_digest_from_scratch(history: list) -> None:
    s = Store("a", max_drift_ms=10**9)
    for kind, key, wall, value in history:
        if kind == "put":
            s.put(key, value, wall)
        elif kind == "delete":
            s.delete(key, wall)
        elif kind == "apply":
            node = "b" if value[:1] < b"\x80" else "c"
            s.apply(Entry(key, value or None, Timestamp(wall, len(value), node)), wall)
        else:
            s.collect_tombstones(wall, 1000)
        assert_digest_consistent(s)
    assert s.digest() == compute_digest(reversed(everything(s)))  # order-independent


def test_digest_and_diff_formats() -> None:
    s = Store("a")
    assert s.digest() == bytes(DIGEST_SIZE)
    s.put("k", b"v", 1)
    diff = s.diff(bytes(DIGEST_SIZE))
    assert diff == [bucket_of("k")]
    assert s.entries_in(diff) == [s.get("k")]
    assert s.diff(s.digest()) == []
    for bad in (b"", bytes(DIGEST_SIZE - 1), "x" * DIGEST_SIZE, None):
        with pytest.raises(ValueError, match="digest"):
            s.diff(bad)  # type: ignore[arg-type]
    for bad_buckets in ([-1], [BUCKETS], ["0"], [1.0]):
        with pytest.raises(ValueError, match="bucket"):
            s.entries_in(bad_buckets)  # type: ignore[list-item]


def test_entries_in_includes_tombstones() -> None:
    s = Store("a")
    s.put("k", b"v", 1)
    tomb = s.delete("k", 2)
    assert s.entries_in(range(BUCKETS)) == [tomb]


history_step = st.tuples(
    st.sampled_from(["put_a", "put_b", "del_a", "del_b", "a_to_b", "b_to_a"]),
    st.sampled_from(KEYS),
    st.integers(0, 5_000),
    st.binary(max_size=4),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(history_step, max_size=80), st.randoms(use_true_random=False))
def test_divergent_replicas_converge_after_one_exchange_both_ways(
    history: list, rnd: random.Random
) -> None:
    a, b = Store("a", max_drift_ms=10**9), Store("b", max_drift_ms=10**9)
    written: list[Entry] = []
    outbox: dict[str, list[Entry]] = {"a": [], "b": []}
    stores = {"a": a, "b": b}
    for step, key, wall, value in history:
        if step in ("put_a", "put_b"):
            name = step[-1]
            e = stores[name].put(key, value, wall)
        elif step in ("del_a", "del_b"):
            name = step[-1]
            e = stores[name].delete(key, wall)
            if e is None:
                continue
        else:
            # Deliver a random part of what one side wrote, in random order:
            # gossip may lose, repeat and reorder messages.
            src, dst = step[0], step[-1]
            sent = [x for x in outbox[src] if rnd.random() < 0.5]
            rnd.shuffle(sent)
            stores[dst].apply_many(sent, wall)
            continue
        written.append(e)
        outbox[name].append(e)

    sync(a, b, 10_000)

    assert a.digest() == b.digest()
    assert everything(a) == everything(b)
    assert_digest_consistent(a)
    # And what they agree on is the last write to every key.
    newest: dict[str, Entry] = {}
    for e in written:
        if e.key not in newest or e.ts > newest[e.key].ts:
            newest[e.key] = e
    assert everything(a) == sorted(newest.values(), key=lambda e: e.key)
    # A second round has nothing left to send.
    assert a.diff(b.digest()) == []


def test_sync_of_many_keys_sends_only_differing_buckets() -> None:
    a, b = Store("a"), Store("b")
    for i in range(2000):
        e = a.put(f"service/s{i}", b"spec", 1000 + i)
        b.apply(e, 5000)
    a.put("service/s7", b"changed", 6000)
    sent = a.entries_in(a.diff(b.digest()))
    assert len(sent) < 2000 / BUCKETS * 4  # about one bucket's worth
    assert b.apply_many(sent, 6000) == [a.get("service/s7")]
    assert a.digest() == b.digest()


# ----- tombstone collection --------------------------------------------------------


def test_collect_forgets_only_old_tombstones() -> None:
    s = Store("a")
    s.put("live", b"v", 0)
    s.put("old", b"v", 0)
    s.put("young", b"v", 0)
    s.delete("old", 1000)
    s.delete("young", DAY)
    assert s.collect_tombstones(DAY + 500, older_than_ms=DAY) == 0  # horizon: 500 < 1000
    assert s.collect_tombstones(DAY + 1001, older_than_ms=DAY) == 1
    assert s.get("old", include_deleted=True) is None
    assert s.get("young", include_deleted=True) is not None
    assert s.get("live") is not None
    assert s.gc_horizon == Timestamp(1000, 0, "a")
    assert s.stats["tombstones_collected"] == 1
    assert [e.key for e in everything(s)] == ["live", "young"]
    assert_digest_consistent(s)
    with pytest.raises(ValueError):
        s.collect_tombstones(0, -1)


def test_a_stale_copy_cannot_resurrect_a_collected_key() -> None:
    a, b = Store("a"), Store("b")
    put = a.put("service/web", b"spec", 1000)
    b.apply(put, 1000)
    tomb = a.delete("service/web", 2000)
    b.apply(tomb, 2000)
    now = 2000 + DAY + 1
    assert a.collect_tombstones(now, DAY) == 1
    assert b.collect_tombstones(now, DAY) == 1
    # A node that was partitioned all along still holds the old value.
    for store in (a, b):
        assert store.apply(put, now) is False
        assert store.apply_many([put, tomb], now) == []
        assert store.get("service/web", include_deleted=True) is None
        assert store.stats["refused_gc"] == 3
    # A genuinely newer write to the key is of course accepted.
    newer = Entry("service/web", b"v2", Timestamp(now, 0, "c"))
    assert a.apply(newer, now) is True


def test_anti_entropy_with_a_stale_peer_does_not_resurrect() -> None:
    a, stale = Store("a"), Store("stale")
    put = a.put("service/web", b"spec", 1000)
    stale.apply(put, 1000)
    a.delete("service/web", 2000)
    a.collect_tombstones(2000 + DAY + 1, DAY)
    sync(a, stale, 2000 + DAY + 2)
    assert a.get("service/web", include_deleted=True) is None
    assert a.stats["refused_gc"] == 1


def test_a_new_node_accepts_old_keys_even_after_collecting_nothing() -> None:
    old = Entry("service/web", b"spec", Timestamp(1000, 0, "b"))
    fresh = Store("new")
    assert fresh.collect_tombstones(10 * DAY, DAY) == 0
    assert fresh.gc_horizon is None
    assert fresh.apply(old, 10 * DAY) is True


def test_a_new_node_collects_nothing_while_it_is_catching_up() -> None:
    old_tomb = Entry("x", None, Timestamp(1000, 0, "b"))
    old_key = Entry("y", b"spec", Timestamp(500, 0, "b"))
    join = 10 * DAY
    fresh = Store("new")
    assert fresh.apply_many([old_tomb], join) == [old_tomb]  # first anti-entropy round
    assert fresh.collect_tombstones(join + HOUR, DAY) == 0
    assert fresh.gc_horizon is None and fresh.since == join
    assert fresh.apply_many([old_key], join + 2 * HOUR) == [old_key]  # a later round
    # Once it has taken part for a whole tombstone lifetime, it collects.
    assert fresh.collect_tombstones(join + DAY, DAY) == 1
    assert fresh.gc_horizon == old_tomb.ts


def test_collected_keys_newer_than_the_horizon_are_accepted() -> None:
    s = Store("a")
    s.put("x", b"v", 0)
    s.delete("x", 1000)
    s.collect_tombstones(DAY + 2000, DAY)
    assert s.apply(Entry("unseen", b"v", Timestamp(1001, 0, "b")), DAY + 2000) is True
    assert s.apply(Entry("unseen2", b"v", Timestamp(999, 0, "b")), DAY + 2000) is False


def test_gc_then_exchange_between_two_collected_replicas_converges() -> None:
    a, b = Store("a"), Store("b")
    for i in range(50):
        b.apply(a.put(f"k{i}", b"v", i), 100)
    for i in range(0, 50, 2):
        b.apply(a.delete(f"k{i}", 200 + i), 300)
    for s in (a, b):
        s.collect_tombstones(DAY + 1000, DAY)
    assert a.digest() == b.digest()
    sync(a, b, DAY + 1000)
    assert everything(a) == everything(b) and len(a) == 25 and a.tombstones == 0


# ----- watches ---------------------------------------------------------------------


def test_subscribers_see_every_change_with_its_index() -> None:
    s = Store("a")
    seen: list[tuple[int, Entry]] = []
    unsubscribe = s.subscribe(lambda e: seen.append((s.index, e)))
    e1 = s.put("k", b"1", 1)
    e2 = s.delete("k", 2)
    remote = [Entry("r1", b"x", Timestamp(3, 0, "b")), Entry("r2", b"y", Timestamp(3, 0, "b"))]
    s.apply_many(remote, 3)
    s.apply(remote[0], 3)  # no change, no event
    assert seen == [(1, e1), (2, e2), (3, remote[0]), (4, remote[1])]
    assert s.index == 4
    unsubscribe()
    unsubscribe()
    s.put("k", b"again", 5)
    assert len(seen) == 4 and s.index == 5


def test_collecting_tombstones_neither_notifies_nor_bumps_the_index() -> None:
    s = Store("a")
    s.put("k", b"1", 1)
    s.delete("k", 2)
    seen: list[Entry] = []
    s.subscribe(seen.append)
    s.collect_tombstones(DAY + 10, DAY)
    assert seen == [] and s.index == 2


def test_a_failing_subscriber_is_counted_and_does_not_break_the_store() -> None:
    s = Store("a")
    seen: list[Entry] = []

    def broken(entry: Entry) -> None:
        raise RuntimeError("boom")

    s.subscribe(broken)
    s.subscribe(seen.append)
    e = s.put("k", b"v", 1)
    assert s.get("k") == e and seen == [e]
    assert s.stats["subscriber_errors"] == 1


# ----- persistence contract ----------------------------------------------------------


class RecordingPersistence:
    """An in-memory Persistence that records calls and can be made to fail."""

    def __init__(self) -> None:
        self.rows: dict[str, Entry] = {}
        self.meta: dict[str, MetaValue] = {}
        self.saves: list[list[Entry]] = []
        self.fail = False

    def save(self, entries: Sequence[Entry], meta: Mapping[str, MetaValue] | None = None) -> None:
        if self.fail:
            raise PersistenceError("disk full")
        self.saves.append(list(entries))
        self.rows.update((e.key, e) for e in entries)
        self.meta.update(meta or {})

    def delete_keys(self, keys: Iterable[str], meta: Mapping[str, MetaValue] | None = None) -> None:
        if self.fail:
            raise PersistenceError("disk full")
        for key in keys:
            del self.rows[key]
        self.meta.update(meta or {})

    def load(self) -> Iterator[Entry]:
        return iter(list(self.rows.values()))

    def save_meta(self, key: str, value: MetaValue) -> None:
        self.meta[key] = value

    def load_meta(self, key: str) -> MetaValue | None:
        return self.meta.get(key)

    def close(self) -> None:
        pass


def test_apply_many_persists_in_one_call_with_index_and_clock() -> None:
    p = RecordingPersistence()
    s = Store("a", p)
    batch = [Entry(f"k{i}", b"v", Timestamp(i, 0, "b")) for i in range(100)]
    s.apply_many(batch, 100)
    assert len(p.saves) == 1 and p.saves[0] == batch
    assert p.meta["index"] == 100
    assert Timestamp.from_bytes(p.meta["hlc"]) == s.hlc.last  # type: ignore[arg-type]


def test_a_failed_save_leaves_memory_untouched() -> None:
    p = RecordingPersistence()
    s = Store("a", p)
    s.put("k", b"v1", 1)
    seen: list[Entry] = []
    s.subscribe(seen.append)
    digest, index = s.digest(), s.index
    p.fail = True
    with pytest.raises(PersistenceError):
        s.put("k", b"v2", 2)
    with pytest.raises(PersistenceError):
        s.apply_many([Entry("j", b"x", Timestamp(3, 0, "b"))], 3)
    with pytest.raises(PersistenceError):
        s.delete("k", 4)
    with pytest.raises(PersistenceError):
        s.apply(Entry("k", b"v3", Timestamp(5, 0, "b")), 5)
    assert s.get("k").value == b"v1"  # type: ignore[union-attr]
    assert s.get("j") is None and seen == []
    assert (s.digest(), s.index) == (digest, index)


def test_a_failed_collection_keeps_the_tombstones() -> None:
    p = RecordingPersistence()
    s = Store("a", p)
    s.put("k", b"v", 1)
    s.delete("k", 2)
    p.fail = True
    with pytest.raises(PersistenceError):
        s.collect_tombstones(DAY + 10, DAY)
    assert s.tombstones == 1 and s.gc_horizon is None
    assert_digest_consistent(s)


def test_a_store_built_on_a_persistence_loads_its_state() -> None:
    p = RecordingPersistence()
    s = Store("a", p)
    s.put("k", b"v", 10)
    s.delete("k", 11)
    s.put("j", b"w", 12)
    s.put("x", b"", 13)
    s.delete("x", 14)
    s.collect_tombstones(DAY + 15, DAY)
    again = Store("a", p)
    assert everything(again) == everything(s)
    assert again.digest() == s.digest()
    assert (again.index, again.gc_horizon) == (s.index, s.gc_horizon)
    assert again.put("z", b"", 0).ts > s.hlc.last
