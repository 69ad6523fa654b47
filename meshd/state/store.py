"""The replicated desired state: a last-writer-wins map with HLC versions.

Every node holds the whole map. A write gets a hybrid-logical-clock timestamp
from the node that makes it; a replica keeps, per key, the entry with the
greatest timestamp, whatever order the entries arrive in. That makes merging
commutative, associative and idempotent (a state-based CRDT), so gossip may
deliver writes late, twice or out of order and every replica still ends up
with the same map.

Deletes write a *tombstone* (an entry without a value) so that an older write
arriving late cannot bring the key back. Tombstones are collected once they
are old enough to have reached everyone (``collect_tombstones``).

Anti-entropy: keys fall into ``BUCKETS`` buckets by hash, and each bucket has
a 64-bit digest, the XOR of the hashes of its entries (tombstones included).
XOR is order-independent and its own inverse, so the digest is updated in O(1)
on every change. Two nodes exchange digests, and each sends the other its
entries in the buckets that differ::

    # on receiving the peer's digest
    send(peer, store.entries_in(store.diff(peer_digest)))
    # on receiving entries
    store.apply_many(entries, wall_ms)

Both directions run, so after one round the two replicas are equal. The
price of a flat 256-bucket digest is granularity: one differing key costs
its whole bucket (about len/256 entries), which is fine for the tens of
thousands of keys a cluster's desired state holds.

The store is pure: no IO, no clocks. Durability is plugged in as a
``Persistence`` (see ``meshd.state.persist``), which sees every change, in
one transaction per call, before memory is updated and before the caller
gets an answer. The store is not thread-safe: use it from one thread at a
time (the agent's event loop).
"""

from __future__ import annotations

import logging
import struct
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from hashlib import blake2b
from pathlib import Path
from typing import Any, Protocol

from meshd.state.hlc import HLC, ClockDriftError, Timestamp, check_node

__all__ = [
    "BUCKETS",
    "DIGEST_SIZE",
    "MAX_KEY",
    "MAX_VALUE",
    "TOMBSTONE_TTL_MS",
    "Entry",
    "MetaValue",
    "Persistence",
    "PersistenceError",
    "Store",
    "bucket_of",
    "check_entry",
    "check_key",
    "check_value",
    "compute_digest",
    "entry_hash",
]

log = logging.getLogger(__name__)

#: Longest key, in UTF-8 bytes.
MAX_KEY = 512
#: Largest value: desired state is specs and small records, not blobs, and a
#: value has to fit in an anti-entropy exchange.
MAX_VALUE = 1024 * 1024
#: Number of anti-entropy buckets. Changing it changes the digest format:
#: every node of a cluster must use the same value.
BUCKETS = 256
#: Size of ``Store.digest()``: one big-endian uint64 per bucket.
DIGEST_SIZE = 8 * BUCKETS
#: A sensible tombstone lifetime for ``collect_tombstones``: a tombstone must
#: outlive the time a write needs to reach every node plus the longest
#: partition the cluster should heal from (Serf and Consul reap after 24 h).
TOMBSTONE_TTL_MS = 24 * 3600 * 1000

_DIGEST = struct.Struct(f">{BUCKETS}Q")
_ENTRY_HEAD = struct.Struct(">QIHB")

#: Values of the persisted metadata (index, clock, GC horizon).
MetaValue = int | str | bytes


# ----- entries and validation --------------------------------------------------


@dataclass(frozen=True, slots=True)
class Entry:
    """One version of one key; value None is a tombstone (the key was deleted)."""

    key: str
    value: bytes | None
    ts: Timestamp

    @property
    def is_tombstone(self) -> bool:
        return self.value is None

    def pack(self) -> tuple[str, bytes | None, tuple[int, int, str]]:
        """The msgpack-friendly form: ``[key, value or nil, [wall_ms, counter, node]]``."""
        return (self.key, self.value, self.ts.pack())

    @classmethod
    def unpack(cls, data: Any) -> Entry:
        """Inverse of ``pack``; the input is untrusted, so anything malformed
        raises ValueError (TypeError included)."""
        if not isinstance(data, (list, tuple)) or len(data) != 3:
            raise ValueError("entry must be a [key, value, timestamp] array")
        entry = cls(data[0], data[1], Timestamp.unpack(data[2]))
        try:
            check_entry(entry)
        except TypeError as exc:
            raise ValueError(str(exc)) from None
        return entry


def _shorten(key: str) -> str:
    return repr(key if len(key) <= 40 else key[:40] + "...")


def check_key(key: object) -> str:
    """Return key if it is acceptable, else raise ValueError (TypeError if not a str).

    Keys end up in URLs, file names and log lines: keep them printable, and
    keep path tricks (leading '/', '..') out so no layer above has to care.
    """
    if type(key) is not str:
        raise TypeError(f"key must be a str, not {type(key).__name__}")
    try:
        size = len(key.encode())
    except UnicodeEncodeError:
        raise ValueError(f"key {_shorten(key)} is not valid UTF-8") from None
    if not 1 <= size <= MAX_KEY:
        raise ValueError(f"key must be 1..{MAX_KEY} UTF-8 bytes, got {size}")
    if "\x00" in key:
        raise ValueError(f"key {_shorten(key)} contains NUL")
    if key[0] == "/":
        raise ValueError(f"key {_shorten(key)} must not start with '/'")
    if ".." in key and ".." in key.split("/"):
        raise ValueError(f"key {_shorten(key)} must not contain a '..' segment")
    if not key.isprintable():
        bad = next(i for i, ch in enumerate(key) if not ch.isprintable())
        raise ValueError(f"key {_shorten(key)} has a non-printable character at index {bad}")
    return key


def check_value(value: object) -> bytes:
    """Return value as bytes if it is acceptable, else raise TypeError/ValueError."""
    if isinstance(value, (bytearray, memoryview)):
        value = bytes(value)
    if type(value) is not bytes:
        raise TypeError(f"value must be bytes, not {type(value).__name__}")
    if len(value) > MAX_VALUE:
        raise ValueError(f"value is {len(value)} bytes; the limit is {MAX_VALUE} (MAX_VALUE)")
    return value


def check_entry(entry: object) -> Entry:
    """Raise ValueError/TypeError unless entry is a well-formed Entry."""
    if type(entry) is not Entry:
        raise TypeError(f"expected an Entry, not {type(entry).__name__}")
    check_key(entry.key)
    if entry.value is not None:
        check_value(entry.value)
    if type(entry.ts) is not Timestamp:
        raise TypeError(f"entry timestamp must be a Timestamp, not {type(entry.ts).__name__}")
    entry.ts.check()
    return entry


# ----- hashing -------------------------------------------------------------------


def bucket_of(key: str) -> int:
    """The anti-entropy bucket of key (the same on every node)."""
    return int.from_bytes(blake2b(key.encode(), digest_size=8).digest(), "big") % BUCKETS


def entry_hash(entry: Entry) -> int:
    """64-bit hash of everything that makes an entry: key, timestamp and value.

    Covering the value (not just the timestamp) makes anti-entropy repair even
    two entries that share a timestamp but differ, which only a broken or
    hostile writer could produce.
    """
    key = entry.key.encode()
    node = entry.ts.node.encode()
    head = _ENTRY_HEAD.pack(entry.ts.wall_ms, entry.ts.counter, len(key), len(node))
    value = entry.value
    if value is None:
        data = head + key + node + b"\x00"
    elif len(value) <= 4096:
        data = head + key + node + b"\x01" + value
    else:  # don't copy big values just to hash them
        h = blake2b(head + key + node + b"\x01", digest_size=8)
        h.update(value)
        return int.from_bytes(h.digest(), "big")
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "big")


def compute_digest(entries: Iterable[Entry]) -> bytes:
    """The digest of a set of entries, from scratch (``Store.digest`` keeps it incrementally)."""
    buckets = [0] * BUCKETS
    for entry in entries:
        buckets[bucket_of(entry.key)] ^= entry_hash(entry)
    return _DIGEST.pack(*buckets)


def _wins(new: Entry, old: Entry) -> bool:
    """Last writer wins; equal timestamps (only from a broken writer) fall back
    to comparing values, so every replica still picks the same entry."""
    if new.ts != old.ts:
        return new.ts > old.ts
    if new.value == old.value:
        return False
    if old.value is None:
        return True
    return new.value is not None and new.value > old.value


# ----- persistence interface -----------------------------------------------------


class PersistenceError(Exception):
    """The state can't be stored or read back; the message names the database."""


class Persistence(Protocol):
    """Where a Store keeps its state; each call is one atomic transaction.

    Implementations raise PersistenceError, never a driver's own exceptions.
    """

    def save(self, entries: Sequence[Entry], meta: Mapping[str, MetaValue] | None = None) -> None:
        """Upsert entries (and meta) atomically."""

    def delete_keys(self, keys: Iterable[str], meta: Mapping[str, MetaValue] | None = None) -> None:
        """Remove keys (and set meta) atomically."""

    def load(self) -> Iterator[Entry]:
        """Every stored entry."""

    def save_meta(self, key: str, value: MetaValue) -> None: ...

    def load_meta(self, key: str) -> MetaValue | None: ...

    def close(self) -> None: ...


def _meta_timestamp(persist: Persistence, key: str) -> Timestamp | None:
    raw = persist.load_meta(key)
    if raw is None:
        return None
    try:
        return Timestamp.from_bytes(raw)  # type: ignore[arg-type]
    except ValueError as exc:
        where = getattr(persist, "path", None)
        prefix = f"state database {where}" if where else "state store"
        raise PersistenceError(f"{prefix}: stored {key} is unreadable: {exc}") from None


# ----- the store -----------------------------------------------------------------

Subscriber = Callable[[Entry], None]


class Store:
    """One node's replica of the desired state."""

    def __init__(
        self, node: str, persist: Persistence | None = None, *, max_drift_ms: int = 60_000
    ) -> None:
        self.node = check_node(node)
        self.hlc = HLC(node, max_drift_ms)
        self._persist = persist
        self._entries: dict[str, Entry] = {}
        # key -> (bucket, entry_hash): what the digest needs to undo a change.
        self._slots: dict[str, tuple[int, int]] = {}
        self._buckets: list[set[str]] = [set() for _ in range(BUCKETS)]
        self._digest = [0] * BUCKETS
        self._tombstones: set[str] = set()
        # Sorted lazily: new keys are appended and the list re-sorted on the
        # next list() (Timsort merges the sorted run with the new tail).
        self._keys: list[str] = []
        self._keys_sorted = True
        self._keys_stale = False
        self._subscribers: list[Subscriber] = []
        #: Monotonic change counter (like Consul's X-Consul-Index): bumped by
        #: one for every change, local or remote; persisted.
        self.index = 0
        #: Newest timestamp of a tombstone this node has collected. An entry for
        #: a key we don't hold, at or before this, is refused: it is either a
        #: write that a collected delete overrode or a tombstone we already
        #: collected. It only moves when tombstones are actually collected, so
        #: a new node (which has collected nothing) accepts all old keys.
        self.gc_horizon: Timestamp | None = None
        #: Wall time (ms) of this replica's first write, merge or collection;
        #: persisted. Tombstones are only collected once the replica has taken
        #: part for a whole tombstone lifetime, so a new node never sets a
        #: horizon while it is still catching up (say, in several
        #: anti-entropy rounds) and refuses old keys it simply hasn't got yet.
        self.since: int | None = None
        self._since_saved = True
        self.stats: dict[str, int] = {
            "puts": 0,
            "deletes": 0,
            "applied": 0,  # remote entries that changed our state
            "stale": 0,  # remote entries older than (or equal to) what we hold
            "invalid": 0,  # malformed remote entries, dropped
            "clock_drift": 0,  # remote entries from too far in the future, dropped
            "refused_gc": 0,  # remote entries behind the GC horizon, dropped
            "tombstones_collected": 0,
            "subscriber_errors": 0,
        }
        if persist is not None:
            self._restore(persist)

    @classmethod
    def open(
        cls, node: str, path: str | Path, *, durable: bool = False, max_drift_ms: int = 60_000
    ) -> Store:
        """A store persisted in the SQLite database at path, with its state loaded back.

        Raises PersistenceError if the database can't be opened or read.
        """
        from meshd.state.persist import SqlitePersistence

        persist = SqlitePersistence(path, durable=durable)
        try:
            return cls(node, persist, max_drift_ms=max_drift_ms)
        except BaseException:
            persist.close()
            raise

    def close(self) -> None:
        if self._persist is not None:
            self._persist.close()

    # ----- reading ---------------------------------------------------------------

    def __len__(self) -> int:
        """Number of live keys (tombstones not counted)."""
        return len(self._entries) - len(self._tombstones)

    @property
    def tombstones(self) -> int:
        """Number of tombstones held (waiting to be collected)."""
        return len(self._tombstones)

    def get(self, key: str, *, include_deleted: bool = False) -> Entry | None:
        entry = self._entries.get(key)
        if entry is None or (entry.value is None and not include_deleted):
            return None
        return entry

    def list(
        self, prefix: str = "", limit: int | None = None, *, include_deleted: bool = False
    ) -> list[Entry]:
        """Entries whose key starts with prefix, sorted by key."""
        keys = self._sorted_keys()
        out: list[Entry] = []
        if limit is not None and limit <= 0:
            return out
        entries = self._entries
        for i in range(bisect_left(keys, prefix), len(keys)):
            key = keys[i]
            if not key.startswith(prefix):
                break
            entry = entries[key]
            if entry.value is None and not include_deleted:
                continue
            out.append(entry)
            if limit is not None and len(out) >= limit:
                break
        return out

    # ----- local writes ------------------------------------------------------------

    def put(self, key: str, value: bytes, wall_ms: int) -> Entry:
        """Write key locally; returns the entry once it is persisted."""
        check_key(key)
        value = check_value(value)
        self._note(wall_ms)
        entry = Entry(key, value, self.hlc.now(wall_ms))
        self._commit([entry])
        self.stats["puts"] += 1
        return entry

    def delete(self, key: str, wall_ms: int) -> Entry | None:
        """Write a tombstone for key; None if there is no live key to delete."""
        current = self._entries.get(key)
        if current is None or current.value is None:
            return None
        self._note(wall_ms)
        entry = Entry(key, None, self.hlc.now(wall_ms))
        self._commit([entry])
        self.stats["deletes"] += 1
        return entry

    # ----- merging remote entries ----------------------------------------------------

    def apply(self, entry: Entry, wall_ms: int) -> bool:
        """Merge an entry from another node; True if it changed our state.

        Malformed entries, entries from a clock too far ahead and entries
        behind the GC horizon are dropped and counted in ``stats``.
        Raises only if persisting fails (PersistenceError).
        """
        self._note(wall_ms)
        if not self._admit(entry, wall_ms):
            return False
        current = self._entries.get(entry.key)
        if not self._newer(entry, current):
            return False
        self._commit([entry])
        self.stats["applied"] += 1
        return True

    def apply_many(self, entries: Iterable[Entry], wall_ms: int) -> list[Entry]:
        """Merge a batch of remote entries in one transaction; returns those that
        changed our state (for a key given twice, only the newer counts)."""
        self._note(wall_ms)
        changed: dict[str, Entry] = {}
        own = self._entries
        for entry in entries:
            if not self._admit(entry, wall_ms):
                continue
            key = entry.key
            current = changed.get(key) or own.get(key)
            if self._newer(entry, current):
                changed[key] = entry
        batch = list(changed.values())
        if batch:
            self._commit(batch)
            self.stats["applied"] += len(batch)
        return batch

    def _admit(self, entry: Entry, wall_ms: int) -> bool:
        try:
            check_entry(entry)
        except (TypeError, ValueError) as exc:
            self.stats["invalid"] += 1
            log.debug("dropped malformed entry: %s", exc)
            return False
        try:
            self.hlc.observe(entry.ts, wall_ms)
        except ClockDriftError as exc:
            self.stats["clock_drift"] += 1
            log.debug("dropped entry %r: %s", entry.key, exc)
            return False
        return True

    def _newer(self, entry: Entry, current: Entry | None) -> bool:
        if current is None:
            if self.gc_horizon is not None and entry.ts <= self.gc_horizon:
                self.stats["refused_gc"] += 1
                return False
            return True
        if _wins(entry, current):
            return True
        self.stats["stale"] += 1
        return False

    # ----- anti-entropy ------------------------------------------------------------

    def digest(self) -> bytes:
        """Per-bucket digests, ``DIGEST_SIZE`` bytes (big-endian uint64 per bucket)."""
        return _DIGEST.pack(*self._digest)

    def diff(self, remote: bytes) -> list[int]:
        """Buckets whose digest differs from remote's (raises ValueError if malformed)."""
        if not isinstance(remote, (bytes, bytearray, memoryview)) or len(remote) != DIGEST_SIZE:
            raise ValueError(f"a digest must be {DIGEST_SIZE} bytes")
        theirs = _DIGEST.unpack(remote)
        return [i for i, (a, b) in enumerate(zip(self._digest, theirs, strict=True)) if a != b]

    def entries_in(self, buckets: Iterable[int]) -> list[Entry]:
        """Every entry (tombstones included) in the given buckets, sorted by key."""
        keys: list[str] = []
        for b in set(buckets):
            if type(b) is not int or not 0 <= b < BUCKETS:
                raise ValueError(f"bucket must be an int in 0..{BUCKETS - 1}, got {b!r}")
            keys.extend(self._buckets[b])
        keys.sort()
        entries = self._entries
        return [entries[k] for k in keys]

    # ----- tombstone collection ------------------------------------------------------

    def collect_tombstones(self, wall_ms: int, older_than_ms: int = TOMBSTONE_TTL_MS) -> int:
        """Forget tombstones written more than older_than_ms before wall_ms.

        older_than_ms must exceed the time a write takes to reach every node
        plus the longest partition the cluster should heal from (24 h, as
        Serf and Consul use, is the usual choice): a node that comes back
        later than that may still hold a value for a key whose tombstone is
        gone everywhere. The GC horizon refuses such a value here, but the
        node that was away keeps it: a node down for longer than the
        tombstone lifetime should rejoin with an empty store.
        Nothing is collected until this replica has taken part for
        older_than_ms (see ``since``). Returns the number collected.
        """
        if older_than_ms < 0:
            raise ValueError("older_than_ms must be >= 0")
        self._note(wall_ms)
        if wall_ms - (self.since or 0) < older_than_ms:
            return 0
        cutoff = wall_ms - older_than_ms
        entries = self._entries
        doomed = [k for k in self._tombstones if entries[k].ts.wall_ms < cutoff]
        if not doomed:
            return 0
        horizon = max(entries[k].ts for k in doomed)
        if self.gc_horizon is not None:
            horizon = max(horizon, self.gc_horizon)
        if self._persist is not None:
            self._persist.delete_keys(doomed, self._meta(gc_horizon=horizon.to_bytes()))
            self._since_saved = True
        for key in doomed:
            del entries[key]
            b, h = self._slots.pop(key)
            self._digest[b] ^= h
            self._buckets[b].discard(key)
            self._tombstones.discard(key)
        self._keys_stale = True
        self.gc_horizon = horizon
        self.stats["tombstones_collected"] += len(doomed)
        return len(doomed)

    # ----- watches -----------------------------------------------------------------

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        """Call callback(entry) after every change (local or remote) is persisted;
        ``index`` is that change's index during the call. Returns an unsubscribe function."""
        self._subscribers.append(callback)

        def unsubscribe() -> None:
            if callback in self._subscribers:
                self._subscribers.remove(callback)

        return unsubscribe

    # ----- internals -----------------------------------------------------------------

    def _commit(self, batch: Sequence[Entry]) -> None:
        """Persist, then install and announce, a batch of entries that win."""
        if self._persist is not None:
            self._persist.save(
                batch, self._meta(index=self.index + len(batch), hlc=self.hlc.last.to_bytes())
            )
            self._since_saved = True
        for entry in batch:
            self._install(entry)
            self.index += 1
            for callback in tuple(self._subscribers):
                try:
                    callback(entry)
                except Exception:
                    self.stats["subscriber_errors"] += 1
                    log.exception("state subscriber %r failed on %r", callback, entry.key)

    def _note(self, wall_ms: int) -> None:
        if self.since is None:
            self.since = wall_ms
            self._since_saved = False

    def _meta(self, **meta: MetaValue) -> dict[str, MetaValue]:
        """Metadata to persist with a change (and ``since``, the first time)."""
        if not self._since_saved and self.since is not None:
            meta["since"] = self.since
        return meta

    def _install(self, entry: Entry) -> None:
        key = entry.key
        h = entry_hash(entry)
        slot = self._slots.get(key)
        if slot is None:
            b = bucket_of(key)
            self._buckets[b].add(key)
            self._keys.append(key)
            self._keys_sorted = False
            self._digest[b] ^= h
        else:
            b = slot[0]
            self._digest[b] ^= slot[1] ^ h
        self._slots[key] = (b, h)
        self._entries[key] = entry
        if entry.value is None:
            self._tombstones.add(key)
        else:
            self._tombstones.discard(key)

    def _sorted_keys(self) -> list[str]:
        if self._keys_stale:
            self._keys = sorted(self._entries)
            self._keys_stale = False
            self._keys_sorted = True
        elif not self._keys_sorted:
            self._keys.sort()
            self._keys_sorted = True
        return self._keys

    def _restore(self, persist: Persistence) -> None:
        """Load the persisted state back, without announcing it."""
        latest = Timestamp(0, 0, self.node)
        for entry in persist.load():
            self._install(entry)
            latest = max(latest, entry.ts)
        index = persist.load_meta("index")
        self.index = index if type(index) is int and index >= 0 else 0
        since = persist.load_meta("since")
        self.since = since if type(since) is int else None
        self.gc_horizon = _meta_timestamp(persist, "gc_horizon")
        clock = _meta_timestamp(persist, "hlc")
        if clock is not None:
            latest = max(latest, clock)
        if self.gc_horizon is not None:
            latest = max(latest, self.gc_horizon)
        self.hlc.advance(latest)
