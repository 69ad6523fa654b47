"""The piggyback queue: messages waiting to ride on outgoing datagrams.

Each message is sent a limited number of times (retransmit_mult x
log10(N+1)); the least-sent messages go first, newest first among equals,
and a message about a member replaces any queued message about the same
member, so stale news is never spread after fresh news.
"""

from __future__ import annotations

_MIN_MESSAGE = 8
"""No protocol message is smaller; stop looking once less room is left."""


class _Entry:
    __slots__ = ("data", "key", "transmits")

    def __init__(self, key: str | None, data: bytes) -> None:
        self.key = key
        self.data = data
        self.transmits = 0


class BroadcastQueue:
    """Buckets by transmit count; each bucket keeps insertion order so that
    iterating it backwards yields the newest first."""

    __slots__ = ("_buckets", "_by_key", "_len", "sent_total")

    def __init__(self) -> None:
        self._buckets: list[dict[int, _Entry]] = [{}]
        self._by_key: dict[str, _Entry] = {}
        self._len = 0
        self.sent_total = 0

    def __len__(self) -> int:
        return self._len

    def queue(self, data: bytes, key: str | None = None) -> None:
        """Add a message; one with the same key is superseded and dropped."""
        if key is not None:
            old = self._by_key.pop(key, None)
            if old is not None:
                del self._buckets[old.transmits][id(old)]
                self._len -= 1
        entry = _Entry(key, data)
        if key is not None:
            self._by_key[key] = entry
        self._buckets[0][id(entry)] = entry
        self._len += 1

    def transmits(self, key: str) -> int | None:
        """How often the message with this key was sent; None once it is gone
        (finished or superseded)."""
        entry = self._by_key.get(key)
        return None if entry is None else entry.transmits

    def take(self, budget: int, limit: int) -> list[bytes]:
        """Messages fitting in `budget` bytes; each counts as one transmit and
        is dropped when it reaches `limit` transmits."""
        if not self._len:
            return []
        out: list[bytes] = []
        taken: list[_Entry] = []
        for bucket in self._buckets:
            if not bucket:
                continue
            for entry in reversed(bucket.values()):
                size = len(entry.data)
                if size <= budget:
                    budget -= size
                    out.append(entry.data)
                    taken.append(entry)
                    if budget < _MIN_MESSAGE:
                        break
            if budget < _MIN_MESSAGE:
                break
        buckets = self._buckets
        # Move oldest first so each bucket stays ordered by age.
        for entry in reversed(taken):
            del buckets[entry.transmits][id(entry)]
            entry.transmits += 1
            if entry.transmits >= limit:
                self._len -= 1
                if entry.key is not None:
                    del self._by_key[entry.key]
                continue
            if entry.transmits >= len(buckets):
                buckets.append({})
            buckets[entry.transmits][id(entry)] = entry
        self.sent_total += len(out)
        return out

    def prune(self, max_len: int) -> int:
        """Drop the most-sent messages beyond max_len; returns how many."""
        dropped = 0
        for bucket in reversed(self._buckets):
            while bucket and self._len > max_len:
                _, entry = bucket.popitem()
                if entry.key is not None:
                    self._by_key.pop(entry.key, None)
                self._len -= 1
                dropped += 1
        return dropped
