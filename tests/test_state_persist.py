"""SQLite persistence: state survives restarts, the clock never goes back, bad files fail clearly."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from meshd.state.hlc import Timestamp
from meshd.state.persist import SCHEMA_VERSION, PersistenceError, SqlitePersistence
from meshd.state.store import Entry, Store

DAY = 24 * 3600 * 1000


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "state.db"


def test_state_survives_close_and_reopen(db_path: Path) -> None:
    s = Store.open("a", db_path)
    s.put("gone", b"x", 1)
    s.delete("gone", 2)
    s.put("service/web", b"spec", 1000)
    s.put("service/api", b"", 1001)
    s.put("service/old", b"x", 1002)
    s.delete("service/old", 1003)
    s.apply_many([Entry(f"status/b/{i}", b"up", Timestamp(1004, i, "b")) for i in range(50)], 1004)
    s.collect_tombstones(DAY + 100, DAY)
    before = (s.list(include_deleted=True), s.digest(), s.index, s.gc_horizon)
    s.close()

    again = Store.open("a", db_path)
    assert (again.list(include_deleted=True), again.digest(), again.index, again.gc_horizon) == (
        before
    )
    assert again.get("service/api") == Entry("service/api", b"", Timestamp(1001, 0, "a"))
    assert again.get("service/old") is None and again.tombstones == 1
    assert again.gc_horizon == Timestamp(2, 0, "a")
    again.close()


def test_the_clock_never_goes_back_after_a_reopen(db_path: Path) -> None:
    s = Store.open("a", db_path)
    for _ in range(5):
        last = s.put("k", b"v", 50_000).ts  # the same millisecond: counter climbs
    s.close()
    again = Store.open("a", db_path)
    assert again.put("k", b"after restart", 10_000).ts > last  # wall clock stepped back
    again.close()


def test_the_clock_resumes_past_observed_remote_timestamps(db_path: Path) -> None:
    s = Store.open("a", db_path)
    s.put("k", b"v", 1000)
    remote = Timestamp(40_000, 9, "b")
    s.apply(Entry("k", b"remote", remote), 39_000)  # advances our clock and is stored
    s.apply(Entry("old", b"x", Timestamp(1, 0, "b")), 1000)
    s.close()
    again = Store.open("a", db_path)
    assert again.put("j", b"", 0).ts > remote
    again.close()


def test_the_clock_resumes_past_a_collected_tombstone(db_path: Path) -> None:
    s = Store.open("a", db_path)
    s.put("k", b"v", 5000)
    s.delete("k", 5000)
    s.collect_tombstones(10 * DAY, DAY)
    s.close()
    again = Store.open("a", db_path)
    assert again.put("k", b"", 0).ts > Timestamp(5000, 1, "a")
    again.close()


def test_the_start_of_participation_survives_a_reopen(db_path: Path) -> None:
    s = Store.open("a", db_path)
    s.put("k", b"v", 5000)
    s.delete("k", 6000)
    s.close()
    again = Store.open("a", db_path)
    assert again.since == 5000
    assert again.collect_tombstones(6001 + DAY, DAY) == 1  # no new waiting period
    again.close()


def test_wal_and_synchronous_settings(db_path: Path) -> None:
    p = SqlitePersistence(db_path)
    assert p.journal_mode == "wal"
    assert p.synchronous == "NORMAL"
    p.close()
    check = sqlite3.connect(db_path)
    assert check.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    check.close()
    durable = SqlitePersistence(db_path, durable=True)
    assert durable.synchronous == "FULL"
    durable.close()


def test_schema_is_versioned(db_path: Path) -> None:
    SqlitePersistence(db_path).close()
    check = sqlite3.connect(db_path)
    assert check.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (
        SCHEMA_VERSION,
    )
    check.close()


def test_save_is_one_transaction(db_path: Path) -> None:
    p = SqlitePersistence(db_path)

    def half_then_fail() -> Iterator[Entry]:
        for i in range(10):
            yield Entry(f"k{i}", b"v", Timestamp(i, 0, "a"))
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        p.save(half_then_fail(), {"index": 10})  # type: ignore[arg-type]
    assert list(p.load()) == [] and p.load_meta("index") is None
    p.save([Entry("k", None, Timestamp(1, 0, "a"))], {"index": 1})
    assert list(p.load()) == [Entry("k", None, Timestamp(1, 0, "a"))]
    p.close()


def test_meta_and_delete_keys(db_path: Path) -> None:
    p = SqlitePersistence(db_path)
    for key, value in (("i", 7), ("s", "text"), ("b", b"\x00\x01")):
        p.save_meta(key, value)
        assert p.load_meta(key) == value
    assert p.load_meta("missing") is None
    with pytest.raises(TypeError):
        p.save_meta("f", 1.5)  # type: ignore[arg-type]
    p.save([Entry(k, b"v", Timestamp(1, 0, "a")) for k in "abc"])
    p.delete_keys(["a", "c", "never-there"], {"gc_horizon": b"h"})
    assert [e.key for e in p.load()] == ["b"]
    assert p.load_meta("gc_horizon") == b"h"
    p.close()


def test_use_after_close_is_a_clear_error(db_path: Path) -> None:
    p = SqlitePersistence(db_path)
    p.close()
    p.close()
    with pytest.raises(PersistenceError, match="closed"):
        p.save([])
    with pytest.raises(PersistenceError, match="closed"):
        p.load_meta("index")


# ----- unusable files --------------------------------------------------------------


def assert_clear_error(path: Path, match: str) -> None:
    with pytest.raises(PersistenceError, match=match) as info:
        Store.open("a", path)
    assert str(path) in str(info.value)
    # The caller shows our message, not a chained sqlite3 traceback.
    err = info.value
    assert err.__cause__ is None and (err.__context__ is None or err.__suppress_context__)


def test_a_file_that_is_not_a_database(db_path: Path) -> None:
    db_path.write_bytes(b"this is not an sqlite database at all\n" * 200)
    assert_clear_error(db_path, "not a database")


def test_a_database_corrupted_after_its_first_page(db_path: Path) -> None:
    s = Store.open("a", db_path)
    s.apply_many([Entry(f"k{i:05d}", b"v" * 200, Timestamp(i, 0, "b")) for i in range(2000)], 2000)
    s.close()
    data = bytearray(db_path.read_bytes())
    page = 4096
    assert len(data) > 4 * page
    data[page:] = b"\xa5" * (len(data) - page)
    db_path.write_bytes(bytes(data))
    assert_clear_error(db_path, "malformed|not a database|corrupt")


def test_someone_elses_database_is_not_touched(db_path: Path) -> None:
    other = sqlite3.connect(db_path)
    other.execute("CREATE TABLE photos (id INTEGER)")
    other.commit()
    other.close()
    assert_clear_error(db_path, "not a meshd state database")
    check = sqlite3.connect(db_path)
    assert [r[0] for r in check.execute("SELECT name FROM sqlite_master")] == ["photos"]
    check.close()


def test_a_database_from_a_newer_version(db_path: Path) -> None:
    SqlitePersistence(db_path).close()
    db = sqlite3.connect(db_path)
    db.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (SCHEMA_VERSION + 1,))
    db.commit()
    db.close()
    assert_clear_error(db_path, "newer meshd")


def test_a_bad_row_names_its_key(db_path: Path) -> None:
    Store.open("a", db_path).close()
    db = sqlite3.connect(db_path)
    db.execute("INSERT INTO entries VALUES ('/etc/passwd', x'00', 1, 0, 'b')")
    db.commit()
    db.close()
    assert_clear_error(db_path, "bad entry '/etc/passwd'")


def test_unreadable_stored_clock(db_path: Path) -> None:
    Store.open("a", db_path).close()
    db = sqlite3.connect(db_path)
    db.execute("INSERT INTO meta VALUES ('hlc', x'0102')")
    db.commit()
    db.close()
    assert_clear_error(db_path, "stored hlc is unreadable")


def test_a_directory_or_missing_parent(tmp_path: Path) -> None:
    assert_clear_error(tmp_path, "can't open")
    assert_clear_error(tmp_path / "missing" / "state.db", "can't open")
