"""SQLite persistence for the state store.

The store calls ``save`` for every change before it answers, so a write that
was acknowledged survives a restart. The database runs in WAL mode with
``synchronous=NORMAL``: a commit appends to the write-ahead log without an
fsync, and the log is synced at checkpoints. That is durable against the
agent crashing or being killed (the log is in the OS page cache, which
outlives the process), which is what "persisted before acknowledged" must
guarantee here; losing the last few writes to a power cut is tolerable
because every other node holds them too and anti-entropy brings them back.
``durable=True`` selects ``synchronous=FULL`` (fsync on every commit) for a
single-node cluster or where power loss must not lose anything; a commit
then costs a disk flush.

The store is the only writer: each method is one transaction, and every
SQLite failure surfaces as a PersistenceError that names the database file.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from meshd.state.hlc import Timestamp
from meshd.state.store import Entry, MetaValue, PersistenceError, check_entry

__all__ = ["SCHEMA_VERSION", "PersistenceError", "SqlitePersistence"]

#: Bumped on every incompatible schema change; older files are migrated on open.
SCHEMA_VERSION = 1
#: SQLite header field identifying our files ("mshd"), so we never write into
#: some other program's database by mistake.
APPLICATION_ID = 0x6D736864

#: How long to wait for a lock held by another connection (seconds). The agent is
#: the only writer; waiting long would stall its event loop for nothing.
BUSY_TIMEOUT_S = 1.0

_SCHEMA = (
    "CREATE TABLE meta (key TEXT PRIMARY KEY NOT NULL, value) WITHOUT ROWID",
    # A rowid table, not WITHOUT ROWID: values can be up to 1 MiB, far beyond
    # the small rows WITHOUT ROWID suits.
    "CREATE TABLE entries ("
    " key TEXT PRIMARY KEY NOT NULL,"
    " value BLOB,"  # NULL: tombstone
    " wall_ms INTEGER NOT NULL,"
    " counter INTEGER NOT NULL,"
    " node TEXT NOT NULL)",
)
_UPSERT_ENTRY = (
    "INSERT INTO entries (key, value, wall_ms, counter, node) VALUES (?, ?, ?, ?, ?) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value, wall_ms = excluded.wall_ms, "
    "counter = excluded.counter, node = excluded.node"
)
_UPSERT_META = (
    "INSERT INTO meta (key, value) VALUES (?, ?) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)


class SqlitePersistence:
    """The ``Persistence`` of a Store, in one SQLite file."""

    def __init__(self, path: str | Path, *, durable: bool = False) -> None:
        self.path = str(path)
        self.durable = durable
        try:
            self._db: sqlite3.Connection | None = sqlite3.connect(
                self.path,
                timeout=BUSY_TIMEOUT_S,
                isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                # The store is used from one thread at a time, but it may be
                # opened in a worker thread (loading a big file) and used on the
                # event loop's.
                check_same_thread=False,
            )
        except sqlite3.Error as exc:
            raise self._error("can't open", exc) from None
        try:
            self._setup()
        except BaseException as exc:
            self._db.close()
            self._db = None
            if isinstance(exc, sqlite3.Error):
                raise self._error("can't open", exc) from None
            raise

    # ----- Persistence ------------------------------------------------------------

    def save(self, entries: Sequence[Entry], meta: Mapping[str, MetaValue] | None = None) -> None:
        """Upsert entries and meta in one transaction."""
        with self._transaction("can't save") as db:
            db.executemany(
                _UPSERT_ENTRY,
                ((e.key, e.value, e.ts.wall_ms, e.ts.counter, e.ts.node) for e in entries),
            )
            if meta:
                db.executemany(_UPSERT_META, _checked_meta(meta))

    def delete_keys(self, keys: Iterable[str], meta: Mapping[str, MetaValue] | None = None) -> None:
        """Remove keys (and set meta) in one transaction."""
        with self._transaction("can't delete") as db:
            db.executemany("DELETE FROM entries WHERE key = ?", ((k,) for k in keys))
            if meta:
                db.executemany(_UPSERT_META, _checked_meta(meta))

    def load(self) -> Iterator[Entry]:
        """Every stored entry, validated (a bad row raises PersistenceError)."""
        db = self._conn("can't read entries")
        try:
            rows = db.execute("SELECT key, value, wall_ms, counter, node FROM entries")
            for key, value, wall_ms, counter, node in rows:
                entry = Entry(key, value, Timestamp(wall_ms, counter, node))
                try:
                    check_entry(entry)
                except (TypeError, ValueError) as exc:
                    raise PersistenceError(
                        f"state database {self.path}: bad entry {key!r}: {exc}"
                    ) from None
                yield entry
        except sqlite3.Error as exc:
            raise self._error("can't read entries", exc) from None

    def save_meta(self, key: str, value: MetaValue) -> None:
        with self._transaction("can't save metadata") as db:
            db.executemany(_UPSERT_META, _checked_meta({key: value}))

    def load_meta(self, key: str) -> MetaValue | None:
        db = self._conn("can't read metadata")
        try:
            row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        except sqlite3.Error as exc:
            raise self._error("can't read metadata", exc) from None
        return None if row is None else row[0]

    def close(self) -> None:
        """Close the database (idempotent); later calls raise PersistenceError."""
        if self._db is not None:
            db, self._db = self._db, None
            try:
                db.close()
            except sqlite3.Error as exc:
                raise self._error("can't close", exc) from None

    # ----- diagnostics --------------------------------------------------------------

    @property
    def journal_mode(self) -> str:
        return str(self._pragma("journal_mode"))

    @property
    def synchronous(self) -> str:
        """ "NORMAL" or "FULL"."""
        return {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}[int(self._pragma("synchronous"))]

    # ----- internals -----------------------------------------------------------------

    def _setup(self) -> None:
        db = self._conn("can't open")
        # The first statement reads the header: a file that isn't a database
        # fails here, before we change anything.
        app_id = db.execute("PRAGMA application_id").fetchone()[0]
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal" and not (self.path == ":memory:" and mode == "memory"):
            raise PersistenceError(
                f"state database {self.path}: can't use WAL journaling "
                f"(got {mode!r}; is it on a network file system?)"
            )
        db.execute(f"PRAGMA synchronous = {'FULL' if self.durable else 'NORMAL'}")
        with self._transaction("can't open") as db:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
            if app_id == 0 and not tables:
                for statement in _SCHEMA:
                    db.execute(statement)
                db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                db.execute(_UPSERT_META, ("schema_version", SCHEMA_VERSION))
                return
            if app_id != APPLICATION_ID or "meta" not in tables:
                raise PersistenceError(
                    f"state database {self.path}: not a meshd state database "
                    "(refusing to write into it)"
                )
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = None if row is None else row[0]
            if type(version) is not int or version < 1:
                raise PersistenceError(
                    f"state database {self.path}: schema version missing or invalid ({version!r})"
                )
            if version > SCHEMA_VERSION:
                raise PersistenceError(
                    f"state database {self.path}: schema version {version} was written by a "
                    f"newer meshd (this one knows up to {SCHEMA_VERSION})"
                )
            # Migrations from older versions go here, one step per version.

    def _conn(self, what: str) -> sqlite3.Connection:
        if self._db is None:
            raise PersistenceError(f"state database {self.path}: {what}: it is closed")
        return self._db

    @contextmanager
    def _transaction(self, what: str) -> Iterator[sqlite3.Connection]:
        db = self._conn(what)
        try:
            db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise self._error(what, exc) from None
        try:
            yield db
            db.execute("COMMIT")
        except BaseException as exc:
            # A failed COMMIT may already have rolled back.
            with suppress(sqlite3.Error):
                db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise self._error(what, exc) from None
            raise

    def _pragma(self, name: str) -> object:
        db = self._conn("can't read settings")
        try:
            return db.execute(f"PRAGMA {name}").fetchone()[0]
        except sqlite3.Error as exc:
            raise self._error("can't read settings", exc) from None

    def _error(self, what: str, exc: sqlite3.Error) -> PersistenceError:
        return PersistenceError(f"state database {self.path}: {what}: {exc}")


def _checked_meta(meta: Mapping[str, MetaValue]) -> list[tuple[str, MetaValue]]:
    rows = []
    for key, value in meta.items():
        if type(key) is not str or type(value) not in (int, str, bytes):
            raise TypeError(f"metadata {key!r} must map a str to int, str or bytes")
        rows.append((key, value))
    return rows
