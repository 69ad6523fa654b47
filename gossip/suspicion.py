"""Lifeguard's dynamic suspicion timeout.

A suspicion starts with the maximum timeout; each independent confirmation
(another member suspecting the same incarnation) lowers it logarithmically
towards the minimum. One lonely suspicion waits long, a crash seen by many
is declared quickly.
"""

from __future__ import annotations

import math


class Suspicion:
    __slots__ = ("confirmers", "deadline", "incarnation", "k", "max", "min", "start")

    def __init__(
        self, incarnation: int, source: str, k: int, min_t: float, max_t: float, now: float
    ) -> None:
        self.incarnation = incarnation
        self.k = k
        self.min = min_t
        self.max = max_t if k > 0 else min_t
        self.start = now
        self.confirmers = {source}
        self.deadline = now + self.max

    def confirm(self, source: str) -> bool:
        """Count an independent confirmation; True if it was new."""
        if source in self.confirmers or len(self.confirmers) > self.k:
            return False
        self.confirmers.add(source)
        n = len(self.confirmers) - 1
        frac = math.log(n + 1) / math.log(self.k + 1)
        timeout = max(self.min, self.max - frac * (self.max - self.min))
        self.deadline = self.start + timeout
        return True
