"""Rendered ``mesh.`` answers, reused while the view still says the same.

Parsing and rendering with the codec costs far more than deciding an answer,
and clients (TTL 0 for replicas) ask the same few questions over and over.
An entry is keyed by the query's bytes past the ID (so question, flags and
EDNS all match), the transport and the address the query came to; it
remembers every view lookup the answer made and is valid while each lookup
still returns the same thing (the route table hands out one ``Route`` object
per service until it rebuilds, so the check is usually an identity test).
"""

from __future__ import annotations

from collections.abc import Hashable

from meshd.proxy.endpoints import Route

from .zone import ZoneView

__all__ = ["AnswerCache", "Recorder"]

Dependency = tuple[bool, str, object]
"""(is a route lookup, the service or node asked about, what came back)."""


class Recorder:
    """A view that notes each lookup, for the cache to check later."""

    __slots__ = ("deps", "view")

    def __init__(self, view: ZoneView) -> None:
        self.view = view
        self.deps: list[Dependency] = []

    def route(self, service: str) -> Route | None:
        found = self.view.route(service)
        self.deps.append((True, service, found))
        return found

    def node_address(self, node: str) -> str | None:
        found = self.view.node_address(node)
        self.deps.append((False, node, found))
        return found


class AnswerCache:
    """At most ``size`` answers; the oldest entry goes when a new one comes."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self._entries: dict[Hashable, tuple[bytes, tuple[Dependency, ...]]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable, view: ZoneView) -> bytes | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        wire, deps = entry
        for is_route, name, then in deps:
            now = view.route(name) if is_route else view.node_address(name)
            if now is not then and now != then:
                del self._entries[key]
                return None
        return wire

    def put(self, key: Hashable, wire: bytes, deps: list[Dependency]) -> None:
        if self.size <= 0:
            return
        if key not in self._entries and len(self._entries) >= self.size:
            del self._entries[next(iter(self._entries))]
        self._entries[key] = (wire, tuple(deps))

    def clear(self) -> None:
        self._entries.clear()
