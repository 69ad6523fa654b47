"""Lifeguard's local health awareness.

A node that misses acks or has to refute suspicions about itself is more
likely slow itself than surrounded by failures. Its score stretches its own
probe interval and timeout so it accuses others less while it struggles.
"""

from __future__ import annotations


class Awareness:
    __slots__ = ("max", "score")

    def __init__(self, max_multiplier: int) -> None:
        self.max = max_multiplier
        self.score = 0

    def apply(self, delta: int) -> None:
        self.score = min(self.max - 1, max(0, self.score + delta))

    def scale(self, duration: float) -> float:
        return duration * (self.score + 1)
