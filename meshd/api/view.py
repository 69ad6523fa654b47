"""What the HTTP API needs from the agent.

The API codes against this Protocol rather than the agent class so that it
can be served, and tested, over any object that gives these answers (the
tests use a fake backed by a real in-memory store).
"""

from __future__ import annotations

from typing import Any, Protocol

from meshd.state.store import Entry

__all__ = ["MEMBER_STATUSES", "AgentView"]

#: The statuses a member can have, as ``member_list`` reports them.
MEMBER_STATUSES = ("alive", "suspect", "dead", "left")


class AgentView(Protocol):
    """The running agent as the API sees it."""

    def agent_info(self) -> dict[str, Any]:
        """This node: name, address, api, cluster, version, labels, capacity, driver."""
        ...

    def member_list(self) -> list[dict[str, Any]]:
        """Every member: name, address, status, labels, capacity, rtt_ms (None if unknown)."""
        ...

    def health(self) -> tuple[bool, str]:
        """(ok, reason): ok when the agent is up and in a cluster."""
        ...

    async def leave(self) -> None:
        """Leave the cluster gracefully; the agent exits afterwards."""
        ...

    def kv_get(self, key: str) -> Entry | None:
        """The live entry for key; None if absent or deleted."""
        ...

    def kv_list(self, prefix: str) -> list[Entry]:
        """Live entries whose key starts with prefix, sorted by key."""
        ...

    async def kv_put(self, key: str, value: bytes) -> Entry:
        """Write key once it is persisted; ValueError for a bad key or value."""
        ...

    async def kv_delete(self, key: str) -> Entry | None:
        """Delete key (a tombstone); None if there was no live key."""
        ...

    def stats(self) -> dict[str, Any]:
        """Counters by subsystem: gossip, members (by status), store, replication."""
        ...

    @property
    def index(self) -> int:
        """The store's change index: grows with every change, local or remote."""
        ...
