"""Member records.

A record is immutable: a change replaces it. Nodes can then share records
that are equal (the simulator relies on this to hold 10,000 members' views
of 10,000 members in memory).
"""

from __future__ import annotations

from enum import IntEnum

Addr = tuple[str, int]


class State(IntEnum):
    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3

    @property
    def label(self) -> str:
        return self.name.lower()


class Member:
    __slots__ = ("addr", "incarnation", "meta", "name", "state", "state_change")

    name: str
    addr: Addr
    meta: bytes
    incarnation: int
    state: State
    state_change: float

    def __init__(
        self,
        name: str,
        addr: Addr,
        meta: bytes,
        incarnation: int,
        state: State,
        state_change: float,
    ) -> None:
        self.name = name
        self.addr = addr
        self.meta = meta
        self.incarnation = incarnation
        self.state = state
        self.state_change = state_change

    def evolve(self, **changes: object) -> Member:
        m = Member(self.name, self.addr, self.meta, self.incarnation, self.state, self.state_change)
        for k, v in changes.items():
            setattr(m, k, v)
        return m

    @property
    def is_active(self) -> bool:
        """Alive or suspect: still counted as a member to probe and gossip to."""
        return self.state <= State.SUSPECT

    def __repr__(self) -> str:
        return (
            f"Member({self.name!r}, {self.addr[0]}:{self.addr[1]}, "
            f"{self.state.label}, inc={self.incarnation})"
        )
