"""What the HTTP API needs from the agent.

The API codes against this Protocol rather than the agent class so that it
can be served, and tested, over any object that gives these answers (the
tests use a fake backed by a real in-memory store).

Services are exchanged as plain JSON-ready dicts, the shapes the API sends:

* service record: ``name``, ``kind`` ("service" or "job"), ``version`` (the
  ``spec_version`` the service converges to), ``spec`` (``ServiceSpec.to_dict()``),
  ``replicas`` (``{"desired", "running", "ready"}``), ``leader``
  (``{"node", "term"}`` or None), ``pending`` (``[{"slot", "reason"}]``: replicas
  that fit nowhere), ``update`` (the rolling update's state or None),
  ``completed`` (jobs: replicas that succeeded), ``created_ms``, ``updated_ms``.
* replica record: ``id``, ``service``, ``slot``, ``node``, ``version``, ``state``,
  ``health``, ``address``, ``ports`` (name -> host port), ``restarts``,
  ``started_ms``, ``exit_code``, ``reason`` (as in ``ReplicaStatus``).
* log line: ``replica``, ``node``, ``stream`` ("stdout" or "stderr"), ``time``
  (ISO 8601), ``text``.

Errors the API maps: ``ValueError`` from a write is a conflict the agent
refuses (409), ``PersistenceError`` a write that could not be stored (503).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, Protocol

from meshd.state.store import Entry

if TYPE_CHECKING:
    from meshd.spec import ServiceSpec

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

    def leases(self) -> list[dict[str, Any]]:
        """Service leases this agent has held since it started: ``service``,
        ``term``, ``start`` and ``until`` in wall-clock seconds."""
        ...

    async def member_remove(self, node: str) -> bool:
        """Remove a dead member from the lease voter set, so the rest can form a quorum.

        False if there is no such member; ValueError (refused) when the member
        is alive, since removing a live member could let two majorities form.
        """
        ...

    # ----- services -------------------------------------------------------------

    async def service_put(self, spec: ServiceSpec) -> dict[str, Any]:
        """Create or replace a service once the change is stored; its service record.

        ValueError when the cluster refuses the spec (a conflict with another
        service); PersistenceError when it could not be stored.
        """
        ...

    def service_get(self, name: str) -> dict[str, Any] | None:
        """The service record of name; None if there is no such service."""
        ...

    def service_list(self) -> list[dict[str, Any]]:
        """Every service record, sorted by name."""
        ...

    async def service_delete(self, name: str) -> bool:
        """Delete a service (its replicas are stopped); False if there was none."""
        ...

    def service_replicas(self, name: str) -> list[dict[str, Any]] | None:
        """The replica records of a service by slot; None if there is no such service."""
        ...

    def service_endpoints(self, name: str) -> dict[str, Any] | None:
        """What this node's proxies and DNS use for a service: its ports, balancing
        policy, ready replicas and listeners; None if there is no such service."""
        ...

    def service_leader(self, name: str) -> dict[str, Any] | None:
        """``{"node", "term"}`` of the service's leader, node None while there is
        none yet; None if there is no such service."""
        ...

    async def service_scale(self, name: str, replicas: int) -> dict[str, Any] | None:
        """Set the desired replica count (already checked to be 0..MAX_REPLICAS);
        the updated service record, None if there is no such service.

        ValueError when the service cannot be scaled so (a job, say).
        """
        ...

    def service_logs(
        self, name: str, *, tail: int | None, follow: bool
    ) -> AsyncIterator[dict[str, Any]]:
        """Log lines of the service's replicas: the last ``tail`` lines (all kept
        lines if None), then, with ``follow``, new lines as they come, until the
        consumer closes the iterator. KeyError for an unknown service."""
        ...

    def stats(self) -> dict[str, Any]:
        """Counters by subsystem: gossip, members (by status), store, replication."""
        ...

    @property
    def index(self) -> int:
        """The store's change index: grows with every change, local or remote."""
        ...
