"""The leader's loop: for each service this node holds the lease of, turn the
spec, the members and the replicas' status into an assignment, and write it
fenced by the lease term.

The decision itself is the pure ``reschedule``; this shell keeps decoded
caches of assignments and status (fed by the store's change feed), marks a
service dirty when anything about it changes, and re-plans dirty services
at once and every led service periodically (rolling-update delays, failure
windows and health deadlines are time based).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from typing import Any

from meshd.aio import wait_event
from meshd.scheduler.assignment import (
    ASSIGN_PREFIX,
    SERVICE_PREFIX,
    STATUS_PREFIX,
    Assignment,
    ServiceStatus,
    assign_key,
    decode_assignment,
    decode_status,
    encode_assignment,
)
from meshd.scheduler.election import Elector
from meshd.scheduler.reschedule import NodeState, node_usage, reschedule, same_placement
from meshd.spec import ServiceSpec
from meshd.state.store import Entry

__all__ = ["LeaderLoop", "decode_spec"]

log = logging.getLogger(__name__)

PERIOD = 0.5
"""Re-plan every led service this often even without changes (timers)."""


def decode_spec(raw: bytes) -> ServiceSpec:
    """A stored ``service/<name>`` value; ValueError (SpecError) when bad."""
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"not JSON: {exc}") from None
    return ServiceSpec.from_dict(data)


class LeaderLoop:
    """Plans the services this node leads."""

    def __init__(
        self,
        node: str,
        elector: Elector,
        store: Any,
        *,
        put: Callable[[str, bytes], Any],
        delete: Callable[[str], Any],
        nodes: Callable[[], Sequence[NodeState]],
        wall_ms: Callable[[], int] = lambda: int(time.time() * 1000),
    ) -> None:
        self.node = node
        self.elector = elector
        self.store = store
        self._put = put
        self._delete = delete
        self._nodes = nodes
        self._wall_ms = wall_ms
        self.assignments: dict[str, Assignment] = {}
        self.statuses: dict[str, dict[str, ServiceStatus]] = {}
        self.specs: set[str] = set()
        self._dirty: set[str] = set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._unsubscribe: Callable[[], None] | None = None
        self.stats: dict[str, int] = {"plans": 0, "writes": 0, "bad_specs": 0, "bad_entries": 0}

    # ------------------------------------------------------------ life cycle

    def load(self) -> None:
        """Read the store into the caches and follow its changes."""
        for prefix in (SERVICE_PREFIX, ASSIGN_PREFIX, STATUS_PREFIX):
            for entry in self.store.list(prefix):
                self._on_entry(entry)
        self._unsubscribe = self.store.subscribe(self._on_entry)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def services(self) -> set[str]:
        """Every service that needs a leader: specified, or still assigned."""
        return self.specs | set(self.assignments)

    def poke(self, service: str | None = None) -> None:
        """Re-plan service (or every service) now: membership or leadership changed."""
        if service is None:
            self._dirty |= self.services()
        else:
            self._dirty.add(service)
        self._wake.set()

    # ------------------------------------------------------------ the change feed

    def _on_entry(self, entry: Entry) -> None:
        key = entry.key
        if key.startswith(SERVICE_PREFIX):
            service = key[len(SERVICE_PREFIX) :]
            if entry.is_tombstone:
                self.specs.discard(service)
            else:
                self.specs.add(service)
        elif key.startswith(ASSIGN_PREFIX):
            service = key[len(ASSIGN_PREFIX) :]
            if entry.is_tombstone:
                self.assignments.pop(service, None)
            else:
                try:
                    self.assignments[service] = decode_assignment(entry.value)
                except ValueError:
                    self.stats["bad_entries"] += 1
                    return
        elif key.startswith(STATUS_PREFIX):
            node, _, service = key[len(STATUS_PREFIX) :].partition("/")
            if not service:
                return
            if entry.is_tombstone:
                self.statuses.get(service, {}).pop(node, None)
            else:
                try:
                    self.statuses.setdefault(service, {})[node] = decode_status(entry.value)
                except ValueError:
                    self.stats["bad_entries"] += 1
                    return
        else:
            return
        if self.elector.leading_term(service) is not None:
            self._dirty.add(service)
            self._wake.set()

    # ------------------------------------------------------------ planning

    async def _run(self) -> None:
        last_full = 0.0
        while True:
            now = time.monotonic()
            if now - last_full >= PERIOD:
                self._dirty |= self.services()
                last_full = now
            dirty, self._dirty = self._dirty, set()
            for service in sorted(dirty):
                term = self.elector.leading_term(service)
                if term is None:
                    continue
                try:
                    self.plan(service, term)
                except Exception:
                    log.exception("planning %s failed", service)
            self._wake.clear()
            if self._dirty:
                continue
            await wait_event(self._wake, PERIOD)

    def plan(self, service: str, term: int) -> None:
        """One planning pass for service as leader in term; writes if anything changed."""
        self.stats["plans"] += 1
        current = self.assignments.get(service)
        if current is not None and current.term > term:
            return  # a newer leader has written; our lease is about to be gone
        entry = self.store.get(SERVICE_PREFIX + service)
        if entry is None:
            if current is not None and self.elector.leading_term(service) == term:
                self._delete(assign_key(service))
                self.stats["writes"] += 1
            return
        try:
            spec = decode_spec(entry.value)
        except ValueError as exc:
            self.stats["bad_specs"] += 1
            log.warning("stored spec of %s is invalid: %s", service, exc)
            return
        nodes = self._nodes()
        new = reschedule(
            spec=spec,
            current=current,
            nodes=nodes,
            statuses=self.statuses.get(service, {}),
            usage=node_usage(self.assignments.values(), exclude=service),
            term=term,
            leader=self.node,
            now_ms=self._wall_ms(),
            new_id=lambda slot: f"{service}-{slot}-{secrets.token_hex(3)}",
        )
        if (
            current is not None
            and current.term == term
            and current.leader == self.node
            and same_placement(new, current)
        ):
            return
        if self.elector.leading_term(service) != term:
            return  # the lease ran out while we planned: fence
        self._put(assign_key(service), encode_assignment(new))
        self.assignments[service] = new
        self.stats["writes"] += 1
