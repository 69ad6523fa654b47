"""Membership events the core reports to its user."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from .members import Member


class EventKind(StrEnum):
    JOIN = "join"
    """A member appeared, or came back after leaving."""
    UPDATE = "update"
    """An alive member changed its metadata or address."""
    SUSPECT = "suspect"
    """A member missed its probes; it may still refute."""
    DEAD = "dead"
    """A member was declared failed."""
    LEAVE = "leave"
    """A member left gracefully."""
    RECOVER = "recover"
    """A suspect refuted, or a dead member came back."""


@dataclass(slots=True, frozen=True)
class MemberEvent:
    kind: EventKind
    member: Member
    at: float
