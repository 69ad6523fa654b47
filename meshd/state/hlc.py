"""Hybrid logical clock: timestamps that follow wall time yet never go backwards.

Every write to the replicated store carries a ``Timestamp``; last writer wins,
so the clock decides which of two concurrent writes survives. A pure wall
clock would let a node whose clock stepped back lose its own newer writes; a
pure logical clock would make "last" meaningless to an operator. The hybrid
clock of Kulkarni et al. keeps the wall-clock part within the cluster's clock
skew of real time, and uses the counter to order events inside one
millisecond (or while the wall clock lags behind what we have seen).

The node name is the final tie-breaker, so two writers can never produce
equal timestamps: the order is total and every replica picks the same winner.

The module is pure: the wall clock (milliseconds) is always passed in.

Reference: S. Kulkarni et al., "Logical Physical Clocks and Consistent
Snapshots in Globally Distributed Databases", OPODIS 2014.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

__all__ = [
    "HLC",
    "MAX_COUNTER",
    "MAX_NODE",
    "MAX_WALL_MS",
    "ClockDriftError",
    "Timestamp",
    "check_node",
]

#: Upper bound of the logical counter. It only grows while the wall clock
#: stands still relative to what we have seen; if it ever fills up, the clock
#: spills into the next millisecond instead of overflowing.
MAX_COUNTER = 2**32 - 1
MAX_WALL_MS = 2**63 - 1
#: Longest node name, in UTF-8 bytes (it is stored once per entry).
MAX_NODE = 255

_FIXED = struct.Struct(">QI")


class ClockDriftError(ValueError):
    """A remote timestamp lies too far in our future to be trusted.

    Accepting it would drag our clock (and, through us, everyone's) forward;
    the caller drops the message and counts it.
    """

    def __init__(self, remote: Timestamp, wall_ms: int, max_drift_ms: int) -> None:
        self.remote = remote
        self.wall_ms = wall_ms
        self.max_drift_ms = max_drift_ms
        super().__init__(
            f"timestamp from {remote.node!r} is {remote.wall_ms - wall_ms} ms ahead of "
            f"our clock (limit {max_drift_ms} ms)"
        )


def check_node(node: object) -> str:
    """Return node if it is a usable node name, else raise ValueError."""
    if type(node) is not str:
        raise ValueError(f"node name must be a str, not {type(node).__name__}")
    try:
        size = len(node.encode())
    except UnicodeEncodeError:
        raise ValueError(f"node name {node!r} is not valid UTF-8") from None
    if not 1 <= size <= MAX_NODE:
        raise ValueError(f"node name must be 1..{MAX_NODE} UTF-8 bytes, got {size}")
    if "\x00" in node:
        raise ValueError(f"node name {node!r} contains NUL")
    return node


@dataclass(frozen=True, slots=True, order=True)
class Timestamp:
    """A version: compared as (wall_ms, counter, node)."""

    wall_ms: int
    counter: int
    node: str

    def pack(self) -> tuple[int, int, str]:
        """The msgpack-friendly form: ``[wall_ms, counter, node]``."""
        return (self.wall_ms, self.counter, self.node)

    @classmethod
    def unpack(cls, data: Any) -> Timestamp:
        """Inverse of ``pack``; accepts what msgpack gives back (a list).

        The input is untrusted: anything malformed raises ValueError.
        """
        if not isinstance(data, (list, tuple)) or len(data) != 3:
            raise ValueError("timestamp must be a [wall_ms, counter, node] array")
        ts = cls(data[0], data[1], data[2])
        ts.check()
        return ts

    def to_bytes(self) -> bytes:
        """Compact binary form (for storage): 12 fixed bytes and the node name."""
        return _FIXED.pack(self.wall_ms, self.counter) + self.node.encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Timestamp:
        """Inverse of ``to_bytes``; raises ValueError on malformed input."""
        if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) <= _FIXED.size:
            raise ValueError("timestamp bytes are too short")
        wall_ms, counter = _FIXED.unpack_from(data)
        try:
            node = bytes(data[_FIXED.size :]).decode()
        except UnicodeDecodeError:
            raise ValueError("timestamp node name is not valid UTF-8") from None
        ts = cls(wall_ms, counter, node)
        ts.check()
        return ts

    def check(self) -> None:
        """Raise ValueError unless every field has the right type and range.

        Timestamps built from network input must pass this before they are
        compared: a str wall_ms would make ordering raise TypeError.
        """
        if type(self.wall_ms) is not int or not 0 <= self.wall_ms <= MAX_WALL_MS:
            raise ValueError(f"timestamp wall_ms must be an int in 0..{MAX_WALL_MS}")
        if type(self.counter) is not int or not 0 <= self.counter <= MAX_COUNTER:
            raise ValueError(f"timestamp counter must be an int in 0..{MAX_COUNTER}")
        check_node(self.node)


class HLC:
    """One node's hybrid logical clock.

    ``now`` stamps a local event (a write); ``observe`` merges a timestamp
    received from another node, so that anything we write afterwards is
    ordered after what we have seen. Both return strictly increasing
    timestamps, whatever the wall clock does.
    """

    __slots__ = ("_counter", "_wall", "max_drift_ms", "node")

    def __init__(self, node: str, max_drift_ms: int = 60_000) -> None:
        self.node = check_node(node)
        if max_drift_ms < 0:
            raise ValueError("max_drift_ms must be >= 0")
        self.max_drift_ms = max_drift_ms
        self._wall = 0
        self._counter = 0

    @property
    def last(self) -> Timestamp:
        """The latest timestamp this clock has issued (or resumed from)."""
        return Timestamp(self._wall, self._counter, self.node)

    def now(self, wall_ms: int) -> Timestamp:
        """Timestamp for a local event at wall time wall_ms."""
        if wall_ms > self._wall:
            self._wall, self._counter = wall_ms, 0
        else:
            self._tick(self._wall, self._counter + 1)
        return Timestamp(self._wall, self._counter, self.node)

    def observe(self, remote: Timestamp, wall_ms: int) -> Timestamp:
        """Merge a received timestamp; return the receive event's timestamp.

        Raises ClockDriftError (and leaves the clock alone) if remote is more
        than max_drift_ms ahead of wall_ms.
        """
        if remote.wall_ms - wall_ms > self.max_drift_ms:
            raise ClockDriftError(remote, wall_ms, self.max_drift_ms)
        wall, counter = self._wall, self._counter
        top = max(wall, remote.wall_ms, wall_ms)
        if top == wall and top == remote.wall_ms:
            self._tick(top, max(counter, remote.counter) + 1)
        elif top == wall:
            self._tick(top, counter + 1)
        elif top == remote.wall_ms:
            self._tick(top, remote.counter + 1)
        else:
            self._wall, self._counter = top, 0
        return Timestamp(self._wall, self._counter, self.node)

    def advance(self, ts: Timestamp) -> None:
        """Make sure everything issued from now on is after ts (any node's).

        Used when resuming from storage, so a restart never issues a timestamp
        older than one issued (or stored) before it.
        """
        if (ts.wall_ms, ts.counter) >= (self._wall, self._counter):
            self._wall, self._counter = ts.wall_ms, ts.counter

    def _tick(self, wall: int, counter: int) -> None:
        if counter > MAX_COUNTER:
            wall, counter = wall + 1, 0
        self._wall, self._counter = wall, counter
