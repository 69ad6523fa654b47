"""The cluster's replicated desired state.

A last-writer-wins map of keys to values, versioned by hybrid logical clocks,
held whole by every node and persisted in SQLite. ``Store`` is the pure core
(writes, merges, anti-entropy digests, tombstone collection, watches);
``SqlitePersistence`` keeps it on disk. Spreading writes between nodes is the
job of the layer above, which only needs ``Entry.pack``/``unpack``, ``apply``
/``apply_many`` and ``digest``/``diff``/``entries_in``.
"""

from meshd.state.hlc import HLC, ClockDriftError, Timestamp
from meshd.state.persist import SqlitePersistence
from meshd.state.store import (
    BUCKETS,
    DIGEST_SIZE,
    MAX_KEY,
    MAX_VALUE,
    TOMBSTONE_TTL_MS,
    Entry,
    Persistence,
    PersistenceError,
    Store,
)

__all__ = [
    "BUCKETS",
    "DIGEST_SIZE",
    "HLC",
    "MAX_KEY",
    "MAX_VALUE",
    "TOMBSTONE_TTL_MS",
    "ClockDriftError",
    "Entry",
    "Persistence",
    "PersistenceError",
    "SqlitePersistence",
    "Store",
    "Timestamp",
]
