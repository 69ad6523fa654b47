"""The live route table: ``build_routes`` kept current from the store and gossip.

Every change to a ``service/`` or ``status/`` key, and every membership
change, marks the table dirty; one rebuild runs on the next loop iteration
however many changes arrived together, and then each listener (the routing
mesh, the DNS server) gets the new table. Decoded specs and statuses are
cached by key and version, so a rebuild decodes only what changed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from meshd.scheduler.assignment import (
    SERVICE_PREFIX,
    STATUS_PREFIX,
    ServiceStatus,
    decode_status,
)
from meshd.scheduler.leader import decode_spec
from meshd.spec import ServiceSpec

from .endpoints import Route, build_routes

__all__ = ["RouteTable"]

log = logging.getLogger(__name__)

Listener = Callable[[dict[str, Route]], None]


class RouteTable:
    """Routes of every service, rebuilt at most once per loop iteration."""

    def __init__(
        self,
        store: Any,
        *,
        reachable: Callable[[str], bool],
        weight: Callable[[str], int] = lambda node: 1,
    ) -> None:
        self.store = store
        self.reachable = reachable
        self.weight = weight
        self.routes: dict[str, Route] = {}
        self.version = 0
        self.updated = 0.0
        """``time.monotonic()`` of the last rebuild that changed something."""
        self.changed_ms: dict[str, int] = {}
        """Wall-clock ms when each service's route last changed here (for measuring
        how fast a replica change reaches every proxy)."""
        self._specs: dict[str, tuple[Any, ServiceSpec | None]] = {}
        self._statuses: dict[str, tuple[Any, ServiceStatus | None]] = {}
        self._listeners: list[Listener] = []
        self._scheduled = False
        self._unsubscribe: Callable[[], None] | None = None
        self.stats = {"rebuilds": 0, "bad_specs": 0, "bad_statuses": 0}

    def start(self) -> None:
        self._unsubscribe = self.store.subscribe(self._on_entry)
        self.rebuild()

    def stop(self) -> None:
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None

    def listen(self, listener: Listener) -> None:
        """Call ``listener`` with every new table (and now with the current one)."""
        self._listeners.append(listener)
        listener(self.routes)

    def get(self, service: str) -> Route | None:
        return self.routes.get(service)

    def _on_entry(self, entry: Any) -> None:
        if entry.key.startswith((SERVICE_PREFIX, STATUS_PREFIX)):
            self.mark_dirty()

    def mark_dirty(self) -> None:
        """Something routes depend on changed (an entry, a member): rebuild soon."""
        if self._scheduled:
            return
        self._scheduled = True
        try:
            asyncio.get_running_loop().call_soon(self.rebuild)
        except RuntimeError:  # no loop (tests building tables by hand)
            self.rebuild()

    def rebuild(self) -> None:
        self._scheduled = False
        specs = {
            name: spec
            for name, spec in self._decoded(SERVICE_PREFIX, self._specs, self._decode_spec).items()
            if spec is not None
        }
        statuses = [
            s
            for s in self._decoded(STATUS_PREFIX, self._statuses, self._decode_status).values()
            if s is not None
        ]
        routes = build_routes(specs, statuses, self.reachable, self.weight)
        self.stats["rebuilds"] += 1
        if routes == self.routes:
            return
        now_ms = int(time.time() * 1000)
        for name, route in routes.items():
            if self.routes.get(name) != route:
                self.changed_ms[name] = now_ms
        for name in [n for n in self.changed_ms if n not in routes]:
            del self.changed_ms[name]
        self.routes = routes
        self.version += 1
        self.updated = time.monotonic()
        for listener in list(self._listeners):
            try:
                listener(routes)
            except Exception:
                log.exception("route listener failed")

    def _decoded(
        self,
        prefix: str,
        cache: dict[str, tuple[Any, Any]],
        decode: Callable[[str, bytes], Any],
    ) -> dict[str, Any]:
        """Decode the entries under ``prefix``, reusing the cache for unchanged ones."""
        out: dict[str, Any] = {}
        fresh: dict[str, tuple[Any, Any]] = {}
        for entry in self.store.list(prefix):
            key = entry.key[len(prefix) :]
            cached = cache.get(key)
            if cached is not None and cached[0] == entry.ts:
                value = cached[1]
            else:
                value = decode(key, entry.value)
            fresh[key] = (entry.ts, value)
            out[key] = value
        cache.clear()
        cache.update(fresh)
        return out

    def _decode_spec(self, key: str, raw: bytes) -> ServiceSpec | None:
        try:
            return decode_spec(raw)
        except Exception as exc:
            self.stats["bad_specs"] += 1
            log.warning("unreadable spec for %s: %s", key, exc)
            return None

    def _decode_status(self, key: str, raw: bytes) -> ServiceStatus | None:
        try:
            return decode_status(raw)
        except Exception as exc:
            self.stats["bad_statuses"] += 1
            log.warning("unreadable status %s: %s", key, exc)
            return None
