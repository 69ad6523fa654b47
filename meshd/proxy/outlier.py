"""Passive outlier ejection: replicas that keep failing stop getting traffic for a while.

Health checks run on the replica's own node every few seconds and their
verdict travels by gossip; a proxy sees failures first-hand and sooner. A
replica with ``consecutive`` failures in a row (connect failures, resets, or
5xx answers) is ejected for ``base_s`` times the number of times it has been
ejected, capped at ``max_s``, like Envoy's outlier detection. At most
``max_percent`` of a service's replicas are ejected at once, so a fault on the
proxy's own side (or a bad release everywhere) cannot empty the service.

Pure: the caller passes ``now``; nothing here reads a clock.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["OutlierConfig", "OutlierDetector"]


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    consecutive: int = 5
    """Failures in a row that eject: one bad answer is noise, five is a pattern."""
    base_s: float = 10.0
    """First ejection; a replica ejected again stays out longer each time."""
    max_s: float = 300.0
    max_percent: int = 50
    """Never eject more than this share of the replicas (at least one may go)."""
    forgive_s: float = 300.0
    """A replica healthy this long after its last ejection ended starts again from one."""


@dataclass(slots=True)
class _Record:
    failures: int = 0
    ejections: int = 0
    until: float = 0.0
    """Ejected while ``now < until``."""
    last_ejected: float = 0.0


class OutlierDetector:
    """Ejection state per replica id; ids that leave the set are forgotten."""

    def __init__(self, config: OutlierConfig | None = None) -> None:
        self.config = config or OutlierConfig()
        self._records: dict[str, _Record] = {}
        self.ejections_total = 0
        self.watching: set[str] = set()
        """Replicas with failures or ejections on record. A success elsewhere
        changes nothing: while this is empty the router skips reporting it."""

    def update(self, ids: Iterable[str]) -> None:
        self._records = {i: self._records.get(i) or _Record() for i in ids}
        self.watching = {i for i, r in self._records.items() if r.failures or r.ejections}

    def on_result(self, endpoint_id: str, ok: bool, now: float) -> bool:
        """Record one request's outcome; True when it ejected the replica just now."""
        rec = self._records.get(endpoint_id)
        if rec is None:
            return False
        if ok:
            rec.failures = 0
            if rec.ejections and now - rec.until >= self.config.forgive_s:
                rec.ejections = 0
            if not rec.ejections:
                self.watching.discard(endpoint_id)
            return False
        self.watching.add(endpoint_id)
        rec.failures += 1
        if rec.failures < self.config.consecutive or rec.until > now:
            return False
        if not self._may_eject(now):
            return False
        rec.ejections += 1
        rec.failures = 0
        rec.last_ejected = now
        rec.until = now + min(self.config.max_s, self.config.base_s * rec.ejections)
        self.ejections_total += 1
        return True

    def _may_eject(self, now: float) -> bool:
        ejected = sum(1 for r in self._records.values() if r.until > now)
        cap = max(1, len(self._records) * self.config.max_percent // 100)
        return ejected < cap

    def ejected(self, now: float) -> frozenset[str]:
        return frozenset(i for i, r in self._records.items() if r.until > now)

    def next_return(self, now: float) -> float | None:
        """When the earliest ejected replica comes back (None: none is out)."""
        times = [r.until for r in self._records.values() if r.until > now]
        return min(times) if times else None
