"""Traffic on this node: the route table, the routing mesh and the DNS server wired up.

The agent builds one ``Traffic`` after ``Workloads``. It decides the
addresses the mesh and the DNS listen on (the advertise address, loopback,
and the address replicas reach the host by, which the runtime knows), and
hands the node controller what new replicas need to find services: the DNS
server as resolver with ``mesh`` as search domain, and ``WEB_SERVICE_HOST``
style variables.
"""

from __future__ import annotations

import contextlib
import logging
import re
from typing import Any

from gossip import State
from meshd.config import DEFAULT_DNS
from meshd.dns import DOMAIN, DnsServer
from meshd.facts import decode_meta
from meshd.proxy.endpoints import Route
from meshd.proxy.mesh import RoutingMesh
from meshd.proxy.routes import RouteTable
from meshd.runtime.base import Driver, DriverError
from meshd.runtime.node import NodeController

__all__ = ["Traffic", "service_env"]

log = logging.getLogger(__name__)

CONTAINER_DNS_PORT = 53
"""A container's resolv.conf cannot name a port."""

Addr = tuple[str, int]


class TrafficStartError(Exception):
    """A listener the operator asked for cannot be opened; one line."""


def _env_word(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9]", "_", name).upper()


def service_env(routes: dict[str, Route], host: str) -> dict[str, str]:
    """Kubernetes-style variables for every service with a service port.

    ``WEB_SERVICE_HOST`` / ``WEB_SERVICE_PORT`` (its first service port) and
    ``WEB_SERVICE_PORT_<NAME>`` for each named one. Set when a replica starts,
    so they describe the services that existed then; DNS names stay current.
    """
    env: dict[str, str] = {}
    for name in sorted(routes):
        served = [p for p in routes[name].ports if p.service_port is not None]
        if not served:
            continue
        word = _env_word(name)
        env[f"{word}_SERVICE_HOST"] = host
        env[f"{word}_SERVICE_PORT"] = str(served[0].service_port)
        for p in served:
            env[f"{word}_SERVICE_PORT_{_env_word(p.name)}"] = str(p.service_port)
    return env


def _sum_stats(parts: Any) -> dict[str, int]:
    total: dict[str, int] = {}
    for stats in parts:
        for key, value in stats.items():
            total[key] = total.get(key, 0) + value
    return total


class Traffic:
    def __init__(
        self,
        *,
        node: str,
        gossip: Any,
        store: Any,
        driver: Driver,
        controller: NodeController,
        advertise: str,
        proxy_addresses: tuple[str, ...] | None,
        dns: Addr | None,
        dns_upstreams: tuple[Addr, ...] | None,
    ) -> None:
        self.node = node
        self.gossip = gossip
        self.driver = driver
        self.controller = controller
        self.advertise = advertise
        self.proxy_addresses = proxy_addresses
        self.dns_addr = dns
        self.dns_upstreams = dns_upstreams
        self.host_address: str | None = None
        self._weights: dict[bytes, int] = {}
        self.routes = RouteTable(store, reachable=self.reachable, weight=self.weight)
        self.mesh: RoutingMesh | None = None
        self.dns: DnsServer | None = None
        self.container_dns: DnsServer | None = None
        """On port 53 of the docker bridge: a container's resolv.conf cannot name a port."""

    async def start(self) -> None:
        with contextlib.suppress(DriverError):
            self.host_address = await self.driver.host_address()
        addresses = list(self.proxy_addresses or ())
        if self.proxy_addresses is None:
            addresses = [self.advertise, "127.0.0.1"]
            if self.host_address:
                addresses.append(self.host_address)
            if self.dns_addr is not None:
                addresses.append(self.dns_addr[0])  # DNS answers its own address for web.mesh
        self.mesh = RoutingMesh(
            node=self.node,
            addresses=addresses,
            reachable=self.reachable,
            rtt=lambda other: self.gossip.core.estimate_rtt(self.node, other),
        )
        await self.mesh.start()
        self.routes.listen(self.mesh.on_routes)
        self.routes.start()
        await self._start_dns()
        host = self.host_address or "127.0.0.1"
        self.controller.service_env = lambda: service_env(self.routes.routes, host)

    async def _start_dns(self) -> None:
        """The DNS server on ``--dns`` and, for containers, on port 53 of the bridge.

        The host listener is required when the operator chose its address; at
        the default address a clash (another agent or a Consul on this host)
        costs only that listener, with a warning: a zero-config start should
        not fail for want of a port. The container listener needs port 53
        (root); without it containers keep the engine's own DNS.
        """
        if self.dns_addr is None:
            return
        host_addr: Addr = (self.dns_addr[0], self.dns_addr[1])
        self.dns = await self._serve_dns(host_addr, required=host_addr != DEFAULT_DNS)
        if self.host_address is None:
            return
        container = (self.host_address, CONTAINER_DNS_PORT)
        if container == host_addr:
            served = self.dns
        else:
            served = self.container_dns = await self._serve_dns(container, required=False)
        if served is not None:
            self.controller.dns = (self.host_address,)
            self.controller.dns_search = (DOMAIN.to_text(omit_final_dot=True),)

    async def _serve_dns(self, addr: Addr, *, required: bool) -> DnsServer | None:
        server = DnsServer(self, [addr], upstreams=self._upstreams())
        try:
            await server.start()
        except OSError as exc:
            if required:
                raise TrafficStartError(f"--dns {addr[0]}:{addr[1]}: {exc}") from None
            log.warning("no mesh DNS on %s:%d: %s", addr[0], addr[1], exc)
            return None
        return server

    def _upstreams(self) -> list[Addr] | None:
        return None if self.dns_upstreams is None else list(self.dns_upstreams)

    async def stop(self) -> None:
        self.routes.stop()
        for server in (self.dns, self.container_dns):
            if server is not None:
                with contextlib.suppress(Exception):
                    await server.stop()
        if self.mesh is not None:
            await self.mesh.stop()

    def on_members_changed(self) -> None:
        self.routes.mark_dirty()

    # -- views the route table and the DNS server use

    def reachable(self, node: str) -> bool:
        if node == self.node:
            return True
        m = self.gossip.core.member(node)
        return m is not None and m.state in (State.ALIVE, State.SUSPECT)

    def weight(self, node: str) -> int:
        """A node's share under the ``weighted`` policy: its CPU count."""
        m = self.gossip.core.member(node)
        if m is None:
            return 1
        w = self._weights.get(m.meta)
        if w is None:
            facts = decode_meta(m.meta)
            w = max(1, int(facts.cpu_cores)) if facts is not None else 1
            if len(self._weights) > 4096:
                self._weights.clear()
            self._weights[m.meta] = w
        return w

    def route(self, service: str) -> Route | None:
        return self.routes.get(service)

    def node_address(self, node: str) -> str | None:
        m = self.gossip.core.member(node)
        if m is None or m.state not in (State.ALIVE, State.SUSPECT):
            return None
        return m.addr[0]

    # -- answers

    def endpoints(self, service: str) -> dict[str, Any] | None:
        route = self.routes.get(service)
        if route is None:
            return None
        out = route.to_json()
        out["listeners"] = [
            lis for lis in (self.mesh.describe() if self.mesh else []) if lis["service"] == service
        ]
        out["routes_version"] = self.routes.version
        out["changed_ms"] = self.routes.changed_ms.get(service, 0)
        return out

    def stats(self) -> dict[str, Any]:
        return {
            "routes": dict(self.routes.stats),
            "mesh": dict(self.mesh.stats) if self.mesh else {},
            "listeners": self.mesh.describe() if self.mesh else [],
            "dns": _sum_stats(s.stats for s in (self.dns, self.container_dns) if s is not None),
        }
