"""The routing mesh: every service port served on this node's addresses.

For each port of each service that declares a ``service_port``, the mesh
listens on that port on every address it was given (the advertise address,
loopback, and the address containers reach the host by) and forwards with
the L4 or L7 proxy the port's protocol names. Listeners follow the route
table: a new service opens them, a removed one closes them (its open
connections finish). A port held by something else is retried every
``RETRY_BIND_S``; two services claiming one ``service_port`` is a conflict the
first by name wins, reported in ``conflicts``.

When a replica leaves the routes, new traffic stops going to it and its open
connections are left to finish (draining). When its node is gone (dead or
left in gossip), they are cut at once: nothing will answer on them, and an
idempotent request in flight is retried on another replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .endpoints import Route
from .http import HttpProxy, HttpTimeouts
from .router import Router
from .tcp import TcpProxy

__all__ = ["ListenerKey", "RoutingMesh"]

log = logging.getLogger(__name__)

SWEEP_S = 1.0
"""Idle clients, response timeouts and stale pooled connections are checked this often."""
RETRY_BIND_S = 5.0
BACKLOG = 1024


@dataclass(frozen=True, slots=True)
class ListenerKey:
    service: str
    port: str
    protocol: str
    service_port: int


class _Listener:
    """One service port: its router, its proxy and its sockets on every address."""

    def __init__(self, key: ListenerKey, router: Router, proxy: TcpProxy | HttpProxy) -> None:
        self.key = key
        self.proxy = proxy
        proxy.router = router
        self.servers: dict[str, asyncio.AbstractServer] = {}
        self.errors: dict[str, str] = {}
        self.next_try = 0.0

    @property
    def router(self) -> Router:
        """The proxy's own reference: read per request, so no lookup through the mesh."""
        router = self.proxy.router
        assert router is not None
        return router

    @router.setter
    def router(self, router: Router) -> None:
        self.proxy.router = router


class RoutingMesh:
    def __init__(
        self,
        *,
        node: str,
        addresses: list[str],
        reachable: Callable[[str], bool],
        rtt: Callable[[str], float | None] = lambda node: None,
        timeouts: HttpTimeouts | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.node = node
        self.addresses = list(dict.fromkeys(addresses))
        self.reachable = reachable
        self.rtt = rtt
        self.timeouts = timeouts or HttpTimeouts()
        self.rng = rng or random.Random()
        self.listeners: dict[int, _Listener] = {}
        self.conflicts: dict[int, list[str]] = {}
        self._routes: dict[str, Route] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.stats = {"dropped_for_dead_nodes": 0, "bind_failures": 0}

    # -- lifecycle

    async def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for listener in list(self.listeners.values()):
            await self._close(listener)
        self.listeners.clear()

    def on_routes(self, routes: dict[str, Route]) -> None:
        """The route table changed: routers now, sockets on the next pass of the loop."""
        self._routes = routes
        wanted = self._wanted(routes)
        for number, listener in list(self.listeners.items()):
            key = wanted.get(number)
            if key is None or key != listener.key:
                continue
            route = routes[key.service]
            if route.balance != listener.router.balance:
                listener.router = self._router(key, route)
            self._set_endpoints(listener, route)
        self._wake.set()

    # -- the loop: sockets and sweeps

    async def _run(self) -> None:
        next_sweep = time.monotonic() + SWEEP_S
        while True:
            await self._reconcile()
            now = time.monotonic()
            if now >= next_sweep:
                self._sweep(now)
                next_sweep = now + SWEEP_S
            retry = min((lis.next_try for lis in self.listeners.values() if lis.errors), default=0)
            wait = next_sweep - now if not retry else min(next_sweep, retry) - now
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.01, wait)):
                    await self._wake.wait()

    def _wanted(self, routes: dict[str, Route]) -> dict[int, ListenerKey]:
        wanted: dict[int, ListenerKey] = {}
        conflicts: dict[int, list[str]] = {}
        for name in sorted(routes):
            for port in routes[name].ports:
                if port.service_port is None:
                    continue
                key = ListenerKey(name, port.name, port.protocol, port.service_port)
                if port.service_port in wanted:
                    conflicts.setdefault(port.service_port, [wanted[port.service_port].service])
                    conflicts[port.service_port].append(name)
                    continue
                wanted[port.service_port] = key
        if conflicts != self.conflicts:
            for number, names in conflicts.items():
                log.warning(
                    "service_port %d is claimed by %s; %s keeps it",
                    number,
                    ", ".join(names),
                    names[0],
                )
        self.conflicts = conflicts
        return wanted

    async def _reconcile(self) -> None:
        routes = self._routes
        wanted = self._wanted(routes)
        for number, listener in list(self.listeners.items()):
            if wanted.get(number) != listener.key:
                del self.listeners[number]
                listener.proxy.router = None  # requests still arriving get a 503
                await self._close(listener)
        now = time.monotonic()
        for number, key in wanted.items():
            listener = self.listeners.get(number)
            if listener is None:
                router = self._router(key, routes[key.service])
                listener = self.listeners[number] = _Listener(key, router, self._proxy(key))
                self._set_endpoints(listener, routes[key.service])
            if len(listener.servers) < len(self.addresses) and now >= listener.next_try:
                await self._bind(listener)

    def _router(self, key: ListenerKey, route: Route) -> Router:
        return Router(
            key.service,
            key.port,
            route.balance,
            local_node=self.node,
            rtt=self.rtt,
            rng=random.Random(self.rng.random()),
        )

    def _proxy(self, key: ListenerKey) -> TcpProxy | HttpProxy:
        if key.protocol == "http":
            return HttpProxy(key.service, None, self.timeouts)
        return TcpProxy(None, connect_timeout=self.timeouts.connect)

    def _set_endpoints(self, listener: _Listener, route: Route) -> None:
        before = {ep.id: ep.node for ep in listener.router.endpoints}
        listener.router.set_endpoints(route.endpoints(listener.key.port))
        still = {ep.id for ep in listener.router.endpoints}
        gone_nodes = {
            node for eid, node in before.items() if eid not in still and not self.reachable(node)
        }
        if gone_nodes:
            self.stats["dropped_for_dead_nodes"] += listener.proxy.drop_nodes(gone_nodes)

    async def _bind(self, listener: _Listener) -> None:
        loop = asyncio.get_running_loop()
        for address in self.addresses:
            if address in listener.servers:
                continue
            try:
                server = await loop.create_server(
                    listener.proxy,
                    host=address,
                    port=listener.key.service_port,
                    reuse_address=True,
                    backlog=BACKLOG,
                )
            except OSError as exc:
                self.stats["bind_failures"] += 1
                if listener.errors.get(address) != str(exc):
                    log.warning(
                        "cannot serve %s port %s on %s:%d: %s",
                        listener.key.service,
                        listener.key.port,
                        address,
                        listener.key.service_port,
                        exc.strerror or exc,
                    )
                listener.errors[address] = str(exc.strerror or exc)
                listener.next_try = time.monotonic() + RETRY_BIND_S
                continue
            listener.errors.pop(address, None)
            listener.servers[address] = server

    async def _close(self, listener: _Listener) -> None:
        servers = list(listener.servers.values())
        listener.servers.clear()
        for server in servers:
            server.close()
        for server in servers:
            # Closed listening sockets; connections already accepted keep going.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(1.0):
                    await server.wait_closed()

    def _sweep(self, now: float) -> None:
        for listener in self.listeners.values():
            proxy = listener.proxy
            if isinstance(proxy, HttpProxy):
                live = {(ep.address, ep.port) for ep in listener.router.endpoints}
                proxy.sweep(now, live)

    # -- answers

    def describe(self) -> list[dict[str, Any]]:
        """What every listener serves and how it goes, for the API and metrics."""
        out = []
        for number, lis in sorted(self.listeners.items()):
            out.append(
                {
                    "service": lis.key.service,
                    "port": lis.key.port,
                    "protocol": lis.key.protocol,
                    "service_port": number,
                    "addresses": sorted(lis.servers),
                    "errors": dict(lis.errors),
                    "endpoints": [ep.id for ep in lis.router.active],
                    "ejected": sorted(lis.router.outliers.ejected(time.monotonic())),
                    "connections": lis.proxy.active(),
                    "stats": dict(lis.proxy.stats),
                }
            )
        return out
